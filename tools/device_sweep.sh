#!/usr/bin/env bash
# Run (part of) a sweep on the lent GPU machine and bring its records back in one file.
# What ran Experiment A on one H100 (seed 0: 12 runs in 7m45s; seeds 1-2 plus one rerun: 25 runs in two
# calls; seeds 3-4: one call each, 8 and 5.5 minutes):
#
#   here:   SLIM=1 ../shared/device/build_wheelhouse.sh .whl papermill ipykernel altair vl-convert-python pytest
#           mkdir -p data && cp ../shared/data/tinystories_val.txt data/      # git-ignored, never committed
#   device: run(command="MOE_CORE_COMMIT=<git rev-parse --short HEAD> bash tools/device_sweep.sh \
#                        params/experiment_a.yaml '*_s1'", carry=[".whl", "data"])
#   here:   tar xzf /work/.device/<n>/experiment_a_records.tgz   # runs/ and executed/ records, no checkpoints
#
# Arguments after SECONDS go to the sweep, e.g. Experiment A v2 on both GPUs of an x2 machine:
#   device: MOE_CORE_COMMIT=<commit> bash tools/device_sweep.sh params/experiment_a_v2.yaml '*_s[01]' 560 \
#               --gpus 0,1 --runs-per-gpu 4
# With EXECUTED=0 the executed run notebooks (~0.3 MB each, their charts) stay on the device.
#
# The device copy has no .git, hence MOE_CORE_COMMIT for the run records. Finished runs are skipped,
# so a call cut short by the time limit is simply repeated -- after unpacking the records here: each
# call's copy of the working tree replaces the records the device holds (only ignored files such as
# checkpoints stay), and a run whose records are gone resumes from its final checkpoint, which
# rewrites config, metrics and summary from it.
set -uo pipefail
usage="usage: tools/device_sweep.sh PARAMS.yaml GLOB [SECONDS [SWEEP ARGS...]]"
params=${1:?$usage}
only=${2:?$usage}
seconds=${3:-540}
shift $(( $# < 3 ? $# : 3 ))
python3 -m pip install -q --upgrade --no-index --no-deps --target /tmp/site .whl/*.whl >/dev/null || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1
python3 -m ipykernel install --user --name python3 >/dev/null 2>&1  # the kernel papermill asks for
exp=$(python3 -c "import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))['experiment'])" "$params")
timeout "$seconds" python3 -m moe_core.sweep "$params" --only "$only" "$@" 2>&1 | grep -v -i "warn\|IPKernelApp"
dirs=("runs/$exp"); [ "${EXECUTED:-1}" = 0 ] || dirs+=("executed/$exp")
tar czf "$OUT/${exp}_records.tgz" --exclude checkpoint.pt "${dirs[@]}"
