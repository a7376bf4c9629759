"""Test-wide settings: offline Hugging Face, float32, CPU."""
import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

torch.set_default_dtype(torch.float32)
