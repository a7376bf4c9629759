"""The analysis: run and bench records -> frames -> statistics -> the paper's tables, figures and
number macros, every number computed from the records under runs/ and none typed by hand.

- load: run records (config.json, summary.json, metrics.jsonl) and bench records -> pandas frames
- stats: seed summaries, Student-t and Welch CIs, the ranking check, aggregates, Pareto, iso-FLOP
- latex: TeX escaping, number formatting, ``\\newcommand`` macros, booktabs tables, CSVs
- tables: the Experiment A/B tables and number macros with their captions, and their writers
- plots: the figures (altair, rendered offline to PNG, SVG and PDF)
- view: what the notebooks show: figures at one screen scale, tables rounded for reading (IPython)
- paper: ``python -m moe_core.analysis.paper``, the bench and setup macros not made by the notebooks
- results: every public name of load, stats, latex and tables in one namespace
"""
