#!/usr/bin/env bash
# The expert-parallel benchmark (moe_core.bench.expert_parallel) on one GPU host: NPROC ranks
# (default 2) under torchrun with NCCL, the default GPU grid (T=16384 tokens per rank, D=1024,
# F=2048, E in {8, 64}, k in {1, 2}, CF in {1.0, 1.25, 2.0, dropless}, random and Zipf-skewed logits).
#
#   MOE_CORE_COMMIT=$(git rev-parse --short HEAD) bash tools/ep_bench.sh [OUT_DIR] [bench args...]
#   e.g.  bash tools/ep_bench.sh runs/expert_parallel --checkpoint runs/experiment_a/RUN/checkpoint.pt
#         NPROC=4 bash tools/ep_bench.sh runs/expert_parallel_w4 --set 'experts=[8, 64]'
#
# MOE_CORE_COMMIT names the commit in the records when the copy has no .git. Wheels in .whl/ (for
# example pandas and pyyaml, if the machine lacks them) are installed first when present. Records:
# OUT_DIR/expert_parallel.{jsonl,csv} and OUT_DIR/expert_parallel_<run_id>.json; with $OUT set (a
# collecting folder), a tarball of OUT_DIR is left there too.
set -euo pipefail
out=${1:-runs/expert_parallel}
shift || true
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --upgrade --no-index --no-deps --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 OMP_NUM_THREADS=4
# NVLink multicast stays off (shared hosts; all-to-all does not use it).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader || true
python3 -m torch.distributed.run --standalone --nproc-per-node "${NPROC:-2}" \
    -m moe_core.bench.expert_parallel --device cuda --out "$out" "$@"
if [ -n "${OUT:-}" ]; then
    tar czf "$OUT/expert_parallel_records.tgz" "$out"
fi
