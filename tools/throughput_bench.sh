#!/usr/bin/env bash
# Sweep throughput on a GPU host, every figure in one command (or one stage per call where a call is
# time-limited). Records go to OUT_DIR (default runs/benchmarks/throughput) and, with $OUT set (a
# collecting folder), a tarball of it is left there.
#
#   here:   SLIM=1 ../shared/device/build_wheelhouse.sh .whl papermill ipykernel altair vl-convert-python pytest
#           mkdir -p data && cp ../shared/data/tinystories_val.txt data/      # git-ignored, never committed
#   device: MOE_CORE_COMMIT=<commit> bash tools/throughput_bench.sh [STAGE]    (carry .whl and data)
#
# Stages, in this order for `all` (the default); each call of a bench is bounded by `timeout`:
#   warm    Experiment A's 12 configurations, 4 steps each, 4 workers per GPU, into /tmp: fills the
#           Inductor cache (a new machine compiles cold; the sweep bench's cache_warm column says so)
#   tests   the CUDA tests of tests/test_throughput.py: compiled evaluation against eager, and
#           compiled runs repeated in one process (what a kept kernel does)
#   solo    the solo timing pass: every configuration of Experiment A trained alone, 3 repeats
#           (median tokens/s and CV): the tokens/s the analysis's frontier takes (load_experiment's
#           bench_dir=OUT_DIR)
#   modes   12 runs (seed 0 of every configuration) on the first GPU, 1 run per GPU: a fresh kernel
#           per run (as before) against kept kernels: what kept kernels save, phase by phase
#   share   the same 12 runs with 2 and then 4 runs per GPU (kept kernels)
#   full    Experiment A's 60 runs on the first GPU alone, then on every GPU (GPUS, default: all;
#           FULL_ARGS="--set first_gpu_alone=false" skips the single-GPU cell),
#           RUNS_PER_GPU (default 4) per GPU: the targets' figures
# Each sweep bench cell prints its phase breakdown and is appended to OUT_DIR/sweep.jsonl as it
# finishes, so a stage cut short keeps its finished cells. Stages take minutes each (about 25 in all
# on one H100 with warm caches): where a call is limited to 10 minutes, run one stage per call.
set -uo pipefail
stage=${1:-all}
out=${OUT_DIR:-runs/benchmarks/throughput}
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --upgrade --no-index --no-deps --target /tmp/site .whl/*.whl >/dev/null || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1
python3 -m ipykernel install --user --name python3 >/dev/null 2>&1  # the kernel papermill asks for
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader || true
gpus=${GPUS:-$(nvidia-smi --query-gpu=index --format=csv,noheader | paste -sd, -)}
quiet() { grep -v -i "warn\|IPKernelApp\|it/s\]\|run/s\]"; }

first=${gpus%%,*}
bench_sweep() { timeout 580 python3 -m moe_core.bench sweep --device cuda --out "$out" "$@" 2>&1 | quiet; }

run_stage() {
    case $1 in
        warm) timeout 580 python3 -m moe_core.sweep params/experiment_a.yaml --only '*_s0' --gpus "$gpus" \
                  --runs-per-gpu 4 --runs-dir /tmp/warm/runs --executed-dir /tmp/warm/executed \
                  --set steps=4 --set warmup=1 --set eval_interval=2 2>&1 | quiet ;;
        tests) timeout 580 python3 -m pytest -q tests/test_throughput.py -k compiled -p no:cacheprovider ;;
        solo) timeout 580 python3 -m moe_core.bench train --device cuda --out "$out" \
                  --set experiment_params=params/experiment_a.yaml --set steps=60 2>&1 | quiet ;;
        modes) bench_sweep --gpus "$first" --runs 12 --runs-per-gpu 1 --set 'kernels=[fresh, reuse]' ;;
        share) bench_sweep --gpus "$first" --runs 12 --runs-per-gpu 2,4 ;;
        full) bench_sweep --gpus "$gpus" --runs 60 --runs-per-gpu "${RUNS_PER_GPU:-4}" ${FULL_ARGS:-} ;;
        *) echo "unknown stage $1: warm | tests | solo | modes | share | full | all" >&2; return 2 ;;
    esac
}

if [ "$stage" = all ]; then
    for s in warm tests solo modes share full; do echo "== $s"; run_stage "$s"; done
else
    run_stage "$stage"
fi
if [ -n "${OUT:-}" ]; then
    tar czf "$OUT/throughput_records.tgz" "$out"
fi
