"""Committed notebooks that reading does not change and that show nothing a reader cannot use.

notebooks/: no outputs (``make strip`` clears them) and the metadata JupyterLab writes when it saves
(kernelspec and ipykernel's language_info), so opening, running and saving one leaves ``git status``
clean once stripped. executed/: the archive of runs, outputs kept, but none naming a file of the
machine that ran it (a warning's source line). Neither cites an issue tracker. What train.ipynb
prints is on stdout: a stderr output is a red box in JupyterLab, kept for what needs the reader. The
analysis notebooks show figures at one screen scale, legends that name their dashes and rounded tables.
"""
import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import nbformat
import pandas as pd
import pytest

from moe_core.analysis import plots, view
from moe_core.train import TrainConfig, train
from moe_core.train.loop import quiet_inductor

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
EXECUTED = sorted((ROOT / "executed").rglob("*.ipynb"))
# What JupyterLab 4 writes on save with the ipykernel kernel; only the Python version is the machine's.
KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}
LANGUAGE_INFO = {"codemirror_mode": {"name": "ipython", "version": 3}, "file_extension": ".py",
                 "mimetype": "text/x-python", "name": "python", "nbconvert_exporter": "python",
                 "pygments_lexer": "ipython3"}
MACHINE_PATH = re.compile(r"(?<![\w.])/(?:opt|home|root|usr|work|tmp|var|Users)/\S+|site-packages|[A-Z]:\\\\")
ISSUE = re.compile(r"\bissues?\s*#?\d+\b|(?<![\w&#])#\d+\b", re.IGNORECASE)


def read(path: Path) -> nbformat.NotebookNode:
    return nbformat.read(path, as_version=4)


def strip_hint(path: Path) -> str:
    return f"{path.relative_to(ROOT)}: committed with outputs; clear them with `make strip`"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_without_outputs(path):
    ran = [i for i, c in enumerate(read(path).cells)
           if c.cell_type == "code" and (c.outputs or c.execution_count is not None)]
    assert not ran, f"{strip_hint(path)} (cells {ran})"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_metadata_is_what_jupyterlab_writes(path):
    meta = read(path).metadata
    info = dict(meta.get("language_info", {}))
    assert meta.get("kernelspec") == KERNELSPEC, path.name
    assert re.fullmatch(r"3\.\d+\.\d+", info.pop("version", "")), f"{path.name}: language_info.version"
    assert info == LANGUAGE_INFO, path.name
    assert set(meta) == {"kernelspec", "language_info"}, f"{path.name}: extra metadata {set(meta)}"


def test_make_strip_restores_the_committed_bytes(tmp_path):
    """What ``make strip`` runs, on a notebook that JupyterLab ran and saved: back to the committed file."""
    source = ROOT / "notebooks" / "train.ipynb"
    nb = read(source)
    for n, cell in enumerate(c for c in nb.cells if c.cell_type == "code"):
        cell.execution_count = n + 1
        cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text="ran\n")]
    ran = tmp_path / source.name
    nbformat.write(nb, ran)
    subprocess.run([sys.executable, "-m", "nbconvert", "--log-level=WARN", "--clear-output", "--inplace", str(ran)],
                   check=True)
    assert ran.read_text() == source.read_text()


@pytest.mark.parametrize("path", NOTEBOOKS + EXECUTED, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_issue_citations(path):
    cited = [m.group() for c in read(path).cells for m in ISSUE.finditer(c.source)]
    assert not cited, f"{path.relative_to(ROOT)} cites {cited}"


def output_texts(cell) -> list[str]:
    """The text a code cell shows: streams and the text/* parts of rich outputs (not images)."""
    texts = []
    for out in cell.get("outputs", []):
        if out.output_type == "stream":
            texts.append(out.text)
        else:
            texts += [v for k, v in out.get("data", {}).items() if k.startswith("text/")]
    return texts


@pytest.mark.parametrize("path", EXECUTED, ids=lambda p: str(p.relative_to(ROOT)))
def test_executed_notebook_shows_no_machine_path(path):
    shown = [t for c in read(path).cells for t in output_texts(c) if MACHINE_PATH.search(t)]
    assert not shown, f"{path.relative_to(ROOT)}: an output names a file of the machine that ran it: {shown[0][:200]!r}"


def test_training_progress_and_run_reuse_go_to_stdout(tmp_path, capfd):
    cfg = TrainConfig(dim=16, layers=1, heads=2, hidden=16, seq_len=16, batch_size=4, eval_windows=2, steps=2,
                      warmup=1, eval_interval=2, synthetic_chars=20_000, progress=True, out_dir=str(tmp_path / "runs"),
                      cache_dir=str(tmp_path / "cache"))
    train(cfg)
    first = capfd.readouterr()
    assert "2/2" in first.out and first.err == ""
    assert train(cfg).status == "ok"
    again = capfd.readouterr()
    assert "already ok, not retrained" in again.out and again.err == ""


def test_inductor_warnings_a_user_cannot_act_on_are_silenced():
    with warnings.catch_warnings(record=True) as seen, quiet_inductor():
        warnings.warn("TensorFloat32 tensor cores for float32 matrix multiplication available but not enabled.")
        warnings.warn("\nOnline softmax is disabled on the fly since Inductor decides to\nsplit the reduction.")
        warnings.warn("any other warning")
    assert [str(w.message) for w in seen] == ["any other warning"]


# -- what the analysis notebooks show ------------------------------------------------------------------
def test_table_for_reading():
    frame = pd.DataFrame({"name": ["a", "b", "c"], "tokens_per_s": [3476584.2, 2490738.0, 4074522.9],
                          "ppl": [4.313547, 3.5, float("nan")], "empty": [float("nan")] * 3, "n": [5, 5, 4],
                          "verdict": ["holds", "unresolved", "reversed"]})
    shown = view.table(frame, max_rows=2)
    html = shown.to_html()
    assert list(shown.data.columns) == ["verdict", "name", "tokens_per_s", "ppl", "n"]  # empty column gone
    assert ">3,476,584<" in html and ">4.31<" in html and ">3.50<" in html and "first 2 of 3 rows" in html
    assert ">tokens per s<" in html and len(shown.data) == 2
    empty = view.table(frame.iloc[:0]).data  # nothing to list: the header still says what would be
    assert list(empty.columns) == ["verdict", "name", "tokens_per_s", "ppl", "empty", "n"]


def test_figures_show_at_one_scale(tmp_path):
    """A figure twice as wide shows twice as wide: SCREEN_SCALE pixels per point, whatever its size."""
    import altair as alt

    for width in (100, 200):
        chart = alt.Chart(pd.DataFrame({"x": [1, 2]})).mark_point().encode(x="x:Q").properties(width=width, height=50)
        image = view.figure(chart, f"w{width}", tmp_path)
        points = float(re.search(r'<svg[^>]* width="([\d.]+)"', (tmp_path / f"w{width}.svg").read_text()).group(1))
        assert image.width == pytest.approx(points * view.SCREEN_SCALE, abs=2)


def test_capacity_legend_names_each_dash():
    curve = pd.DataFrame({"name": ["top1 cf1.0", "top1 cf1.25"], "label": ["top1", "top1"],
                          "cf_label": ["1.0", "1.25"], "tokens": [100, 100], "step": [1, 1],
                          "val_loss_mean": [2.0, 1.9], "val_loss_std": [0.1, 0.1]})
    spec = json.dumps(plots.training_curve_chart(curve).to_dict())
    assert "CF 1.0 (solid)" in spec and "CF 1.25 (dashed)" in spec and '"symbolType": "stroke"' in spec
