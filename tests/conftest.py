"""Test-wide settings: offline Hugging Face, float32, CPU; a data cache per test module."""
import os

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

torch.set_default_dtype(torch.float32)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """A token cache shared by one module's training runs."""
    return str(tmp_path_factory.mktemp("cache"))
