"""Microbenchmark of TrAct's pieces alone: unfolding, the statistic, the solve.

    python -m benchmarks.micro       # writes benchmarks/results/micro.md

Times each jitted piece for the first layers of the benchmark models, next to the
first layer's own forward conv, so that a change to one piece can be judged in
isolation: the conv statistic's Gram by each formulation (the patches' ``XᵀX``, or by
shifts; which one ``'auto'`` picks), alone and beside other work, and the solve. The
pieces are called in turn, round after round (after a warm-up call each), and
differences are taken within a round and reported as medians over rounds, so that a
shared machine's drift cancels. The statistic's time over the conv's comes from the
two alone, alternated: a call right after a large one runs slower. The whole-step
figures that matter to users come from ``benchmarks/overhead.py`` and
``benchmarks/first_layer.py``.

The solve is timed twice more, as shipped (XLA operations on CPU) and through
LAPACK (``cho_solve``, what GPU/TPU use), each *next to* an independent 1536x1536
matmul in the same jitted function: the extra time over the matmul alone (in the
same round) is what the solve costs when XLA runs other work of a training step
beside it.
"""

from __future__ import annotations

import argparse
import datetime
import math
import pathlib
import platform
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import tract_jax
from tract_jax._src import choice, solve, statistics
from tract_jax._src import unfold as unfolding

# name: (input shape, kernel, strides, padding, features)
LAYERS = {
    'resnet18_cifar stem': ((32, 32, 32, 3), (3, 3), 1, 1, 64),
    'vit_tiny4 patch embed': ((32, 32, 32, 3), (4, 4), 4, 'VALID', 192),
    'resnet50 stem': ((4, 224, 224, 3), (7, 7), 2, 3, 64),
    'vit_s16 patch embed': ((8, 224, 224, 3), (16, 16), 16, 'VALID', 384),
    'video 3x7x7/1x2x2 stem': ((2, 16, 112, 112, 3), (3, 7, 7), (1, 2, 2), (1, 3, 3), 64),
}
ACCELERATOR_BATCH = {  # images per batch on a GPU/TPU: the first H100 run's (issue 19)
    'resnet18_cifar stem': 128,
    'vit_tiny4 patch embed': 128,
    'resnet50 stem': 64,
    'vit_s16 patch embed': 64,
    'video 3x7x7/1x2x2 stem': 8,
}


def layer_shape(name: str) -> tuple[int, ...]:
    """The input shape of a layer here: its CPU batch on a CPU, else the accelerator's."""
    shape = LAYERS[name][0]
    if jax.default_backend() == 'cpu':
        return shape
    return (ACCELERATOR_BATCH[name], *shape[1:])


Call = tuple[Callable[..., Any], tuple[Any, ...]]


def interleaved(calls: dict[str, Call], runs: int) -> dict[str, np.ndarray]:
    """Times of each ``fn(*args)`` in ``runs`` rounds, taken in turn within a round.

    Taking the pieces in turn (after one warm-up call each) gives every round the same
    machine: ratios and differences are then taken within a round, which cancels most
    of a shared machine's drift, and reported as medians over rounds.
    """
    for fn, args in calls.values():
        jax.block_until_ready(fn(*args))
    times = {name: [] for name in calls}
    for _ in range(runs):
        for name, (fn, args) in calls.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(1e3 * (time.perf_counter() - start))
    return {name: np.asarray(t) for name, t in times.items()}


def _beside(fn: Callable[..., Any], work: jax.Array, *args: Any) -> Call:
    """``fn(*args)`` jitted together with the independent ``work @ work``."""
    return jax.jit(lambda w, *a: (fn(*a), w @ w)), (work, *args)


def _ratio(times: dict[str, np.ndarray], num: str, den: str) -> str:
    """The median over rounds of ``num / den``, with its interquartile range."""
    q1, median, q3 = np.percentile(times[num] / times[den], [25, 50, 75])
    return f'{median:.2f}x ({q1:.2f}-{q3:.2f})'


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--runs', type=int, default=30, help='rounds')
    parser.add_argument('--layers', nargs='+', default=list(LAYERS), choices=list(LAYERS))
    parser.add_argument(
        '--out', type=pathlib.Path, default=pathlib.Path(__file__).parent / 'results'
    )
    args = parser.parse_args(argv)
    lines = [
        f'Measured {datetime.date.today().isoformat()} on {platform.machine()} '
        f'({jax.default_backend()}, jax {jax.__version__}), `python -m benchmarks.micro`; '
        'medians over rounds of jitted calls in ms, the pieces called in turn within each '
        'round; "beside work" is taken within a round, the ratio from the conv and the '
        'picked formulation alone, alternated.',
        '',
    ]

    def emit(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    work = jax.random.normal(jax.random.key(2), (1536, 1536))
    matmul = jax.jit(lambda w: w @ w)
    statistic_rows, solve_rows = [], []
    plan = choice.plan_of(jax.default_backend())
    for name in args.layers:
        _, kernel, strides, pad, features = LAYERS[name]
        shape = layer_shape(name)
        x = jax.random.normal(jax.random.key(0), shape)
        layer = tract_jax.Conv(features, kernel, strides, padding=pad, use_bias=False)
        params = layer.init(jax.random.key(1), x)
        conv = jax.jit(lambda p, x, layer=layer: layer.apply(p, x))
        geometry = statistics.ConvGeometry(kernel, strides, pad)
        unfold = jax.jit(lambda x, g=geometry: unfolding.conv_rows(x, g))
        by = {
            method: jax.jit(
                lambda x, g=geometry, m=method: statistics.geometry_statistic(x, g, method=m)
            )
            for method in ('patches', 'shifts')
        }
        chosen = statistics.chosen_method(shape, geometry, plan=plan)
        stat = by[chosen](x)
        n = math.prod(kernel) * shape[-1]
        grad = jnp.ones((*kernel, shape[-1], features))
        shipped = jax.jit(tract_jax.tract_solve)
        matrix = stat.gram / stat.count + 0.1 * jnp.eye(n)
        rhs = grad.reshape(n, features)
        lapack = jax.jit(solve._native_cholesky_solve)
        grams = {method: (fn, (x,)) for method, fn in by.items()}
        t = interleaved(
            {
                'conv': (conv, (params, x)),
                'unfold': (unfold, (x,)),
                **grams,
                'work': (matmul, (work,)),
                **{f'{m} + work': _beside(fn, work, x) for m, fn in by.items()},
                'solve': (shipped, (stat, grad, 0.1)),
                'solve + work': _beside(tract_jax.tract_solve, work, stat, grad, 0.1),
                'lapack': (lapack, (matrix, rhs)),
                'lapack + work': _beside(solve._native_cholesky_solve, work, matrix, rhs),
            },
            runs=args.runs,
        )

        # The ratio from the two alone, alternated: right after a large call (the patches,
        # the 1536² matmul) a call runs slower (measured: the ResNet-50 stem's shifts 13.0
        # instead of 11.3 ms after the patches' Gram), so the round above overstates it.
        pair = interleaved({'conv': (conv, (params, x)), chosen: grams[chosen]}, args.runs)

        def median(name, t=t):
            return float(np.median(t[name]))

        def beside(name, t=t):
            return float(np.median(t[f'{name} + work'] - t['work']))

        statistic_rows.append(
            [
                name,
                n,
                int(stat.count),
                *(median(k) for k in ('conv', 'unfold', 'patches', 'shifts')),
                beside('patches'),
                beside('shifts'),
                chosen,
                _ratio(pair, chosen, 'conv'),
            ]
        )
        solve_rows.append(
            [name, n, median('solve'), beside('solve'), median('lapack'), beside('lapack')]
        )
        print(statistic_rows[-1], solve_rows[-1], flush=True)

    emit(
        '| layer | n | rows | conv fwd ms | unfold ms | Gram by patches ms | Gram by shifts ms '
        '| patches beside work ms | shifts beside work ms | auto picks '
        '| picked / conv fwd (IQR) |'
    )
    emit('|---|---|---|---|---|---|---|---|---|---|---|')
    for name, n, rows, *ms, chosen, ratio in statistic_rows:
        cells = ' | '.join(f'{v:.2f}' for v in ms)
        emit(f'| {name} | {n} | {rows} | {cells} | {chosen} | {ratio} |')
    emit('')
    emit(
        '| layer | n | solve ms | solve beside work ms | LAPACK solve ms '
        '| LAPACK solve beside work ms |'
    )
    emit('|---|---|---|---|---|---|')
    for name, n, *ms in solve_rows:
        emit(f'| {name} | {n} | ' + ' | '.join(f'{v:.2f}' for v in ms) + ' |')
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / 'micro.md').write_text('\n'.join(lines) + '\n')


if __name__ == '__main__':
    main()
