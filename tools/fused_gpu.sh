#!/usr/bin/env bash
# The fused backend on one GPU host, in one call: its CUDA tests, the layer bench at the shapes of its
# targets (fused beside grouped, padded, a dense FFN of equal active FLOPs and liger-kernel's fused MoE),
# eager and compiled, and a kernel profile of the fused path.
#
#   here:   SLIM=1 ../shared/device/build_wheelhouse.sh .whl liger-kernel pytest   (never a triton wheel:
#           the GPU's torch brings its own; without liger-kernel its column is a one-line note)
#   device: MOE_CORE_COMMIT=<commit> bash tools/fused_gpu.sh [STAGE ...]            (carry .whl)
#
# Stages, in this order for `all` (the default), each bounded by `timeout` and all of them together
# by BUDGET_S seconds (default 570, one 10-minute call); a stage the budget cannot start is reported
# as skipped. Every bench process times one shape, so a stage cut short keeps the shapes it finished.
# EAGER_CAP_S / COMPILED_CAP_S (default 150 / 120) bound each shape's process in those stages;
# SHAPE_FILTER (a bash regex) keeps the shapes matching it, e.g. swiglu, or 'k: [28]}$' for the GELU ones;
# BACKENDS (default [padded, grouped, fused, liger]) the layer bench's backends.
#   tests     pytest tests/test_fused.py tests/test_gpu.py on CUDA: the fused kernels compiled, float32
#             against loop, bf16 under autocast against float64, bench-size shapes against grouped,
#             bitwise determinism (every backend's bf16 check in test_gpu.py includes fused)
#   eager     layer bench, no compilation, backends padded, grouped, fused, liger, at
#             GELU CF 1.25: T=32k D=1024 (E=8 k=2 F=4096), (E=64 k=8 F=1024);
#             SwiGLU dropless (liger's like for like): T=32k D=1024 (E=8 k=2 F=2048), (E=64 k=8 F=512)
#   profile   torch.profiler kernel table of fused (and the dense FFN) at the two GELU shapes, eager
#   compiled  the layer bench again under torch.compile (default mode): MoE layer and dense alike
#   train     (not in `all`) the train bench, grouped against fused, in Experiment A's compile mode (CUDA graphs)
#   tiles     (not in `all`) the tile bench over the autotune lists, every step both ways of gathering and
#             of placing the activation (fused_tiles.jsonl, fused_tiles.log)
#   dispatch  (not in `all`) the dispatch cell's kernel profile (plan, gather, combine) at E8 k2 and
#             E64 k8, CF 1.25, and the capacity bench for fused (random and skewed routing, host-ahead)
# Records: OUT_DIR (default runs/benchmarks/fused_<date>) gets layer.{jsonl,csv}, layer_<run>.json, the
# layer bench's output per compile mode with the GEMMs' autotune choices (layer_<mode>.log),
# fused_gpu_tests.txt and fused_profile.txt (and train.*, fused_tiles.*, dispatch_profile.txt, capacity.*
# from the stages outside `all`); with $OUT set (a collecting folder), a tarball of it too.
set -uo pipefail
out=${OUT_DIR:-runs/benchmarks/fused_$(date +%Y%m%d)}
deadline=$((SECONDS + ${BUDGET_S:-570}))
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --upgrade --no-index --no-deps --target /tmp/site .whl/*.whl >/dev/null || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=index,name,memory.total,clocks.max.sm --format=csv,noheader || true
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
python3 -c "import liger_kernel.ops.fused_moe" 2>/dev/null && echo "liger-kernel: imports" \
    || echo "liger-kernel: does not import (its column will be a note)"

# capped SECONDS CMD...: CMD under `timeout`, at most SECONDS and never past the deadline
capped() {
    local cap=$1 left=$((deadline - SECONDS)); shift
    if [ "$left" -lt 30 ]; then echo "skipped (budget spent): $*"; return 0; fi
    timeout "$((cap < left ? cap : left))" "$@"
}

SHAPES=(
    "{tokens: 32768, dim: 1024, hidden: 4096, experts: 8, top_k: 2}"
    "{tokens: 32768, dim: 1024, hidden: 1024, experts: 64, top_k: 8}"
    "{tokens: 32768, dim: 1024, hidden: 2048, experts: 8, top_k: 2, activation: swiglu, capacity_factor: null}"
    "{tokens: 32768, dim: 1024, hidden: 512, experts: 64, top_k: 8, activation: swiglu, capacity_factor: null}"
)
layer_bench() {  # layer_bench CAP MODE: one process per shape (SHAPE_FILTER: those matching it)
    for shape in "${SHAPES[@]}"; do
        [[ "$shape" =~ ${SHAPE_FILTER:-.} ]] || continue
        TRITON_PRINT_AUTOTUNING=1 capped "$1" python3 -m moe_core.bench layer --device cuda --out "$out" \
            --set "shapes=[$shape]" --set "backends=${BACKENDS:-[padded, grouped, fused, liger]}" \
            --set "compile_modes=[$2]" 2>&1 | tee -a "$out/layer_$2.log"
    done
}

run_stage() {
    case $1 in
        tests) capped 450 python3 -m pytest -q -p no:cacheprovider --durations=15 tests/test_fused.py tests/test_gpu.py \
                   2>&1 | tee "$out/fused_gpu_tests.txt" ;;
        eager) layer_bench "${EAGER_CAP_S:-150}" none ;;  # a first call autotunes the Triton paths: SwiGLU with liger > 150 s
        profile) for shape in "8 2 4096" "64 8 1024"; do
                     capped 60 python3 -m moe_core.bench.profile layer fused $shape
                 done 2>&1 | tee -a "$out/fused_profile.txt" ;;
        compiled) layer_bench "${COMPILED_CAP_S:-120}" default ;;
        train) capped 580 python3 -m moe_core.bench train --device cuda --out "$out" \
                   --set "backends=[grouped, fused]" --set "compile_modes=[reduce-overhead]" ;;
        tiles) capped 400 python3 -m moe_core.bench.fused_tiles --autotuned --out "$out" 2>&1 | tee "$out/fused_tiles.log" ;;
        dispatch) for shape in "8 2 1.25" "64 8 1.25"; do
                      capped 60 python3 -m moe_core.bench.profile dispatch fused $shape
                  done 2>&1 | tee "$out/dispatch_profile.txt"
                  capped 240 python3 -m moe_core.bench capacity --device cuda --out "$out" --set backend=fused \
                      --set 'sources=[random, "skewed:1.0"]' ;;
        *) echo "unknown stage $1: tests | eager | profile | compiled | train | tiles | dispatch | all" >&2; return 2 ;;
    esac
}

stages=("$@")
[ ${#stages[@]} -eq 0 ] || [ "${stages[0]}" = all ] && stages=(tests eager profile compiled)
for s in "${stages[@]}"; do echo "== $s ($((deadline - SECONDS)) s of the budget left)"; run_stage "$s"; done
if [ -n "${OUT:-}" ]; then
    tar czf "$OUT/fused_records.tgz" "$out"
fi
