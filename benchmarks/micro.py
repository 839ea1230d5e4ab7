"""Microbenchmark of TrAct's pieces alone: unfolding, the statistic, the solve.

    python -m benchmarks.micro       # writes benchmarks/results/micro.md

Times each jitted piece (median of many runs, after warm-up) for the first layers of
the benchmark models, next to the first layer's own forward conv, so that a change
to one piece can be judged in isolation: the conv statistic's Gram by each
formulation (the patches' ``XᵀX``, or by shifts; which one ``'auto'`` picks), alone
and beside other work, and the solve. The whole-step figures that matter to users
come from ``benchmarks/overhead.py``.

The solve is timed twice more, as shipped (XLA operations on CPU) and through
LAPACK (``cho_solve``, what GPU/TPU use), each *next to* an independent 1536x1536
matmul in the same jitted function: the extra time over the matmul alone is what
the solve costs when XLA runs other work of a training step beside it.
"""

from __future__ import annotations

import argparse
import datetime
import math
import pathlib
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

import tract_jax
from tract_jax._src import solve, statistics

# name: (input shape, kernel, strides, padding, features)
LAYERS = {
    'resnet18_cifar stem': ((32, 32, 32, 3), (3, 3), 1, 1, 64),
    'vit_tiny4 patch embed': ((32, 32, 32, 3), (4, 4), 4, 'VALID', 192),
    'resnet50 stem': ((4, 224, 224, 3), (7, 7), 2, 3, 64),
    'vit_s16 patch embed': ((8, 224, 224, 3), (16, 16), 16, 'VALID', 384),
    'video 3x7x7/1x2x2 stem': ((2, 16, 112, 112, 3), (3, 7, 7), (1, 2, 2), (1, 3, 3), 64),
}


def _time(fn, *args, runs: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def _time_beside(fn, work, *args, runs: int) -> float:
    """``_time`` of ``fn(*args)`` jitted together with the independent ``work @ work``."""
    both = jax.jit(lambda w, *a: (fn(*a), w @ w))
    return _time(both, work, *args, runs=runs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--runs', type=int, default=30)
    parser.add_argument('--layers', nargs='+', default=list(LAYERS), choices=list(LAYERS))
    parser.add_argument(
        '--out', type=pathlib.Path, default=pathlib.Path(__file__).parent / 'results'
    )
    args = parser.parse_args(argv)
    lines = [
        f'Measured {datetime.date.today().isoformat()} on {platform.machine()} '
        f'({jax.default_backend()}, jax {jax.__version__}), `python -m benchmarks.micro`; '
        'medians of jitted calls in ms.',
        '',
    ]

    def emit(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    work = jax.random.normal(jax.random.key(2), (1536, 1536))
    matmul = jax.jit(lambda w: w @ w)
    statistic_rows, solve_rows = [], []
    for name in args.layers:
        shape, kernel, strides, pad, features = LAYERS[name]
        x = jax.random.normal(jax.random.key(0), shape)
        layer = tract_jax.Conv(features, kernel, strides, padding=pad, use_bias=False)
        params = layer.init(jax.random.key(1), x)
        conv = jax.jit(lambda p, x, layer=layer: layer.apply(p, x))
        geometry = statistics.ConvGeometry(kernel, strides, pad)
        unfold = jax.jit(lambda x, g=geometry: statistics.conv_rows(x, g))
        by = {
            method: jax.jit(
                lambda x, g=geometry, m=method: statistics.geometry_statistic(x, g, method=m)
            )
            for method in ('patches', 'shifts', 'auto')
        }
        chosen = statistics.chosen_method(shape, geometry)
        stat = by['auto'](x)
        n = math.prod(kernel) * shape[-1]
        grad = jnp.ones((*kernel, shape[-1], features))
        shipped = jax.jit(tract_jax.tract_solve)
        matrix = stat.gram / stat.count + 0.1 * jnp.eye(n)
        rhs = grad.reshape(n, features)
        lapack = jax.jit(solve._native_cholesky_solve)
        matmul_ms = _time(matmul, work, runs=args.runs)  # once per layer, near its pairs
        conv_ms = _time(conv, params, x, runs=args.runs)

        def beside(fn, *fn_args, alone_ms=matmul_ms):
            return _time_beside(fn, work, *fn_args, runs=args.runs) - alone_ms

        gram = {m: _time(fn, x, runs=args.runs) for m, fn in by.items() if m != 'auto'}
        statistic_rows.append(
            [
                name,
                n,
                int(stat.count),
                conv_ms,
                _time(unfold, x, runs=args.runs),
                gram['patches'],
                gram['shifts'],
                beside(by['patches'], x),
                beside(by['shifts'], x),
                chosen,
                gram[chosen] / conv_ms,
            ]
        )
        solve_rows.append(
            [
                name,
                n,
                _time(shipped, stat, grad, 0.1, runs=args.runs),
                beside(tract_jax.tract_solve, stat, grad, 0.1),
                _time(lapack, matrix, rhs, runs=args.runs),
                beside(solve._native_cholesky_solve, matrix, rhs),
            ]
        )
        print(statistic_rows[-1], solve_rows[-1], flush=True)

    emit(
        '| layer | n | rows | conv fwd ms | unfold ms | Gram by patches ms | Gram by shifts ms '
        '| patches beside work ms | shifts beside work ms | auto picks | picked / conv fwd |'
    )
    emit('|---|---|---|---|---|---|---|---|---|---|---|')
    for name, n, rows, *ms, chosen, ratio in statistic_rows:
        cells = ' | '.join(f'{v:.2f}' for v in ms)
        emit(f'| {name} | {n} | {rows} | {cells} | {chosen} | {ratio:.2f}x |')
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
