"""Altair chart builders for the paper's figures, one theme, and ``save`` to PNG + SVG + PDF.

Why one module: every figure shares one geometry (single-column figures about 3.3 in wide: a plot
area of PLOT_WIDTH points plus axes, compact legends below, each one block of LEGEND_COLUMNS columns
with its title at the left; the faceted routing_stats and capacity_* figures span the page, figure*),
every font FONT_SIZE points, so that at the width the paper prints a figure (at most ~10% below its
natural size) no text is under 7 pt, the same router colours (Okabe-Ito, colour-blind
safe, fixed per router so a router looks the same in every figure), units on every axis, and line
dashes named in their legend ("CF 1.25 (dashed)") beside a line sample, so a reader decodes capacity
and top-k without comparing dashed symbols. The builders take the frames of moe_core.analysis.stats;
they compute nothing but plot geometry.

Rendering is offline through vl-convert (no browser); the theme is applied at render time, so a
builder's chart stays composable (concat, layer) before ``save``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import altair as alt
import pandas as pd
import vl_convert

from .load import LABELS, cf_order_value, same_validation
from .stats import TRAINED_SOURCE

# Okabe & Ito (2008), "Color universal design": distinguishable under the common colour-vision
# deficiencies. Yellow last: it is faint on white.
OKABE_ITO = ("#E69F00", "#56B4E9", "#009E73", "#0072B2", "#D55E00", "#CC79A7", "#000000", "#F0E442")
LABEL_COLORS = dict(zip(LABELS, ("#E69F00", "#56B4E9", "#0072B2", "#009E73", "#D55E00", "#000000")))
PLOT_WIDTH, PLOT_HEIGHT = 190, 120  # points (PDF/SVG units): with axes, ~3.3 in, one paper column
SMALL_WIDTH, SMALL_HEIGHT = 120, 85  # one panel of a faceted (page-wide) figure
CAPACITY_WIDTH = 88  # one panel of the capacity figures: four panels fit the page width at full size
PNG_SCALE = 3  # PNG pixels per point: ~216 dpi, sharp on slides
FORMATS = ("png", "svg", "pdf")
FONT_SIZE = 8  # points, every label, title and legend: >= 7 pt when the paper prints a figure at >= 90% of its size
LEGEND_COLUMNS = 2  # a column figure's legend stays within its ~250 pt
THEME = {
    "font": "Helvetica, Arial, sans-serif",
    "view": {"stroke": None},
    "axis": {"labelFontSize": FONT_SIZE, "titleFontSize": FONT_SIZE, "titleFontWeight": "normal",
             "gridColor": "#e5e5e5", "domainColor": "#777777", "tickColor": "#777777", "labelColor": "#222222",
             "titleColor": "#222222"},
    "header": {"labelFontSize": FONT_SIZE, "titleFontSize": FONT_SIZE, "titleFontWeight": "normal"},
    "legend": {"orient": "bottom", "direction": "horizontal", "columns": LEGEND_COLUMNS, "titleOrient": "left",
               "labelFontSize": FONT_SIZE, "titleFontSize": FONT_SIZE, "titleFontWeight": "normal",
               "titleLimit": 60, "columnPadding": 8, "rowPadding": 2, "padding": 0, "offset": 6,
               "symbolSize": 36, "symbolOpacity": 1, "labelLimit": 110,  # not a band's faded fill
               "layout": {"bottom": {"direction": "vertical", "anchor": "start", "margin": 4}}},  # legends stacked
    "title": {"fontSize": FONT_SIZE + 1, "fontWeight": "normal", "anchor": "start", "subtitleFontSize": FONT_SIZE},
    "text": {"fontSize": FONT_SIZE},
    "line": {"strokeWidth": 1.5},
    "point": {"size": 24, "filled": True},
    "range": {"category": list(OKABE_ITO)},
}
# Line dashes in legend order, each with the name its legend label gives it.
DASHES = (("solid", [1, 0]), ("dashed", [6, 3]), ("dotted", [1.5, 2.5]), ("dash-dot", [7, 2.5, 1.5, 2.5]),
          ("long dash", [12, 3]))
DASH_LEGEND_SYMBOL = 300  # symbol area (points^2) of a dash legend: a line sample ~17 pt long
CF_SHAPES = {"1.0": "circle", "1.25": "square", "1.5": "diamond", "2.0": "triangle-down", "dropless": "triangle-up"}
TRAINED_PANEL = "trained (Exp. A)"  # the capacity_drop panel of Experiment A's routers
STAT_UNITS = {"drop_rate": "drop rate (fraction of assignments)",
              "load_cv": "load CV (std/mean of tokens per expert)",
              "gate_entropy": "gate entropy (nats)",
              "p1_mean": "mean top-1 routing probability",
              "token_expert_mi": "token-expert mutual information (nats)"}
STAT_COLUMNS = 3  # panels per row of the routing statistics figure


# -- encodings --------------------------------------------------------------------------------------
def _label_color(frame: pd.DataFrame, field: str = "label", title: str = "router") -> alt.Color:
    """Routers in LABELS order with their fixed colours; anything else takes the next Okabe-Ito colour."""
    present = [v for v in frame[field].dropna().unique()]
    domain = [v for v in LABELS if v in present] + sorted(v for v in present if v not in LABELS)
    spare = iter(c for c in OKABE_ITO if c not in LABEL_COLORS.values())
    colors = [LABEL_COLORS.get(v) or next(spare, "#999999") for v in domain]
    return alt.Color(f"{field}:N", title=title, scale=alt.Scale(domain=domain, range=colors))


def _cf_domain(values) -> list[str]:
    return sorted({v for v in values if isinstance(v, str)}, key=cf_order_value)


def _with_variant(frame: pd.DataFrame) -> pd.DataFrame:
    """``variant``: 'CF 1.25', 'dropless' or 'dense FFN', one legend for line dash / point shape."""
    variant = [("dense FFN" if lab == "dense" else "dropless" if cf == "dropless" else f"CF {cf}")
               for lab, cf in zip(frame["label"], frame["cf_label"])]
    return frame.assign(variant=variant)


def _variant_domain(frame: pd.DataFrame) -> list[str]:
    return sorted(frame["variant"].unique(), key=lambda v: cf_order_value(v.removeprefix("CF ")) if v != "dense FFN"
                  else float("inf"))


def _dash(field: str, domain: list[str], title: str) -> alt.StrokeDash:
    """Line dash by ``field``, one of DASHES per value in ``domain`` order; the legend shows a line
    sample and names the dash in the label ("CF 1.25 (dashed)")."""
    if not domain:  # no data: nothing to name
        return alt.StrokeDash(f"{field}:N", title=title)
    styles = [DASHES[i % len(DASHES)] for i in range(len(domain))]
    label = "datum.label"
    for value, (dash_name, _) in reversed(list(zip(domain, styles))):
        label = f"datum.label == {json.dumps(value)} ? {json.dumps(f'{value} ({dash_name})')} : {label}"
    return alt.StrokeDash(f"{field}:N", title=title, scale=alt.Scale(domain=domain, range=[d for _, d in styles]),
                          legend=alt.Legend(symbolType="stroke", symbolSize=DASH_LEGEND_SYMBOL, symbolStrokeWidth=1.5,
                                            symbolStrokeColor="#222222", labelExpr=label))


def _band(frame: pd.DataFrame, mean: str, spread: str) -> pd.DataFrame:
    """``lo``/``hi`` = mean -/+ spread (0 where there is no spread: one seed)."""
    half = frame[spread].fillna(0.0)
    return frame.assign(lo=frame[mean] - half, hi=frame[mean] + half)


def _column_figure(layers: list, title: str, subtitle: str) -> alt.LayerChart:
    """Layers as one single-column figure with a title and a subtitle that says what the marks show."""
    return alt.layer(*layers).properties(width=PLOT_WIDTH, height=PLOT_HEIGHT,
                                         title=alt.Title(title, subtitle=subtitle))


def _ranked(frame: pd.DataFrame) -> pd.DataFrame:
    """The configs evaluated on the experiment's usual validation text (a split probe's losses are
    not on the same scale), with ``budget``, the token budget as a panel title, and ``cell``, one
    line per config and budget."""
    frame = same_validation(frame)
    tokens = frame["budget_tokens"] if "budget_tokens" in frame else pd.Series(math.nan, index=frame.index)
    budget = pd.Series([f"{t / 1e6:.3g}M tokens" if t == t else "" for t in tokens], index=frame.index, dtype=object)
    return frame.assign(budget_tokens=tokens, budget=budget, cell=frame["name"] + " @ " + budget)


def _by_budget(layers: list, df: pd.DataFrame, title: str, subtitle: str,
               independent: tuple[str, ...] = ("y",)) -> alt.LayerChart | alt.FacetChart:
    """One column figure, or, where the frame holds several token budgets, one panel per budget
    (smallest first, each with its own ``independent`` scales: the budgets differ more than configs do)."""
    if df["budget"].nunique() <= 1:
        return _column_figure([layer.properties(data=df) for layer in layers], title, subtitle)
    order = list(dict.fromkeys(df.sort_values("budget_tokens")["budget"]))
    return alt.layer(*layers, data=df).properties(width=SMALL_WIDTH, height=SMALL_HEIGHT).facet(
        column=alt.Column("budget:N", title=None, sort=order)).resolve_scale(
        **{channel: "independent" for channel in independent}).properties(
        title=alt.Title(title, subtitle=subtitle))


# -- Experiment A -----------------------------------------------------------------------------------
def frontier_chart(table: pd.DataFrame) -> alt.LayerChart | alt.FacetChart:
    """Throughput vs best validation perplexity per config (stats.run_table), 95% CI bars over
    seeds on both axes, the Pareto front as a dashed step, the dense baseline labelled; a panel per
    token budget where there are several."""
    df = _ranked(_with_variant(_band(_band(table, "best_val_ppl_mean", "best_val_ppl_ci95")
                                     .rename(columns={"lo": "y_lo", "hi": "y_hi"}),
                                     "median_tokens_per_s_mean", "median_tokens_per_s_ci95")))
    x = alt.X("median_tokens_per_s_mean:Q", title="training throughput (tokens/s, median; M = 1e6)",
              scale=alt.Scale(zero=False, nice=False, padding=8), axis=alt.Axis(format="~s", tickCount=4))
    y = alt.Y("best_val_ppl_mean:Q", title="best validation perplexity (per token)",
              scale=alt.Scale(zero=False, nice=False, padding=8))
    color = _label_color(df)
    domain = _variant_domain(df)
    shape = alt.Shape("variant:N", title="capacity", scale=alt.Scale(
        domain=domain, range=[CF_SHAPES.get(v.removeprefix("CF "), "cross") if v != "dense FFN" else "cross"
                              for v in domain]))
    base = alt.Chart()
    front = base.transform_filter("datum.pareto").mark_line(interpolate="step-after", strokeDash=[3, 2],
                                                            color="#999999", strokeWidth=1).encode(
        x=x, y=y, order="median_tokens_per_s_mean:Q")
    layers = [
        front,
        base.mark_rule(strokeWidth=1).encode(x=x, y="y_lo:Q", y2="y_hi:Q", color=color),
        base.mark_rule(strokeWidth=1).encode(x="lo:Q", x2="hi:Q", y=y, color=color),
        base.mark_point(size=40, filled=True, opacity=1).encode(x=x, y=y, color=color, shape=shape,
                                                                tooltip=["name", "n_runs"]),
        base.transform_filter("datum.label == 'dense'").mark_text(align="left", dx=6, fontSize=FONT_SIZE).encode(
            x=x, y=y, text=alt.value("dense")),
    ]
    return _by_budget(layers, df, "Throughput vs. perplexity", "mean ± 95% CI over seeds; dashed: Pareto front")


def training_curve_chart(curve: pd.DataFrame) -> alt.LayerChart | alt.FacetChart:
    """Validation loss vs training tokens (stats.curves): a line per config, band ±1 s.d. over seeds;
    a panel per token budget (each its own schedule) where there are several."""
    df = _ranked(_with_variant(_band(curve.dropna(subset=["val_loss_mean"]), "val_loss_mean", "val_loss_std")))
    x = alt.X("tokens:Q", title="training tokens", axis=alt.Axis(format="~s", tickCount=4))
    color = _label_color(df)
    dash = _dash("variant", _variant_domain(df), "capacity")
    band = alt.Chart().mark_area(opacity=0.18).encode(x=x, y="lo:Q", y2="hi:Q", color=color, detail="cell:N")
    line = alt.Chart().mark_line().encode(
        x=x, y=alt.Y("val_loss_mean:Q", title="validation loss (nats/token)", scale=alt.Scale(zero=False)),
        color=color, strokeDash=dash, detail="cell:N", tooltip=["name", "step", "val_loss_mean"])
    return _by_budget([band, line], df, "Training curves", "mean over seeds, band ±1 s.d.", independent=("x", "y"))


def routing_stats_chart(curve: pd.DataFrame, stats: tuple[str, ...] = tuple(STAT_UNITS)) -> alt.FacetChart:
    """Routing statistics (means over each eval interval's training steps) vs step, per config;
    one panel per statistic, its unit in the panel header. The dense baseline has none."""
    cols = [f"{s}_mean" for s in stats if f"{s}_mean" in curve]
    moe = _ranked(_with_variant(curve[curve["label"] != "dense"]))
    subtitle = "mean over each eval interval and seeds"
    if moe["budget"].nunique() > 1:  # the longest schedule shows the whole trajectory
        moe = moe[moe["budget_tokens"] == moe["budget_tokens"].max()]
        subtitle += f"; the {moe['budget'].iloc[0]} budget"
    long = moe.melt(id_vars=["name", "label", "variant", "step"], value_vars=cols, var_name="stat",
                    value_name="value").dropna(subset=["value"])
    long["stat"] = long["stat"].str.removesuffix("_mean").map(STAT_UNITS)
    return alt.Chart(long).mark_line(point=alt.OverlayMarkDef(size=12)).encode(
        x=alt.X("step:Q", title="training step", axis=alt.Axis(tickMinStep=1)), y=alt.Y("value:Q", title=None),
        color=_label_color(long), strokeDash=_dash("variant", _variant_domain(long) if len(long) else [], "capacity"),
        detail="name:N",
    ).properties(width=SMALL_WIDTH, height=SMALL_HEIGHT).facet(
        facet=alt.Facet("stat:N", title=None, sort=[STAT_UNITS[s] for s in stats]), columns=STAT_COLUMNS,
    ).resolve_scale(y="independent").properties(title=alt.Title(
        "Routing statistics during training", subtitle=subtitle))


def iso_flop_chart(curve: pd.DataFrame, budget: float | None = None) -> alt.LayerChart | alt.FacetChart:
    """Validation loss vs training FLOPs (tokens x train FLOPs per token), so k=1 and k=2 compare
    at equal compute; a vertical rule at the iso-FLOP budget of stats.loss_at_flops. With several
    token budgets, a panel per budget and no rule: their compared points are the ends of schedules."""
    df = _ranked(_with_variant(curve.dropna(subset=["val_loss_mean", "train_flops"])))
    x = alt.X("train_flops:Q", title="training FLOPs (T = 1e12, P = 1e15)",
              scale=alt.Scale(type="log", nice=False, padding=6), axis=alt.Axis(format="~s", tickCount=4))
    lines = alt.Chart().mark_line(point=alt.OverlayMarkDef(size=12)).encode(
        x=x, y=alt.Y("val_loss_mean:Q", title="validation loss (nats/token)", scale=alt.Scale(zero=False)),
        color=_label_color(df), strokeDash=_dash("variant", _variant_domain(df), "capacity"),
        detail="cell:N", tooltip=["name", "budget", "train_flops", "val_loss_mean"])
    if df["budget"].nunique() > 1:
        return _by_budget([lines], df, "Iso-FLOP comparison", "mean over seeds; compared at the ends of schedules",
                          independent=("x", "y"))
    layers, subtitle = [lines.properties(data=df)], "mean over seeds"
    if budget is not None and budget == budget:
        layers.append(alt.Chart(pd.DataFrame({"budget": [budget]})).mark_rule(strokeDash=[2, 2], color="#777777")
                      .encode(x="budget:Q"))
        subtitle += "; dotted: where the compared schedules end"
    return _column_figure(layers, "Iso-FLOP comparison", subtitle)


# -- Experiment B -----------------------------------------------------------------------------------
def _source_color(frame: pd.DataFrame) -> alt.Color:
    """Bench logit sources in black and greys (a checkpoint's in purple); trained routers from
    Experiment A in their router colours, as in every other figure."""
    sources = list(frame["source"].dropna().unique())
    bench = sorted(s for s in sources if not s.startswith(TRAINED_SOURCE))
    trained = sorted(s for s in sources if s.startswith(TRAINED_SOURCE))
    greys = iter(("#000000", "#8c8c8c", "#c0c0c0", "#595959"))
    colors = ["#CC79A7" if s == "checkpoint" else next(greys, "#999999") for s in bench]
    colors += [LABEL_COLORS.get(s.removeprefix(f"{TRAINED_SOURCE}: "), "#F0E442") for s in trained]
    short = f"replace(datum.label, {json.dumps(TRAINED_SOURCE + ': ')}, 'trained: ')"
    return alt.Color("source:N", title="routing", scale=alt.Scale(domain=bench + trained, range=colors),
                     legend=alt.Legend(labelExpr=short))


def _capacity_panels(frame: pd.DataFrame, y: alt.Y, tooltip: str, title: alt.Title,
                     ci: bool = False) -> alt.FacetChart:
    """``y`` vs capacity factor, a panel per E, colour = routing source, dash and shape = k; with
    ``ci``, rules from ``lo`` to ``hi``."""
    df = frame.assign(k=frame["top_k"].map(lambda k: f"k={int(k)}"),
                      experts=frame["experts"] if "experts" in frame else
                      frame["num_experts"].map(lambda e: f"E = {int(e)} experts"))
    x = alt.X("cf_label:O", title="capacity factor", sort=_cf_domain(df["cf_label"]),
              axis=alt.Axis(labelAngle=-40))  # upright, "2.0" and "dropless" overlap at SMALL_WIDTH
    color = _source_color(df)
    dash = _dash("k", sorted(df["k"].unique(), key=lambda k: int(k.removeprefix("k="))), "top-k")
    layers = [alt.Chart().mark_line(point=alt.OverlayMarkDef(size=18)).encode(
        x=x, y=y, color=color, strokeDash=dash, shape=alt.Shape("k:N", legend=None),
        tooltip=["source", "experts", "k", "cf_label", tooltip])]
    if ci:
        layers.append(alt.Chart().mark_rule().encode(x=x, y="lo:Q", y2="hi:Q", color=color))
    experts = list(dict.fromkeys(df.sort_values("num_experts", kind="stable")["experts"]))
    chart = alt.layer(*layers, data=df).properties(width=CAPACITY_WIDTH, height=SMALL_HEIGHT).facet(
        column=alt.Column("experts:N", title=None, sort=experts)).properties(title=title)
    return chart.resolve_scale(y="independent") if df["experts"].str.startswith(TRAINED_PANEL).any() else chart


def capacity_drop_chart(bench: pd.DataFrame, trained: pd.DataFrame | None = None) -> alt.FacetChart:
    """Dropped assignments (%) vs capacity factor (stats.bench_table), per E and k, for random and
    skewed logits and, from ``trained`` (stats.trained_drop_rates), trained routers."""
    cols = ["source", "num_experts", "top_k", "cf_label", "drop_rate_mean"]
    frame = bench[cols].assign(experts=bench["num_experts"].map(lambda e: f"E = {int(e)} experts"))
    if trained is not None and len(trained):  # its own panel: near zero, it would hide under the bench lines
        frame = pd.concat([frame, trained[cols].assign(experts=trained["num_experts"].map(
            lambda e: f"{TRAINED_PANEL}, E = {int(e)}"))], ignore_index=True)
    frame = frame.assign(drop_pct=100 * frame["drop_rate_mean"])
    return _capacity_panels(frame, alt.Y("drop_pct:Q", title="dropped assignments (%)"), "drop_pct",
                            alt.Title("Capacity factor vs. drops", subtitle="bench logits; trained routers: last "
                                      "eval interval of Exp. A (own y scale)"))


def capacity_throughput_chart(bench: pd.DataFrame) -> alt.FacetChart:
    """MoE layer forward + backward throughput (tokens/s) vs capacity factor, 95% CI over bench runs."""
    frame = _band(bench, "layer_tokens_per_s_mean", "layer_tokens_per_s_ci95")
    y = alt.Y("layer_tokens_per_s_mean:Q", title="MoE layer fwd+bwd (tokens/s)", scale=alt.Scale(zero=False),
              axis=alt.Axis(format="~s"))
    return _capacity_panels(frame, y, "layer_tokens_per_s_mean", alt.Title(
        "Capacity factor vs. throughput", subtitle="median per bench run; bars: 95% CI over bench runs"), ci=True)


def cf_vs_ppl_chart(table: pd.DataFrame) -> alt.TopLevelMixin:
    """Experiment A by capacity factor, main configs only: best perplexity per router (mean ± 95% CI
    over seeds), the dense baseline as a dashed horizontal line, a panel per token budget where there
    are several; with one budget, training tokens/s below it where the records have them."""
    df = _ranked(table)
    df = df[df["variant"] == ""] if "variant" in df else df
    moe = df[df["label"] != "dense"]
    x = alt.X("cf_label:O", title="capacity factor", sort=_cf_domain(moe["cf_label"]), axis=alt.Axis(labelAngle=0))
    color = _label_color(moe)

    def layers(mean: str, title: str, fmt: str | None = None) -> list:
        y = alt.Y(f"{mean}_mean:Q", title=title, scale=alt.Scale(zero=False),
                  axis=alt.Axis(format=fmt) if fmt else alt.Axis())
        routed = alt.Chart().transform_filter("datum.label != 'dense'")
        lo_hi = {"y": alt.Y("lo:Q", title=title), "y2": "hi:Q"}
        return [routed.mark_line(point=alt.OverlayMarkDef(size=20)).encode(x=x, y=y, color=color,
                                                                           tooltip=["name", "n_runs"]),
                routed.mark_rule().encode(x=x, color=color, **lo_hi),
                alt.Chart().transform_filter("datum.label == 'dense'").mark_rule(
                    strokeDash=[4, 3], color=LABEL_COLORS["dense"]).encode(y=f"{mean}_mean:Q")]

    title, subtitle = "Capacity factor in training (Exp. A)", "mean ± 95% CI over seeds; dashed: dense"
    ppl = _band(df, "best_val_ppl_mean", "best_val_ppl_ci95")
    chart = _by_budget(layers("best_val_ppl", "best val. perplexity (per token)"), ppl, title, subtitle)
    speed = moe["median_tokens_per_s_mean"] if "median_tokens_per_s_mean" in moe else pd.Series(dtype=float)
    if df["budget"].nunique() > 1 or not speed.notna().any():
        return chart
    tokens = alt.layer(*layers("median_tokens_per_s", "training tokens/s", "~s"),
                       data=_band(df, "median_tokens_per_s_mean", "median_tokens_per_s_ci95"))
    return alt.vconcat(chart.properties(title=alt.Title(title, subtitle=subtitle)),
                       tokens.properties(width=PLOT_WIDTH, height=SMALL_HEIGHT))


# -- output -----------------------------------------------------------------------------------------
def render(chart: alt.TopLevelMixin, fmt: str, scale: float = PNG_SCALE) -> bytes | str:
    """The chart with THEME as PNG (bytes, ``scale`` pixels per point), SVG (str) or PDF (bytes),
    rendered offline by vl-convert."""
    spec = chart.to_json()
    if fmt == "png":
        return vl_convert.vegalite_to_png(spec, scale=scale, config=THEME)
    if fmt == "svg":
        return vl_convert.vegalite_to_svg(spec, config=THEME)
    if fmt == "pdf":
        return vl_convert.vegalite_to_pdf(spec, config=THEME)
    raise ValueError(f"fmt: unknown {fmt!r}; valid: {', '.join(FORMATS)}")


def save(chart: alt.TopLevelMixin, name: str, figures_dir: str | Path = "figures") -> dict[str, Path]:
    """Write figures_dir/name.{png,svg,pdf}; returns the paths by format (show the PNG with
    IPython.display.Image(filename=paths['png']))."""
    out = Path(figures_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for fmt in FORMATS:
        data = render(chart, fmt)
        path = out / f"{name}.{fmt}"
        path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data)
        paths[fmt] = path
    return paths
