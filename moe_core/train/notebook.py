"""The papermill parameter cell of notebooks/train.ipynb, written from TrainConfig: its fields in
order, with their defaults, so the notebook's defaults are TrainConfig's by construction.

    python -m moe_core.train.notebook [NOTEBOOK]     (make notebook-params)
"""

from __future__ import annotations

import argparse
from dataclasses import fields

import nbformat

from .config import RENAMED, SECTIONS, TrainConfig

NOTEBOOK = "notebooks/train.ipynb"


def parameter_cell() -> str:
    """Source of the parameter cell: ``name = default`` per field under its section's heading; a
    renamed component field notes its source (``bpe_vocab_size = 512  # DataConfig.vocab_size``)."""
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    origin = {flat: f"{cls.__name__}.{name}" for cls, names in RENAMED.items() for name, flat in names.items()}
    lines = []
    for title, names in SECTIONS.items():
        lines.append(f"# {title}")
        lines += [f"{name} = {defaults[name]!r}" + (f"  # {origin[name]}" if name in origin else "") for name in names]
    return "\n".join(lines)


def parameter_cell_of(nb) -> nbformat.NotebookNode:
    """The notebook's cell tagged ``parameters`` (papermill's)."""
    return next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moe_core.train.notebook", description=__doc__.split("\n")[0])
    parser.add_argument("notebook", nargs="?", default=NOTEBOOK)
    path = parser.parse_args(argv).notebook
    nb = nbformat.read(path, as_version=4)
    cell = parameter_cell_of(nb)
    if cell.source == parameter_cell():
        print(f"{path}: parameter cell up to date")
        return 0
    cell.source = parameter_cell()
    nbformat.write(nb, path)
    print(f"{path}: parameter cell rewritten from TrainConfig")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
