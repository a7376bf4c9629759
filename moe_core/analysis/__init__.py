"""The analysis: run and bench records -> frames -> statistics -> the paper's tables, figures and
number macros, every number computed from the records under runs/ and none typed by hand.

- load: run records (config.json, summary.json, metrics.jsonl) and bench records -> pandas frames
- stats: seed summaries and Student-t CIs, paired differences with Holm's correction (the router
  ranking per budget, variants against their main config), aggregates, Pareto front, curves
- frontier: tokens to a target loss, iso-FLOP comparisons at the ends of schedules, throughput
  (solo timing pass or runs), Pareto membership by bootstrap; ``analyse``: all of them at once
- latex: TeX escaping, number formatting, ``\\newcommand`` macros, booktabs tables, CSVs
- markdown: the README's results section, per token budget
- tables: the Experiment A/B tables and number macros with their captions, and their writers
- plots: the figures (altair, rendered offline to PNG, SVG and PDF)
- view: what the notebooks show: figures at one screen scale, tables rounded for reading (IPython)
- paper: ``python -m moe_core.analysis.paper``, the bench and setup macros not made by the notebooks
- expert_parallel: the expert-parallel bench records -> the all-to-all table, figure and macros
- results: every public name of load, stats, frontier, latex, markdown and tables in one namespace
"""
