"""Run the command line as ``python -m hwctl``."""

from hwctl.cli import main

main()
