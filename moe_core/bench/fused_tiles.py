"""Which tiles make the fused backend's GEMMs fast on this GPU: each of the six GEMMs of one fused
forward + backward timed alone under every candidate configuration (row tile BM, column tile BN,
reduction tile BK, warps, pipeline stages; BI x BJ output tiles and BR rows for the weight
gradients), at the fused layer bench's shapes. The autotune lists of ``moe_core.fused.ops_triton``
are chosen from its output. CUDA only.

    python -m moe_core.bench.fused_tiles [--out DIR] [--filter SUBSTRING] [--autotuned]
    python -m moe_core.bench.fused_tiles --compare BEFORE.jsonl AFTER.jsonl
    python -m moe_core.bench.fused_tiles --best FILE.jsonl [--only TILES ...]

Prints, per (shape, GEMM, configuration), milliseconds and TFLOP/s (2 x kept rows x K x N per
product over the median time), then each GEMM's best and, per shape, the sum of one forward +
backward's steps with the gathers fused into the GEMMs' loads, with them done once beforehand, and
with the activation apart too (the GEMMs that read gathered rows are timed both ways, the two with
activation epilogues also as a plain GEMM followed by the activation's pass; gathers and passes
once). ``--autotuned`` times only the configurations the autotuner chooses among. Appends every row to DIR/fused_tiles.jsonl as
it is measured, so a run cut short keeps what it timed. A configuration that does not compile (too much
shared memory) gets a row with its error. ``--compare`` reads two such files (say, before and after a
kernel change) and prints, per shape and GEMM, the median over the configurations timed in both of
after / before time; ``--best`` reprints a file's per-GEMM bests and their sum per shape, among the
configurations ``--only`` names (their labels, e.g. "BM128 BN128 BK64 w8 s3") when given. No GPU
needed for either.

Legend: T tokens, D model dim, F expert hidden, E experts, N rows.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd
import torch

from ..config import MoEConfig
from ..fused import HAS_TRITON, make_plan
from ..moe import MoEFeedForward
from .timing import time_median_ms

if HAS_TRITON:
    import triton

    from ..fused import ops_triton

SHAPES = {  # the fused layer bench's shapes (tools/fused_gpu.sh): T 32k, D 1024, bf16
    "gelu E8 k2 F4096 cf1.25": dict(num_experts=8, top_k=2, hidden=4096, capacity_factor=1.25),
    "gelu E64 k8 F1024 cf1.25": dict(num_experts=64, top_k=8, hidden=1024, capacity_factor=1.25),
    "swiglu E8 k2 F2048 dropless": dict(num_experts=8, top_k=2, hidden=2048, activation="swiglu",
                                        capacity_factor=None),
    "swiglu E64 k8 F512 dropless": dict(num_experts=64, top_k=8, hidden=512, activation="swiglu",
                                        capacity_factor=None),
}
TOKENS, DIM = 32768, 1024
ROW_TILES = (64, 128)
GEMM_TILES = [(256, 64, 8, 3), (256, 64, 8, 4), (256, 32, 8, 4), (128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 8, 4),
              (128, 64, 4, 3), (128, 64, 4, 4), (128, 32, 4, 4), (64, 128, 4, 3), (64, 64, 4, 4), (64, 32, 4, 5)]
TN_TILES = [(128, 128, 32, 8, 3), (128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 256, 64, 8, 3),
            (256, 128, 64, 8, 3), (128, 128, 64, 4, 3), (128, 128, 128, 8, 2), (128, 64, 64, 4, 3),
            (64, 128, 64, 4, 4), (64, 64, 64, 4, 4)]
TIMING = dict(warmup=5, repeats=20)


def gemms(ops, layer: MoEFeedForward, x_TD: torch.Tensor, block_rows: int) -> dict:
    """The six GEMMs as (call, FLOPs), those that read a gathered operand both ways (``_pre``: from
    rows gathered beforehand), the two with activation epilogues without them (``_gemm_only``: one
    product) and followed by the activation's pass instead (``_apart``), the two gathers and the two
    activation passes (FLOPs 0): inputs of the right shapes (values do not change the time)."""
    routing = layer.router(x_TD, None, x_TD.shape[0])[0]
    plan = make_plan(routing, block_rows)
    ex = layer.experts
    w1, w2, w3 = ex.w1_EDF, ex.w2_EFD, ex.w3_EDF
    swiglu = w3 is not None
    N, (_, D, Fh) = plan.assign_N.numel(), w1.shape
    kept = int(plan.ends_E[-1])
    rand = lambda *shape: torch.randn(*shape, device=x_TD.device, dtype=x_TD.dtype)  # noqa: E731
    h, a, dy, xs, dys = rand(N, Fh), rand(N, Fh), rand(*x_TD.shape), rand(N, D), rand(N, D)
    g = rand(N, Fh) if swiglu else None
    weight_N = torch.rand(N, device=x_TD.device, dtype=torch.float32)
    w2t, w3t, token_N = w2.transpose(1, 2), w3.transpose(1, 2) if swiglu else None, plan.token_N
    products, flops = 2 if swiglu else 1, 2.0 * kept * D * Fh
    return {
        "up": (lambda: ops.up(x_TD, token_N, plan, w1, w3), products * flops),
        "up_pre": (lambda: ops.up(xs, None, plan, w1, w3), products * flops),
        "down": (lambda: ops.rows(a, w2, plan), flops),
        "act_grad": (lambda: ops.act_grad(dy, token_N, weight_N, plan, w2t, h, g), flops),
        "act_grad_pre": (lambda: ops.act_grad(dys, None, None, plan, w2t, h, g), flops),
        "up_apart": (lambda: ops.act(*ops.up(xs, None, plan, w1, w3, epilogue=False)[:2], plan), products * flops),
        "act_grad_apart": (lambda: ops.act_backward(ops.act_grad(dys, None, None, plan, w2t, h, g, epilogue=False)[0],
                                                    h, g, plan), flops),
        # the same two GEMMs without their activation epilogues: what the epilogues cost
        "up_gemm_only": (lambda: ops.rows(xs, w1, plan), flops),
        "act_grad_gemm_only": (lambda: ops.rows(dys, w2t, plan), flops),
        "dx": (lambda: ops.rows(h, w1.transpose(1, 2), plan, g, w3t), products * flops),
        "dw1": (lambda: ops.tn(x_TD, token_N, h, None, None, plan), flops),
        "dw1_pre": (lambda: ops.tn(xs, None, h, None, None, plan), flops),
        "dw2": (lambda: ops.tn(a, None, dy, token_N, weight_N, plan), flops),
        "dw2_pre": (lambda: ops.tn(a, None, dys, None, None, plan), flops),
        "gather_x": (lambda: ops.gather(x_TD, plan), 0.0),
        "gather_dy": (lambda: ops.gather(dy, plan, weight_N), 0.0),
        "act": (lambda: ops.act(h, g, plan), 0.0),
        "act_backward": (lambda: ops.act_backward(a, h, g, plan), 0.0),  # in place over a: values do not matter
    }


# One forward + backward's steps, with the gathers fused into the GEMMs' loads or done once beforehand,
# and with the activation in the GEMMs' epilogues or in passes of its own.
STEPS = {"gathers in the GEMMs": ("up", "down", "act_grad", "dx", "dw1", "dw2"),
         "gathers beforehand": ("gather_x", "gather_dy", "up_pre", "down", "act_grad_pre", "dx", "dw1_pre", "dw2_pre"),
         "gathers beforehand, activation apart": ("gather_x", "gather_dy", "up_apart", "down", "act_grad_apart", "dx",
                                                  "dw1_pre", "dw2_pre")}
GATHERS = ("gather_x", "gather_dy", "act", "act_backward")  # timed once: they have no tiles
NO_TILES = "-"


def autotuned_tiles() -> tuple[list, list]:
    """(GEMM_TILES, TN_TILES) cut to the configurations in ``ops_triton``'s autotune lists."""
    gemm = [(c.kwargs["BN"], c.kwargs["BK"], c.num_warps, c.num_stages) for c in ops_triton._GEMM_CONFIGS]
    tn = [(c.kwargs["BI"], c.kwargs["BJ"], c.kwargs["BR"], c.num_warps, c.num_stages) for c in ops_triton._TN_CONFIGS]
    return gemm, tn


def measure(name: str, shape: dict, out: Path | None, autotuned: bool = False) -> list[dict]:
    dev = torch.device("cuda")
    torch.manual_seed(0)
    cfg = MoEConfig(dim=DIM, router="softk", backend="fused", **{"activation": "gelu", **shape})
    with dev:
        layer = MoEFeedForward(cfg).to(torch.bfloat16)
    x_TD = torch.randn(TOKENS, DIM, device=dev, dtype=torch.bfloat16)
    rows = []
    default_tn = triton.Config({"BI": 128, "BJ": 128, "BR": 64}, num_warps=8, num_stages=3)
    default_gemm = triton.Config({"BN": 128, "BK": 64}, num_warps=8, num_stages=3)
    cases = [(ROW_TILES[-1], "gathers", None)]
    gemm_tiles, tn_tiles = autotuned_tiles() if autotuned else (GEMM_TILES, TN_TILES)
    row_tiles = [ops_triton.BLOCK_ROWS] if autotuned else ROW_TILES
    cases += [(bm, "gemm", tiles) for bm in row_tiles for tiles in gemm_tiles]
    cases += [(ROW_TILES[-1], "tn", tiles) for tiles in tn_tiles]  # the row tile does not matter to them
    with torch.no_grad():
        calls_by_rows = {bm: gemms(ops_triton, layer, x_TD, bm) for bm in ROW_TILES}
    for block_rows, kind, tiles in cases:
        calls = calls_by_rows[block_rows]
        if kind == "gathers":
            gemm, tn, names, label = default_gemm, default_tn, GATHERS, NO_TILES
        elif kind == "gemm":
            bn, bk, warps, stages = tiles
            gemm, tn, names = triton.Config({"BN": bn, "BK": bk}, num_warps=warps, num_stages=stages), default_tn, \
                ("up", "up_pre", "up_gemm_only", "up_apart", "down", "act_grad", "act_grad_pre",
                 "act_grad_gemm_only", "act_grad_apart", "dx")
            label = f"BM{block_rows} BN{bn} BK{bk} w{warps} s{stages}"
        else:
            bi, bj, br, warps, stages = tiles
            gemm, tn, names = default_gemm, triton.Config({"BI": bi, "BJ": bj, "BR": br}, num_warps=warps,
                                                          num_stages=stages), ("dw1", "dw1_pre", "dw2", "dw2_pre")
            label = f"BI{bi} BJ{bj} BR{br} w{warps} s{stages}"
        with ops_triton.fixed_tiles(gemm, tn):
            for gemm_name in names:
                call, flops = calls[gemm_name]
                row = {"shape": name, "gemm": gemm_name, "tiles": label, "block_rows": block_rows}
                try:
                    ms = time_median_ms(lambda _: call(), [None], dev, **TIMING)
                    row.update(ms=ms, tflops=flops / ms / 1e9)
                    print(f"{name:30s} {gemm_name:9s} {label:28s} {ms:7.3f} ms {row['tflops']:6.0f} TFLOP/s",
                          flush=True)
                except Exception as err:  # a configuration the GPU cannot hold: recorded, the sweep goes on
                    row["error"] = f"{type(err).__name__}: {str(err)[:200]}"
                    print(f"{name:30s} {gemm_name:9s} {label:28s} {row['error']}", flush=True)
                rows.append(row)
                if out is not None:
                    with open(out / "fused_tiles.jsonl", "a") as f:
                        f.write(json.dumps({**row, "gpu": torch.cuda.get_device_name(dev)}) + "\n")
    return rows


def best(rows: list[dict], only: list[str] | None = None) -> None:
    """Each GEMM's fastest configuration (among ``only``'s tile labels when given; the gathers have
    none), then per shape and way of gathering the sum of its steps' best times: one forward +
    backward with each GEMM at its best tiles."""
    timed = [r for r in rows if "ms" in r and (not only or r["tiles"] in (*only, NO_TILES))]
    tops = {}
    for key in sorted({(r["shape"], r["gemm"]) for r in timed}):
        tops[key] = top = min((r for r in timed if (r["shape"], r["gemm"]) == key), key=lambda r: r["ms"])
        print(f"best {key[0]:30s} {key[1]:12s} {top['tiles']:28s} {top['ms']:7.3f} ms {top['tflops']:6.0f} TFLOP/s")
    for shape in sorted({shape for shape, _ in tops}):
        for way, steps in STEPS.items():
            if all((shape, step) in tops for step in steps):
                total = sum(tops[shape, step]["ms"] for step in steps)
                print(f"sum  {shape:30s} {total:7.3f} ms, {way} (the steps' best times added)")


def compare(before: Path, after: Path) -> pd.DataFrame:
    """Per (shape, GEMM): configurations timed in both files, and the median, least and largest of
    after / before milliseconds over them."""
    frames = [pd.read_json(path, lines=True) for path in (before, after)]
    timed = [f[f["ms"].notna()] if "ms" in f else f.iloc[:0] for f in frames]
    both = timed[0].merge(timed[1], on=["shape", "gemm", "tiles"], suffixes=("_before", "_after"))
    ratio = both.assign(ratio=both["ms_after"] / both["ms_before"]).groupby(["shape", "gemm"])["ratio"]
    return ratio.agg(["count", "median", "min", "max"]).reset_index()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moe_core.bench.fused_tiles", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="folder for fused_tiles.jsonl")
    parser.add_argument("--filter", default="", help="only the shapes whose name contains this")
    parser.add_argument("--autotuned", action="store_true", help="only the configurations autotune chooses among")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"),
                        help="two fused_tiles.jsonl files: after / before time per shape and GEMM")
    parser.add_argument("--best", type=Path, metavar="FILE", help="a fused_tiles.jsonl: its bests and their sums")
    parser.add_argument("--only", nargs="+", metavar="TILES", help="with --best: only these tile labels")
    args = parser.parse_args(argv)
    files = [*(args.compare or []), *([args.best] if args.best else [])]
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        print(f"fused_tiles: no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    if args.compare:
        print(compare(*args.compare).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        return 0
    if args.best:
        best([json.loads(line) for line in args.best.read_text().splitlines()], args.only)
        return 0
    if not torch.cuda.is_available():
        print("fused_tiles: needs CUDA (the fused kernels compile for a GPU only)", file=sys.stderr)
        return 2
    shapes = {k: v for k, v in SHAPES.items() if args.filter in k}
    if not shapes:
        print(f"fused_tiles: --filter {args.filter!r} matches none of {list(SHAPES)}", file=sys.stderr)
        return 2
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    rows = [row for name, shape in shapes.items() for row in measure(name, shape, args.out, args.autotuned)]
    best(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
