"""The whole analysis pipeline in one namespace, for notebooks and scripts that want one import
(``from moe_core.analysis import results``; ``results.run_table``, ``results.write_table``, ...).

The code lives in the pipeline's modules, records -> frames (load) -> statistics (stats, frontier) ->
LaTeX and markdown (latex, markdown) -> the paper's tables, number macros and the README's results
(tables); this module only looks names up there.
"""
from . import frontier, latex, load, markdown, stats, tables

PIPELINE = (load, stats, frontier, latex, markdown, tables)


def __getattr__(name: str):
    """``results.<name>``: the public name ``name`` of the first pipeline module that has it."""
    for module in PIPELINE:
        if not name.startswith("_") and name in vars(module):
            return vars(module)[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({n for module in PIPELINE for n in vars(module) if not n.startswith("_")} | {"PIPELINE"})
