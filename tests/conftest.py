"""Shared fixtures: where the real CIFAR-10 files and the third-party checkpoint lie."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
CIFAR10_DIR = Path(os.environ.get("HWCTL_CIFAR10_DIR", SHARED / "data" / "cifar-10-batches-bin"))
THIRD_PARTY_CHECKPOINT = SHARED / "models" / "resnet32-d509ac18.th"


@pytest.fixture
def cifar10_dir() -> Path:
    if not (CIFAR10_DIR / "test_batch.bin").is_file():
        pytest.skip(f"real CIFAR-10 not found at {CIFAR10_DIR}; set HWCTL_CIFAR10_DIR to run this")
    return CIFAR10_DIR


@pytest.fixture
def third_party_checkpoint() -> Path:
    if not THIRD_PARTY_CHECKPOINT.is_file():
        pytest.skip(f"pretrained ResNet-32 not found at {THIRD_PARTY_CHECKPOINT}")
    return THIRD_PARTY_CHECKPOINT
