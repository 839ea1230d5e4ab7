#!/usr/bin/env bash
# The GPU checks, each a step of its own; name the ones to run (default: all, in this order):
#   kernel       the Pallas kernel compiled by Triton against float64 NumPy (its GPU tests
#                in tests/test_gram_by_kernel.py; on a failure nothing is timed), then the
#                ResNet-50 and CIFAR ResNet-18 steps with the statistic in it
#                (benchmarks.overhead --plan-change kernel=true), next to plain:
#                decides whether the GPU plan takes it (choices times it alone)
#   kernel_tf32  the same (tests first) with the kernel's products in TF32x3 on the tensor cores
#                (precision=tf32_tf32_f32_x3; HIGHEST is float32 FMAs; choices gives the error)
#   kernel_wave  the ResNet-50 step with the kernel's grid in one wave (kernel_programs=480:
#                chunks of two images; the plan's 960 programs are two waves by ptxas's
#                registers), to set against the kernel check's ResNet-50 row
#   segments     the ResNet-50 step with the GPU plan changed to segments, next to plain
#                (benchmarks.overhead --plan-change segments=true): decides the GPU plan
#   overhead     TrAct's cost per step next to torch_tract (benchmarks.overhead)
#   first_layer  TrAct's extra ms on the first layer alone (benchmarks.first_layer)
#   choices      every formulation and precision of the statistic (benchmarks.choices)
#   suite        the test suite on the GPU
# Results land in one folder: $OUT where the device tool sets it, else
# benchmarks/results/gpu/; each step's log is gpu_check.log there.
#
# With the device tool (torch_tract is not on its machine; carry its wheel):
#   here, once: echo /.whl/ >> .git/info/exclude
#               python3 -m pip download --no-deps -d .whl torch_tract==1.0.0
#   then, one call a check (on the first H200 one call of all of them ran out of time):
#               run(command='bash benchmarks/gpu_check.sh segments', carry=['.whl'], timeout_s=560)
set -uo pipefail
cd "$(dirname "$0")/.."
all=(kernel kernel_tf32 kernel_wave segments overhead first_layer choices suite)
checks=("$@")
[ ${#checks[@]} -gt 0 ] || checks=("${all[@]}")
for check in "${checks[@]}"; do  # before any device time is spent
    [[ " ${all[*]} " == *" $check "* ]] || { echo "gpu_check.sh: no check '$check' (${all[*]})" >&2; exit 2; }
done
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

step() {  # step SECONDS NAME COMMAND...: run it, time it, log it; its exit status
    local limit=$1 name=$2
    shift 2
    echo "== $name ($(date -u +%T), limit ${limit}s): $*" | tee -a "$log"
    local start=$SECONDS status
    timeout "$limit" "$@" >>"$log" 2>&1
    status=$?
    echo "== $name: exit $status after $((SECONDS - start)) s" | tee -a "$log"
    return "$status"
}

{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python3 -c 'import jax, flax, optax; print("jax", jax.__version__, jax.devices(), "flax", flax.__version__, "optax", optax.__version__)'
    python3 -c 'import torch, torch_tract; print("torch", torch.__version__, torch.cuda.get_device_name())' || echo 'no torch_tract: tract_jax only'
} >>"$log" 2>&1

# The kernel compiled by Triton, against float64 NumPy, before it is timed (the suite
# runs it interpreted elsewhere): a kernel check whose tests fail times nothing.
kernel_tests() {  # kernel_tests NAME PYTEST-K
    step 240 "$1" python3 -m pytest -q -n 4 -p no:cacheprovider -o addopts='' \
        tests/test_gram_by_kernel.py -k "$2" ||
        { echo "== $1 failed: the kernel is not timed" | tee -a "$log"; return 1; }
}

for check in "${checks[@]}"; do
    case $check in
        kernel) kernel_tests kernel_tests 'triton_compiles and highest or gpu_plan_with' &&
            step 500 kernel python3 -m benchmarks.overhead \
            --models resnet50_imagenet resnet18_cifar --pairs 20 --warmup 3 --no-torch \
            --plan-change kernel=true --out "$work/kernel" ;;
        kernel_tf32) kernel_tests kernel_tf32_tests 'triton_compiles and tf32x3' &&
            step 500 kernel_tf32 python3 -m benchmarks.overhead \
            --models resnet50_imagenet resnet18_cifar --pairs 20 --warmup 3 --no-torch \
            --plan-change kernel=true precision=tf32_tf32_f32_x3 --out "$work/kernel_tf32" ;;
        kernel_wave) step 500 kernel_wave python3 -m benchmarks.overhead \
            --models resnet50_imagenet --pairs 20 --warmup 3 --no-torch \
            --plan-change kernel=true kernel_programs=480 --out "$work/kernel_wave" ;;
        segments) step 500 segments python3 -m benchmarks.overhead --models resnet50_imagenet \
            --pairs 20 --warmup 3 --no-torch --plan-change segments=true --out "$work/segments" ;;
        overhead) step 500 overhead python3 -m benchmarks.overhead --pairs 20 --warmup 3 --out "$work" ;;
        first_layer) step 500 first_layer python3 -m benchmarks.first_layer --runs 40 --out "$work" ;;
        choices) step 500 choices python3 -m benchmarks.choices --runs 20 --out "$work" ;;
        suite) step 500 suite python3 -m pytest -q -n 16 -p no:cacheprovider -o addopts='--doctest-modules' ;;
    esac
done

for kind in kernel kernel_tf32 kernel_wave segments; do
    for ext in md json; do
        [ -f "$work/$kind/overhead.$ext" ] && cp "$work/$kind/overhead.$ext" "$out/overhead_$kind.$ext"
    done
done
for f in choices_gpu.md choices_gpu.json first_layer.json overhead.json overhead.md first_layer.md; do
    [ -f "$work/$f" ] && cp "$work/$f" "$out/"
done
grep -E '^(FAILED|ERROR)|passed|failed' "$log" | tail -40
echo "results in $out: $(ls "$out" | tr '\n' ' ')"
