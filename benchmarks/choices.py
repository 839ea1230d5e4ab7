"""Each per-platform choice of ``choice.py``, timed and checked on the platform at hand.

    python -m benchmarks.choices            # writes benchmarks/results/choices_<platform>.{md,json}

``choice.py`` picks, per platform, how a conv statistic's Gram is summed (over patches
in one product, over patches in column blocks, by shifts, from segments of image rows,
or, on a GPU, in one Pallas kernel), at which matmul precision, and which Cholesky
factors the solve (the platform's native one, or the recursive one built from XLA
operations). This script forces each alternative on the first layers of the benchmark
models (``benchmarks/micro.py``'s, at the accelerator batches of issue 19 on a
GPU/TPU), times them in turn round after round
(medians over rounds, ms), and checks each against a float64 NumPy reference on the
first images: a faster choice counts only where it is as accurate as the float32 tests
require.
The row marked ``*`` is what the platform's plan runs today.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import pathlib
import platform
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.micro import LAYERS, interleaved, layer_shape
from tract_jax._src import choice, solve, statistics, unfold

FAST_PRESET = {  # the multi-pass products that may reach float32 accuracy faster
    'gpu': jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3,
    'tpu': jax.lax.Precision.HIGH,
}


def statistic_variants(plan: choice.Plan) -> dict[str, tuple[str, choice.Plan]]:
    """name: (method, plan) for every way to sum the Gram that this platform can run."""
    highest = jax.lax.Precision.HIGHEST
    one = dataclasses.replace(plan, gram_block=None, precision=highest)
    variants = {
        'patches, one product, HIGHEST': ('patches', one),
        'patches, column blocks, HIGHEST': ('patches', dataclasses.replace(one, gram_block=192)),
        'shifts, HIGHEST': ('shifts', one),
        'segments, HIGHEST': ('segments', one),  # the TPU's 2-D stems; raises on 3-D ones
    }
    if plan.name == choice.GPU.name:  # elsewhere Pallas's interpreter: not a choice
        variants['kernel, HIGHEST'] = ('kernel', one)  # 2-D stems; raises on 3-D ones
    preset = FAST_PRESET.get(plan.name)
    if preset is not None:
        fast = dataclasses.replace(one, precision=preset)
        name = getattr(preset, 'name', preset)
        variants[f'patches, one product, {name}'] = ('patches', fast)
        if plan.name == choice.GPU.name:  # Triton's TF32x3: the tensor cores (mma)
            variants[f'kernel, {name}'] = ('kernel', fast)
    return variants


def _computes(method: str, plan: choice.Plan, n: int) -> tuple[Any, ...]:
    """What ``method`` under ``plan`` computes for a Gram of ``n`` columns."""
    blocks = choice.gram_blocks(n, plan) if method == 'patches' else (1, False)
    return method, *blocks, plan.precision


def _reference_gram(x: np.ndarray, geometry: unfold.ConvGeometry) -> np.ndarray:
    rows = np.asarray(unfold.conv_rows(jnp.asarray(x), geometry), np.float64)
    return rows.T @ rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--runs', type=int, default=20, help='rounds')
    parser.add_argument('--layers', nargs='+', default=list(LAYERS), choices=list(LAYERS))
    parser.add_argument('--check-images', type=int, default=2, help='images in the accuracy check')
    parser.add_argument(
        '--out', type=pathlib.Path, default=pathlib.Path(__file__).parent / 'results'
    )
    args = parser.parse_args(argv)
    plan = choice.plan_of(jax.default_backend())
    rows = []
    for name in args.layers:
        _, kernel, strides, padding, _ = LAYERS[name]
        shape = layer_shape(name)
        geometry = unfold.ConvGeometry(kernel, strides, padding)
        x = jax.random.normal(jax.random.key(0), shape)
        picked = statistics.chosen_method(shape, geometry, plan=plan)
        # at least as many rows as columns, so that the check sees a Gram, not the rows
        cost = statistics.gram_cost(shape, geometry)
        check = x[: max(args.check_images, -(-cost.fan_in // cost.rows))]
        reference = _reference_gram(np.asarray(check), geometry)
        calls, errors = {}, {}
        variants = statistic_variants(plan)
        for label, (method, variant) in variants.items():
            fn = jax.jit(
                lambda x, m=method, p=variant, g=geometry: (
                    statistics.geometry_statistic(x, g, method=m, plan=p).gram
                )
            )
            try:
                small = np.asarray(fn(check), np.float64)
                calls[label] = (fn, (x,))
            except Exception as error:  # an unsupported preset fails to compile
                print(f'{name}: {label} does not run here: {error}', flush=True)
                continue
            errors[label] = float(np.linalg.norm(small - reference) / np.linalg.norm(reference))
        n = math.prod(kernel) * shape[-1]
        gram = statistics.geometry_statistic(x, geometry)
        moment = gram.gram / gram.count
        rhs = jax.random.normal(jax.random.key(1), (n, LAYERS[name][-1]))
        matrix = moment + 0.1 * jnp.eye(n)
        solves = {
            'native Cholesky': jax.jit(solve._native_cholesky_solve),
            'XLA-built Cholesky': jax.jit(solve._xla_cholesky_solve),
        }
        truth = np.linalg.solve(np.asarray(matrix, np.float64), np.asarray(rhs, np.float64))
        for label, fn in solves.items():
            calls[label] = (fn, (matrix, rhs))
            got = np.asarray(fn(matrix, rhs), np.float64)
            errors[label] = float(np.linalg.norm(got - truth) / np.linalg.norm(truth))
        times = interleaved(calls, runs=args.runs)
        current = {  # the variants that compute what the plan computes (there may be two)
            label
            for label, (method, variant) in variants.items()
            if _computes(method, variant, n) == _computes(picked, plan, n)
        } | {'native Cholesky' if plan.native_cholesky else 'XLA-built Cholesky'}
        row = {
            'layer': name,
            'batch': shape[0],
            'n': n,
            'ms': {label: float(np.median(t)) for label, t in times.items()},
            'relative_error': errors,
            'plan_runs': sorted(current),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)

    meta = {
        'date': datetime.date.today().isoformat(),
        'machine': platform.machine(),
        'device': str(jax.devices()[0]),
        'jax': jax.__version__,
        'plan': plan.name,
        'runs': args.runs,
    }
    lines = [
        f'Measured {meta["date"]} on {meta["device"]} (jax {meta["jax"]}), '
        f'`python -m benchmarks.choices`, {args.runs} rounds; median ms per call; relative '
        f'error (Frobenius) against float64 NumPy on {args.check_images} images; * marks the '
        f"{plan.name} plan's choice today.",
        '',
        '| layer | batch | n | choice | ms | relative error |',
        '|---|---|---|---|---|---|',
    ]
    for row in rows:
        for label, ms in row['ms'].items():
            mark = ' *' if label in row['plan_runs'] else ''
            lines.append(
                f'| {row["layer"]} | {row["batch"]} | {row["n"]} | {label}{mark} | {ms:.3f} | '
                f'{row["relative_error"][label]:.1e} |'
            )
    text = '\n'.join(lines) + '\n'
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f'choices_{plan.name}'
    (args.out / f'{stem}.md').write_text(text)
    (args.out / f'{stem}.json').write_text(json.dumps({'meta': meta, 'rows': rows}, indent=2))
    return {'meta': meta, 'rows': rows}


if __name__ == '__main__':
    main()
