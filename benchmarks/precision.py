"""How much a TPU's bfloat16 passes move TrAct's update, emulated here in float32.

    python -m benchmarks.precision

An MXU multiplies bfloat16. XLA:TPU's precisions for a float32 product are 1 pass
(DEFAULT: both operands rounded to bfloat16), 3 passes (HIGH, bf16_3x: each operand
split as hi + lo in bfloat16, and hi·hi + hi·lo + lo·hi summed in float32) and 6 passes
(HIGHEST, bf16_6x: hi + mid + lo, every product whose parts' order sums to at most 2).
This script forms the statistic ``XᵀX`` of real first-layer inputs those three ways
on the CPU, solves TrAct's update with each, and reports its relative error against
the update from the exact float64 statistic (the gradient and the solve in float64,
so only the statistic's products differ): the median and the worst over random
gradients, on standardized and on raw [0, 255] pixels, at λ = 0.1 and λ = 1e-3.

Writes ``benchmarks/results/precision_<dataset>.md``.
"""

from __future__ import annotations

import argparse
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from examples import data
from tract_jax._src import unfold

RESULTS = pathlib.Path(__file__).parent / 'results'


def split(x: jax.Array, parts: int) -> list[jax.Array]:
    """``x`` (float32) as ``parts`` bfloat16 terms, largest first, each as float32."""
    terms = []
    for _ in range(parts):
        term = x.astype(jnp.bfloat16).astype(jnp.float32)
        terms.append(term)
        x = x - term
    return terms


def gram_in_passes(rows: jax.Array, passes: int) -> np.ndarray:
    """``XᵀX`` of float32 ``rows`` as an MXU sums it in ``passes`` (1, 3 or 6) bfloat16
    products; each product is exact in float32 and summed in float32."""
    parts = {1: 1, 3: 2, 6: 3}[passes]
    terms = split(rows.astype(jnp.float32), parts)
    total = jnp.zeros((rows.shape[1],) * 2, jnp.float32)
    for i, a in enumerate(terms):
        for j, b in enumerate(terms):
            if i + j < parts:  # 1: hi·hi; 3: + hi·lo, lo·hi; 6: + hi·mid ... mid·mid
                total = total + jnp.matmul(a.T, b, precision=jax.lax.Precision.HIGHEST)
    return np.asarray(total, np.float64)


def update_errors(rows: np.ndarray, lam: float, passes: int, draws: int = 64) -> np.ndarray:
    """Relative errors of ``(G/b + λI)⁻¹ g`` with ``G`` summed in ``passes``, over random
    gradients ``g``, against the exact float64 statistic."""
    b, n = rows.shape
    exact = rows.T @ rows
    approx = gram_in_passes(jnp.asarray(rows, jnp.float32), passes)
    grads = np.random.default_rng(0).normal(size=(n, draws))
    want = np.linalg.solve(exact / b + lam * np.eye(n), grads)
    got = np.linalg.solve(approx / b + lam * np.eye(n), grads)
    return np.linalg.norm(got - want, axis=0) / np.linalg.norm(want, axis=0)


def inputs(dataset: str, data_dir: str | None) -> dict[str, np.ndarray]:
    """Rows of real first layers: a 3x3 conv stem and a patch embedding, on [0, 255]
    pixels and standardized."""
    found = {}
    for name, standardize in (('[0, 255]', 'raw255'), ('standardized', 'channel')):
        train, _ = data.load(dataset, data_dir, standardize=standardize)
        x = jnp.asarray(train.images[:2000], jnp.float32)
        side = x.shape[1]
        patch = 4 if side % 4 == 0 else 2
        for layer, geometry in (
            ('3x3 conv', unfold.ConvGeometry((3, 3), 1, 1)),
            (f'{patch}x{patch} patches', unfold.ConvGeometry((patch,) * 2, patch, 'VALID')),
        ):
            rows = np.asarray(unfold.conv_rows(x, geometry), np.float64)
            found[f'{dataset}, {layer} (n = {rows.shape[1]}), {name}'] = rows
    return found


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--dataset', default='digits', help='as examples/data.py loads it')
    parser.add_argument('--data-dir')
    parser.add_argument('--out', type=pathlib.Path, default=RESULTS)
    args = parser.parse_args(argv)
    lines = [
        '| input | λ | 1 pass (DEFAULT) | 3 passes (HIGH) | 6 passes (HIGHEST) |',
        '|---|---|---|---|---|',
    ]
    for name, rows in inputs(args.dataset, args.data_dir).items():
        for lam in (0.1, 1e-3):
            cells = []
            for passes in (1, 3, 6):
                errors = update_errors(rows, lam, passes)
                cells.append(f'{np.median(errors):.1e} (worst {errors.max():.1e})')
            lines.append(f'| {name} | {lam:g} | ' + ' | '.join(cells) + ' |')
    report = '\n'.join(lines) + '\n'
    print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f'precision_{args.dataset}.md').write_text(
        'Relative error of the update, median (worst) over 64 random gradients '
        f'(`python -m benchmarks.precision --dataset {args.dataset}`).\n\n' + report
    )
    return report


if __name__ == '__main__':
    main()
