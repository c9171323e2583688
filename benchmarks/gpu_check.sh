#!/usr/bin/env bash
# One run on a GPU machine with no network: every operator on CUDA against the CPU, then the medium
# benchmark on CUDA against mergekit --cuda in the same run, then the SVD methods per key. Logs go to $OUT
# (or ./gpu-logs).
#
# Wheels it installs (pydantic, POT, mergekit 0.1.5 and what they need beyond the machine's own
# packages, and mergebench's own wheel) are put in .whl/ beforehand:
#   pip wheel --no-deps -w .whl .  &&  pip download --no-deps --only-binary=:all: --python-version 3.12 ... -d .whl ...
# Usage: benchmarks/gpu_check.sh [size] [merges]
set -uo pipefail
size=${1:-medium}
merges=${2:-linear,task_arithmetic,ties,dare_ties,ties_global,lines}
repo=$PWD
logs=${OUT:-$repo/gpu-logs}
mkdir -p "$logs"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
cd /tmp || exit 1  # not the checkout: its mergebench/ folder is not the installed package
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(), torch.get_num_threads(), 'threads')"

timeout 200 python3 -m pytest -q -p no:cacheprovider "$repo/tests/test_devices.py" -rs 2>&1 | tee "$logs/devices.log" | tail -25

limit=150
[ "$size" = xl ] && limit=600  # the first xl merge writes the 31 GB of inputs first (about 4 minutes)
for merge in ${merges//,/ }; do
  timeout "$limit" python3 "$repo/benchmarks/bench.py" --size "$size" --device cuda --merges "$merge" --work /tmp/bench \
    --mergekit-command /tmp/site/bin/mergekit-yaml 2>&1 | tee -a "$logs/bench.log" | grep -v '^\s*$' | tail -4
done

# the per-matrix SVD methods, one Llama-7B FFN key each (CPU figures: benchmarks/RESULTS.md, "SVD methods")
timeout 300 python3 "$repo/benchmarks/svd_timing.py" --device cuda 2>&1 | tee "$logs/svd.log" | tail -3
