"""hwctl: program neural networks onto PCM in-memory-computing chips and track their drift."""

__version__ = "0.1.0"
