"""Notebook views of one run: altair charts of its metric rows, rendered offline to PNG."""

from __future__ import annotations

from .loop import RunResult


def plot_run(result: RunResult):
    """Loss curves, interval-mean routing statistics and the final per-layer expert load (altair)."""
    import altair as alt  # imported on use: DDP ranks and the sweep import moe_core.train, not the charts
    import pandas as pd

    df = pd.DataFrame(result.metrics)
    if df.empty:  # e.g. diverged before the first evaluation
        return alt.Chart(pd.DataFrame({"note": [f"{result.status}: no evaluations recorded"]})).mark_text().encode(
            text="note:N")

    def lines(columns: tuple[str, ...], series: str, value: str, title: str):
        # null (e.g. hash's gate entropy) dropped: NaN is not valid Vega-Lite JSON
        long = df.melt("step", [c for c in columns if c in df], series, value).dropna()
        return alt.Chart(long).mark_line(point=True).encode(
            x="step:Q", y=alt.Y(f"{value}:Q", scale=alt.Scale(zero=False)), color=f"{series}:N",
        ).properties(title=title, width=260, height=180)

    charts = [lines(("train_loss", "val_loss", "val_loss_noncausal"), "series", "nats/token", "loss")]
    if "expert_load" in df:
        charts.append(lines(("drop_rate", "token_drop_rate", "load_cv", "max_vio", "gate_entropy"), "stat", "value",
                            "routing (interval means)"))
        load = pd.DataFrame([{"layer": layer, "expert": e, "share": share}
                             for layer, shares in enumerate(df["expert_load"].iloc[-1])
                             for e, share in enumerate(shares)])
        charts.append(alt.Chart(load).mark_rect().encode(
            x="expert:O", y="layer:O", color=alt.Color("share:Q", scale=alt.Scale(scheme="viridis", domainMin=0)),
            tooltip=["layer", "expert", "share"],
        ).properties(title="expert load, last interval", width=160, height=180))
    return alt.hconcat(*charts)


def chart_png(chart, scale: float = 2.0) -> bytes:
    """Render an altair chart to PNG offline (vl-convert), for IPython.display.Image."""
    import vl_convert

    return vl_convert.vegalite_to_png(chart.to_json(), scale=scale)
