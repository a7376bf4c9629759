"""The paper and slides build with `make paper` (latexmk) from the committed generated inputs, in a
temporary copy of paper/ and figures/: the paper's body runs to at least six pages before the
references, the slides have 8-12 frames, and neither log reports an undefined reference, citation
or number macro. Skipped where latexmk is missing (CI installs TeX Live, so there it runs).

Also: the committed number macros of moe_core.analysis.paper are what the script makes from the
committed bench records and params files (so they were regenerated, not edited), the commands the
appendix lists are the ones `make paper-inputs paper` runs, and the README's results quote the
generated markdown verbatim."""
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEX_INSTALL = ("apt-get install -y --no-install-recommends texlive-latex-base texlive-latex-recommended "
               "texlive-fonts-recommended texlive-pictures latexmk")
BUILD_PRODUCTS = ("*.pdf", "*.aux", "*.bbl", "*.blg", "*.fdb_latexmk", "*.fls", "*.log", "*.nav", "*.out",
                  "*.snm", "*.toc", "*.vrb", "*.synctex.gz")
UNDEFINED = re.compile(r"(Reference|Citation|Number macro|Claim) .*undefined|There were undefined|the records say")
MAX_PRINT_LINE = 79  # TeX wraps log lines at this width


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """`make paper` in a copy of the repository's Makefile, paper/ (sources only) and figures/."""
    if shutil.which("latexmk") is None:
        pytest.skip(f"latexmk is not installed, so the paper cannot be built here; on Debian: {TEX_INSTALL}")
    root = tmp_path_factory.mktemp("paper_build")
    shutil.copy(ROOT / "Makefile", root / "Makefile")
    shutil.copytree(ROOT / "paper", root / "paper", ignore=shutil.ignore_patterns(*BUILD_PRODUCTS))
    shutil.copytree(ROOT / "figures", root / "figures")
    result = subprocess.run(["make", "-C", str(root), "paper"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"make paper failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return root / "paper"


def log_lines(path: Path) -> list[str]:
    """The log's logical lines: TeX's wrapped lines (exactly MAX_PRINT_LINE long) joined back."""
    lines, current = [], ""
    for line in path.read_text(errors="replace").splitlines():
        current += line
        if len(line) != MAX_PRINT_LINE:
            lines.append(current)
            current = ""
    return lines + [current] if current else lines


def test_pdfs_built(built):
    for name in ("main.pdf", "slides.pdf"):
        assert (built / name).stat().st_size > 10_000, name


def test_paper_body_at_least_six_pages(built):
    aux = (built / "main.aux").read_text()
    match = re.search(r"\\newlabel\{lastbodypage\}\{\{[^{}]*\}\{(\d+)\}", aux)
    assert match, "main.tex lost \\label{lastbodypage} before the bibliography"
    assert int(match.group(1)) >= 6, f"body ends on page {match.group(1)}: the paper needs >= 6 pages before references"


def test_slides_have_8_to_12_frames(built):
    nav = (built / "slides.nav").read_text()
    match = re.search(r"\\inserttotalframenumber\s*\{(\d+)\}", nav)
    assert match, "beamer wrote no \\inserttotalframenumber"
    assert 8 <= int(match.group(1)) <= 12, f"{match.group(1)} frames"


@pytest.mark.parametrize("name", ["main", "slides"])
def test_no_undefined_references_citations_or_numbers(built, name):
    bad = [line for line in log_lines(built / f"{name}.log") if UNDEFINED.search(line)]
    assert not bad, "\n".join(bad)


def shell_commands(text: str) -> list[str]:
    """One line per command: backslash continuations joined, runs of whitespace made one space."""
    return [" ".join(line.split()) for line in text.replace("\\\n", " ").splitlines() if line.strip()]


def test_appendix_commands_are_the_makefiles():
    """The verbatim list after "make -n prints" in main.tex equals `make -n paper-inputs paper`
    (the venv's bin/ prefix dropped, the latexmk check left out)."""
    made = subprocess.run(["make", "-s", "-n", "-o", ".venv/.installed", "paper-inputs", "paper", "BIN=BIN"],
                          capture_output=True, text=True, check=True, cwd=ROOT).stdout
    expected = [c.replace("BIN/python ", "python ") for c in shell_commands(made) if not c.startswith("command -v")]
    tex = (ROOT / "paper" / "main.tex").read_text()
    listed = re.search(r"make -n\} prints\):.*?\\begin\{verbatim\}\n(.*?)\\end\{verbatim\}", tex, re.S)
    assert listed, "main.tex lost the appendix's command list (after 'make -n} prints):')"
    assert shell_commands(listed.group(1)) == expected


def test_readme_results_quote_the_generated_markdown():
    """Every line README quotes between its markers is a line of paper/tables/experiment_a_v2_results.md,
    verbatim, and each quote holds at least one table row beyond its header."""
    generated = set((ROOT / "paper" / "tables" / "experiment_a_v2_results.md").read_text().splitlines())
    quotes = re.findall(r"<!-- quoted from paper/tables/experiment_a_v2_results.md -->\n(.*?)\n<!-- end of quotes -->",
                        (ROOT / "README.md").read_text(), re.S)
    assert quotes, "README.md lost the markers around its quotes of the generated results"
    for quote in quotes:
        lines = quote.splitlines()
        assert len(lines) >= 3, f"a quote with no row: {quote}"
        assert [line for line in lines if line not in generated] == [], \
            "README.md quotes lines that paper/tables/experiment_a_v2_results.md does not hold"


def test_tool_number_macros_are_regenerated_not_edited(tmp_path):
    """moe_core.analysis.paper on the bench directories the committed file names reproduces both files."""
    committed = (ROOT / "paper" / "numbers_bench.tex").read_text()
    dirs = {}
    for macro, option in (("BenchDir", "--bench-dir"), ("CapDir", "--capacity-dir"),
                          ("CompiledDir", "--compiled-layer-dir"), ("LatestDir", "--latest-dir")):
        found = re.search(rf"\\newcommand\{{\\{macro}\}}\{{(.*)\}}", committed)
        assert found, f"paper/numbers_bench.tex has no \\{macro}"
        dirs[option] = str(ROOT / "runs" / "benchmarks" / found.group(1).replace("\\_", "_"))
    subprocess.run([sys.executable, "-m", "moe_core.analysis.paper", *(x for kv in dirs.items() for x in kv),
                    "--out-dir", str(tmp_path)], check=True, capture_output=True, timeout=60, cwd=ROOT)
    for name in ("numbers_bench.tex", "numbers_setup.tex"):
        assert (tmp_path / name).read_text() == (ROOT / "paper" / name).read_text(), \
            f"paper/{name} differs from what moe_core.analysis.paper writes: rerun it, do not edit the file"


def test_compiled_layer_numbers_stay_on_the_bench_gpu(tmp_path):
    """A newer compiled layer run on another GPU does not replace the paper's (one GPU's) numbers."""
    from moe_core.analysis.paper import newest_compiled

    for name, device, run_id, mode in (("h100_old", "H100", "20261126T1", "default"),
                                       ("h200_new", "H200", "20261128T1", "default"),
                                       ("h100_eager", "H100", "20261127T1", "none")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "layer.csv").write_text(f"device_name,compile_mode,run_id\n{device},{mode},{run_id}\n")
    assert newest_compiled(tmp_path, "H100") == tmp_path / "h100_old"
    assert newest_compiled(tmp_path, "H200") == tmp_path / "h200_new"
    assert newest_compiled(tmp_path, "A100") is None


# The page geometry of moestudy.sty (letterpaper, 0.7 in side margins, 0.25 in column gap), in PDF points.
TEXT_WIDTH = (8.5 - 2 * 0.7) * 72
COLUMN_WIDTH = (TEXT_WIDTH - 0.25 * 72) / 2
MIN_PRINTED_PT = 7


def test_figures_print_with_fonts_of_at_least_7pt():
    """Every figure main.tex includes, at the width it prints, keeps plots.FONT_SIZE text >= 7 pt."""
    from moe_core.analysis.plots import FONT_SIZE
    tex = (ROOT / "paper" / "main.tex").read_text()
    included = re.findall(r"\\includegraphics\[width=([\d.]*)\\(columnwidth|textwidth)\]\{(\w+)\}", tex)
    assert len(included) >= 8, included
    small = []
    for fraction, unit, name in included:
        media = re.search(rb"/MediaBox\s*\[\s*0\s+0\s+([\d.]+)", (ROOT / "figures" / f"{name}.pdf").read_bytes())
        printed = float(fraction or 1) * (COLUMN_WIDTH if unit == "columnwidth" else TEXT_WIDTH)
        if FONT_SIZE * printed / float(media.group(1)) < MIN_PRINTED_PT:
            small.append(f"{name}: {FONT_SIZE * printed / float(media.group(1)):.1f} pt")
    assert not small, small
