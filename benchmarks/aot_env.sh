#!/usr/bin/env bash
# Makes .venv-aot: tract_jax with XLA's TPU compiler (libtpu, from jax[tpu]) and GPU compiler
# (the CUDA plugin of the same jax release, without NVIDIA's libraries: nothing runs on a
# GPU), so that a machine with neither accelerator compiles for both:
#   bash benchmarks/aot_env.sh && .venv-aot/bin/python -m benchmarks.compiled
# About 2 GB (2.1 GB measured), libtpu most of it. .ci/run uses it for tests/test_compiled.py.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv-aot
.venv-aot/bin/python -m pip install -q -e '.[test]' 'jax[tpu]'
version=$(.venv-aot/bin/python -c 'import jax; print(jax.__version__)')
.venv-aot/bin/python -m pip install -q --no-deps "jax-cuda12-plugin==$version" "jax-cuda12-pjrt==$version"
.venv-aot/bin/python -c 'import importlib.metadata as m; print(*(f"{p} {m.version(p)}" for p in ("jax", "libtpu", "jax-cuda12-plugin")))'
