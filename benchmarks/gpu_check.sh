#!/usr/bin/env bash
# Every GPU check of issue 19 in one call of at most 8 minutes:
#   the per-platform choices (benchmarks.choices), TrAct's extra ms on the first layer
#   and per step next to torch_tract (benchmarks.first_layer, benchmarks.overhead), then
#   the test suite on the GPU. Results land in one folder: $OUT where the device tool
#   sets it (8 files at most come back), else benchmarks/results/gpu/.
#
# With the device tool (torch_tract is not on its machine; carry its wheel):
#   here, once: echo /.whl/ >> .git/info/exclude
#               python3 -m pip download --no-deps -d .whl torch_tract==1.0.0
#   then:       run(command='bash benchmarks/gpu_check.sh', carry=['.whl'], timeout_s=540)
# The benchmarks come first: they are what a lease is for, and the suite takes whatever
# time is left (3.7 minutes with 16 workers on the first H100).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results/gpu}
mkdir -p "$out"
log="$out/gpu_check.log"
work=$(mktemp -d)

if compgen -G '.whl/*.whl' >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # the suite's workers share the GPU

step() {  # step SECONDS NAME COMMAND...: run it, time it, log it
    local limit=$1 name=$2
    shift 2
    echo "== $name ($(date -u +%T), limit ${limit}s): $*" | tee -a "$log"
    local start=$SECONDS
    timeout "$limit" "$@" >>"$log" 2>&1
    echo "== $name: exit $? after $((SECONDS - start)) s" | tee -a "$log"
}

{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python3 -c 'import jax, flax, optax; print("jax", jax.__version__, jax.devices(), "flax", flax.__version__, "optax", optax.__version__)'
    python3 -c 'import torch, torch_tract; print("torch", torch.__version__, torch.cuda.get_device_name())' || echo 'no torch_tract: tract_jax only'
} >>"$log" 2>&1

step 90 choices python3 -m benchmarks.choices --runs 20 --out "$work"
step 100 first_layer python3 -m benchmarks.first_layer --runs 40 --out "$work"
step 150 overhead python3 -m benchmarks.overhead --pairs 20 --warmup 3 --out "$work"
step 150 suite python3 -m pytest -q -n 16 -p no:cacheprovider -o addopts='--doctest-modules'

for f in choices_gpu.md choices_gpu.json first_layer.json overhead.json overhead.md first_layer.md; do
    [ -f "$work/$f" ] && cp "$work/$f" "$out/"
done
grep -E '^(FAILED|ERROR)|passed|failed' "$log" | tail -40
echo "results in $out: $(ls "$out" | tr '\n' ' ')"
