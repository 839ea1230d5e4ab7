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

    python -m benchmarks.precision --train --dataset fashion_mnist

trains instead: ``examples/study.py``'s arms (the same seeds, initial weights and
batches in every arm) with TrAct's statistic summed in float32 and in 3 and 1 emulated
bfloat16 passes, next to plain training for scale, and reports each arm's test accuracy
and final training loss with the paired difference from the float32 arm (95% Student-t
interval over seeds), on standardized pixels at λ = 0.1 and on raw [0, 255] pixels at
λ = 1e-3. Writes ``benchmarks/results/precision_training_<dataset>.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import pathlib
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from examples import data, study
from tract_jax._src import gram, unfold

RESULTS = pathlib.Path(__file__).parent / 'results'


def split(x: jax.Array, parts: int) -> list[jax.Array]:
    """``x`` (float32) as ``parts`` bfloat16 terms, largest first, each as float32."""
    terms = []
    for _ in range(parts):
        term = x.astype(jnp.bfloat16).astype(jnp.float32)
        terms.append(term)
        x = x - term
    return terms


def gram_in_passes(rows: jax.Array, passes: int) -> jax.Array:
    """``XᵀX`` of float32 ``rows`` as an MXU sums it in ``passes`` (1, 3 or 6) bfloat16
    products; each product is exact in float32 and summed in float32."""
    parts = {1: 1, 3: 2, 6: 3}[passes]
    terms = split(rows.astype(jnp.float32), parts)
    total = jnp.zeros((rows.shape[1],) * 2, jnp.float32)
    for i, a in enumerate(terms):
        for j, b in enumerate(terms):
            if i + j < parts:  # 1: hi·hi; 3: + hi·lo, lo·hi; 6: + hi·mid ... mid·mid
                total = total + jnp.matmul(a.T, b, precision=jax.lax.Precision.HIGHEST)
    return total


def update_errors(rows: np.ndarray, lam: float, passes: int, draws: int = 64) -> np.ndarray:
    """Relative errors of ``(G/b + λI)⁻¹ g`` with ``G`` summed in ``passes``, over random
    gradients ``g``, against the exact float64 statistic."""
    b, n = rows.shape
    exact = rows.T @ rows
    approx = np.asarray(gram_in_passes(jnp.asarray(rows, jnp.float32), passes), np.float64)
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


@contextlib.contextmanager
def statistic_in_passes(passes: int | None) -> Iterator[list[int]]:
    """Within it, every Gram of rows that a statistic traces is summed in ``passes``
    emulated bfloat16 passes (``None``: as the platform's plan sums it). Yields a list
    that gets one entry per Gram so traced (a function jitted before, and not traced
    again, keeps what it traced then)."""
    traced: list[int] = []
    if passes is None:
        yield traced
        return
    exact = gram.gram_of_rows

    def emulated(
        rows: jax.Array, *, parts: int, precision: jax.lax.PrecisionLike, bands: bool = False
    ) -> jax.Array:
        traced.append(rows.shape[1])
        return gram_in_passes(rows, passes)

    gram.gram_of_rows = emulated
    try:
        yield traced
    finally:
        gram.gram_of_rows = exact


TRAINING = {  # setting: (standardize, λ)
    'standardized pixels, λ = 0.1': ('channel', 0.1),
    'raw [0, 255] pixels, λ = 1e-3': ('raw255', 1e-3),
}
ARMS = {'float32': None, '3 passes (HIGH)': 3, '1 pass (DEFAULT)': 1}


def train(args: argparse.Namespace) -> str:
    """Paired training runs of each arm in each setting of ``TRAINING``; the report."""
    lines = [
        f'{args.dataset}, {args.train_size} training images, `{args.model}`, Adam 1e-3, '
        f'batch 128, {args.epochs} epochs, seeds {args.seeds}: test accuracy (%) and final '
        'training loss, mean over seeds; the paired difference from the float32 arm, mean '
        f'[95% interval] (`python -m benchmarks.precision --train --dataset {args.dataset}`).',
        '',
        '| setting | arm | test accuracy | − float32 | final loss | − float32 |',
        '|---|---|---|---|---|---|',
    ]
    for setting, (standardize, lam) in TRAINING.items():
        options = study.build_parser().parse_args(
            [
                *('--dataset', args.dataset, '--model', args.model, '--loop', 'python'),
                *('--standardize', standardize, '--train-size', str(args.train_size)),
                *('--seeds', *map(str, args.seeds)),
                *(('--data-dir', args.data_dir) if args.data_dir else ()),
            ]
        )
        train_split, test_split, model = study.prepare(options)
        runs = {}
        for arm, passes in {'plain': None, **ARMS}.items():
            with statistic_in_passes(passes) as traced:
                runs[arm] = study.run_arm(
                    study.Arm(options, model, None if arm == 'plain' else lam),
                    options,
                    train_split,
                    test_split,
                    [args.epochs],
                    f'{setting[:12]} {arm}',
                )[args.epochs]
            if passes is not None and not traced:
                raise RuntimeError(f'{arm}: no statistic was traced with emulated passes')
        for arm, run in runs.items():
            acc, loss = run['test_acc'], run['final_loss']
            cells = [f'{np.mean(acc):.2f}', '', f'{np.mean(loss):.4f}', '']
            if arm != 'float32':
                for k, (key, fmt) in enumerate((('test_acc', '.2f'), ('final_loss', '.4f'))):
                    d = study.paired(run[key], runs['float32'][key])
                    cells[2 * k + 1] = f'{d["mean"]:+{fmt}} [{d["low"]:+{fmt}}, {d["high"]:+{fmt}}]'
            lines.append(f'| {setting} | {arm} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines) + '\n'


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--dataset', default='digits', help='as examples/data.py loads it')
    parser.add_argument('--data-dir')
    parser.add_argument('--out', type=pathlib.Path, default=RESULTS)
    parser.add_argument('--train', action='store_true', help='paired training runs instead')
    parser.add_argument('--model', default='cnn_nonorm', choices=study.MODELS)
    parser.add_argument('--train-size', type=int, default=10000)
    parser.add_argument('--epochs', type=int, default=2)
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2, 3, 4])
    args = parser.parse_args(argv)
    if args.train:
        report = train(args)
        print(report)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f'precision_training_{args.dataset}.md').write_text(report)
        return report
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
