"""Notebooks run from the repository root wherever their kernel starts (nbval starts it in
notebooks/, papermill and JupyterLab where they are told), so that relative paths such as runs/,
.cache/ and text:data/... mean the same in all three."""
from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the folder that holds moe_core/


def work_from_repo_root() -> Path:
    """chdir to the repository root (the checkout this moe_core was imported from) and return it."""
    os.chdir(ROOT)
    return ROOT
