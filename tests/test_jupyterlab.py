"""The study as a reader meets it in JupyterLab, in a real browser: ``make lab`` serves a copy of the
notebooks on loopback; opening and saving each one leaves its bytes unchanged; train.ipynb runs, and
runs again (reusing the run), and analysis_a.ipynb runs on the committed Experiment A records, with no
stderr or error output; a screenshot of each is kept.

Slow and needs a browser, so it runs only with MOE_BROWSER_TEST=1, in a venv with the `notebooks` extra
(`make lab` installs it) and Playwright importable, driving Debian's Chromium:
    apt-get install -y chromium chromium-driver; pip install playwright
    MOE_BROWSER_TEST=1 .venv/bin/python -m pytest -q tests/test_jupyterlab.py
Screenshots go to MOE_BROWSER_SCREENSHOTS (default: the test's tmp directory).
"""
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

pytestmark = pytest.mark.skipif(os.environ.get("MOE_BROWSER_TEST") != "1", reason="set MOE_BROWSER_TEST=1")

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
# As root in a closed network: no sandbox, and none of Chromium's background connections.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
CELL_TIMEOUT_MS = 300_000
# Every cell in the page (JupyterLab's default windowing keeps only the visible ones), so images can be
# measured and a screenshot shows the whole notebook.
SETTINGS = {"@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
            "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false"}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """``make lab`` headless on loopback, serving a copy of notebooks/ (runs and caches land there);
    yields (base url, token, served root)."""
    pytest.importorskip("jupyterlab")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install -y chromium chromium-driver)")
    served = tmp_path_factory.mktemp("lab")
    shutil.copytree(ROOT / "notebooks", served / "notebooks")
    settings = tmp_path_factory.mktemp("lab_settings")
    for name, value in SETTINGS.items():
        (settings / name).parent.mkdir(parents=True, exist_ok=True)
        (settings / name).write_text(json.dumps(value))
    port, token = free_port(), secrets.token_hex(16)
    args = (f"--no-browser --ServerApp.root_dir={served} --IdentityProvider.token={token} "
            f"--LabApp.user_settings_dir={settings} --LabApp.expose_app_in_browser=True")
    log = (served / "lab.log").open("w")
    server = subprocess.Popen(["make", "-s", "-C", str(ROOT), "lab", f"VENV={sys.prefix}", f"PORT={port}",
                               f"ARGS={args}"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2)
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, (served / "lab.log").read_text()
                time.sleep(0.5)
        yield base, token, served
    finally:
        if server.poll() is None:
            os.killpg(server.pid, 15)
            server.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def page(lab):
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.on("dialog", lambda dialog: dialog.accept())  # leaving a notebook that ran: no prompt
        yield page
        browser.close()


def open_notebook(page, lab, path: str) -> None:
    """Open ``path`` in JupyterLab and wait until its kernel is idle."""
    base, token, _ = lab
    page.goto(f"{base}/lab/tree/{path}?token={token}&reset")
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=60_000)
    page.wait_for_function("() => { const w = window.jupyterapp.shell.currentWidget;"
                           " return w && w.sessionContext.session && w.sessionContext.session.kernel"
                           " && w.sessionContext.session.kernel.status === 'idle'; }", timeout=120_000)


def command(page, name: str) -> None:
    page.evaluate("name => window.jupyterapp.commands.execute(name)", name)


def outputs(page) -> list[dict]:
    """The outputs of every code cell of the open notebook, as nbformat dicts."""
    return page.evaluate("() => window.jupyterapp.shell.currentWidget.content.widgets"
                         ".filter(c => c.model.type === 'code').flatMap(c => c.model.outputs.toJSON())")


def run_all(page) -> list[dict]:
    """Clear and run every cell, wait until the last has run; return the stderr and error outputs."""
    command(page, "notebook:clear-all-cell-outputs")
    command(page, "notebook:run-all-cells")
    page.wait_for_function(
        "() => { const w = window.jupyterapp.shell.currentWidget; const cells = w.content.widgets;"
        " return cells.filter(c => c.model.type === 'code').every(c => c.model.executionCount !== null)"
        " && w.sessionContext.session.kernel.status === 'idle'; }", timeout=CELL_TIMEOUT_MS)
    return [o for o in outputs(page) if o.get("name") == "stderr" or o["output_type"] == "error"]


def stdout(page) -> str:
    return "".join(o["text"] if isinstance(o["text"], str) else "".join(o["text"])
                   for o in outputs(page) if o.get("name") == "stdout")


def screenshot(page, name: str, tmp_path: Path) -> Path:
    out = Path(os.environ.get("MOE_BROWSER_SCREENSHOTS", tmp_path))
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.png"
    panel = ".jp-NotebookPanel .jp-WindowedPanel-outer"
    height = page.eval_on_selector(panel, "p => p.scrollHeight")
    page.set_viewport_size({"width": 1400, "height": min(20_000, height + 200)})  # the whole notebook
    page.eval_on_selector(panel, "p => { p.scrollTop = 0; }")
    page.screenshot(path=str(path))
    page.set_viewport_size({"width": 1400, "height": 1000})
    print(f"screenshot: {path}")
    return path


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb")))
def test_opening_and_saving_a_notebook_changes_nothing(page, lab, name):
    """The committed metadata is what JupyterLab writes (kernelspec, language_info), so reading a
    notebook does not modify a tracked file."""
    open_notebook(page, lab, f"notebooks/{name}")
    saved = lab[2] / "notebooks" / name
    before = saved.stat().st_mtime_ns
    command(page, "docmanager:save")
    deadline = time.monotonic() + 30
    while saved.stat().st_mtime_ns == before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert saved.stat().st_mtime_ns != before, "JupyterLab did not save"
    assert saved.read_text() == (ROOT / "notebooks" / name).read_text()


def test_train_notebook_runs_and_reruns_quietly(page, lab, tmp_path):
    open_notebook(page, lab, "notebooks/train.ipynb")
    assert run_all(page) == []
    assert "60/60" in stdout(page)  # the progress bar, on stdout
    assert any("image/png" in o.get("data", {}) for o in outputs(page)), [o["output_type"] for o in outputs(page)]
    assert page.query_selector_all(".jp-RenderedImage img"), page.inner_html(".jp-NotebookPanel")[-3000:]
    screenshot(page, "train", tmp_path)
    assert run_all(page) == []  # the run exists: reused, and said so on stdout
    assert "already ok, not retrained" in stdout(page)


def test_analysis_notebook_shows_experiment_a(page, lab, tmp_path):
    """analysis_a on the committed Experiment A records (outputs in the served copy): every figure at
    reading size, tables formatted, no stderr."""
    served = lab[2]
    path = served / "notebooks" / "analysis_a_experiment_a.ipynb"
    nb = nbformat.read(ROOT / "notebooks" / "analysis_a.ipynb", as_version=4)
    params = dict(runs_dir=str(ROOT / "runs"), experiment="experiment_a", figures_dir="figures",
                  tables_dir="tables", numbers_path="tables/numbers_a.tex")
    next(c for c in nb.cells if "parameters" in c.metadata.get("tags", [])).source = "\n".join(
        f"{k} = {json.dumps(v)}" for k, v in params.items())
    nbformat.write(nb, path)
    open_notebook(page, lab, f"notebooks/{path.name}")
    assert run_all(page) == []
    widths = page.eval_on_selector_all(".jp-RenderedImage img", "imgs => imgs.map(i => i.clientWidth)")
    print("figure widths on screen:", widths)
    # frontier, training_curve, routing_stats (page-wide), iso_flop: one scale, so the wide one is wider
    assert len(widths) == 4 and min(widths) > 400 and widths[2] > 1.5 * widths[0], widths
    headers = page.eval_on_selector_all(".jp-RenderedHTMLCommon table thead tr", "rows => rows.map(r => r.innerText)")
    assert any(h.split()[0] == "verdict" for h in headers), headers
    screenshot(page, "analysis_a", tmp_path)
