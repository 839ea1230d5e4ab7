"""Microbenchmark of TrAct's pieces alone: unfolding, the statistic, the solve.

    python -m benchmarks.micro

Times each jitted piece (median of many runs, after warm-up) for the first layers of
the benchmark models, next to the first layer's own forward conv, so that a change
to one piece can be judged in isolation. The whole-step figures that matter to users
come from ``benchmarks/overhead.py``.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import tract_jax
from tract_jax._src import statistics

# name: (batch, side, channels, kernel, stride, padding, features)
LAYERS = {
    'resnet18_cifar stem': (32, 32, 3, 3, 1, 1, 64),
    'vit_tiny4 patch embed': (32, 32, 3, 4, 4, 'VALID', 192),
    'resnet50 stem': (4, 224, 3, 7, 2, 3, 64),
    'vit_s16 patch embed': (8, 224, 3, 16, 16, 'VALID', 384),
}


def _time(fn, *args, runs: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--runs', type=int, default=30)
    args = parser.parse_args(argv)
    print('| layer | n | rows | conv fwd ms | unfold ms | unfold+Gram ms | solve ms |')
    print('|---|---|---|---|---|---|---|')
    for name, (batch, side, c, k, s, pad, m) in LAYERS.items():
        x = jax.random.normal(jax.random.key(0), (batch, side, side, c))
        layer = tract_jax.Conv(m, (k, k), s, padding=pad, use_bias=False)
        params = layer.init(jax.random.key(1), x)
        conv = jax.jit(lambda p, x, layer=layer: layer.apply(p, x))
        geometry = statistics.ConvGeometry((k, k), s, pad)
        unfold = jax.jit(lambda x, g=geometry: statistics.conv_rows(x, g))
        stat_fn = jax.jit(lambda x, g=geometry: statistics.conv_statistic(x, g))
        stat = stat_fn(x)
        grad = jnp.ones((k, k, c, m))
        solve = jax.jit(tract_jax.tract_solve)
        rows = unfold(x).shape[0]
        print(
            f'| {name} | {k * k * c} | {rows} | {_time(conv, params, x, runs=args.runs):.2f} | '
            f'{_time(unfold, x, runs=args.runs):.2f} | {_time(stat_fn, x, runs=args.runs):.2f} | '
            f'{_time(solve, stat, grad, 0.1, runs=args.runs):.3f} |'
        )


if __name__ == '__main__':
    main()
