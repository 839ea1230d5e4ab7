"""Train a vision model twice, plain and with TrAct, and compare.

    python examples/train.py                      # digits, small CNN, Adam, 3 seeds
    python -m examples.train --dataset fashion_mnist --model vit_tiny --patch 4 --epochs 5
    python -m examples.train --dataset cifar10 --data-dir ~/data --model resnet18 \\
        --optimizer sgd --lr 0.08 --epochs 100 --batch-size 128

Both runs start from the same initial weights and see the same batches in the same
order (same seed); only the first layer's update differs. Prints a line per epoch
(loss, train and test accuracy, seconds) under a tqdm progress bar, and writes
``results.json`` (every figure) and ``accuracy.png`` (test accuracy per epoch) to
``--out``. Several ``--seeds`` give mean ± std.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

if __package__ in (None, ''):  # run as a script: make `examples` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from examples import data, models, steps

MODELS = ('cnn', 'resnet18', 'vit_tiny', 'vit_cifar')


def augment(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The paper's CIFAR augmentation: random crop with 4 pixels of zero padding, flip."""
    n, h, w, _ = images.shape
    padded = np.pad(images, [(0, 0), (4, 4), (4, 4), (0, 0)])
    dy, dx = rng.integers(0, 9, n), rng.integers(0, 9, n)
    rows = dy[:, None] + np.arange(h)[None, :]
    cols = dx[:, None] + np.arange(w)[None, :]
    out = padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
    flip = rng.random(n) < 0.5
    out[flip] = out[flip, :, ::-1]
    return out


def make_optimizer(args, steps_total: int, lam: float | None):
    schedule = optax.cosine_decay_schedule(args.lr, steps_total)
    base = optax.adam(schedule) if args.optimizer == 'adam' else optax.sgd(schedule, momentum=0.9)
    if args.weight_decay:
        base = optax.chain(optax.add_decayed_weights(args.weight_decay), base)
    return steps.make_optimizer(base, lam)


def accuracy(predict, variables, split: data.Split, limit: int | None = None) -> float:
    """Accuracy of ``predict(variables, images)`` on (the first ``limit`` images of) a split."""
    n = min(len(split.labels), limit or len(split.labels))
    correct = 0
    for start in range(0, n, 1000):
        stop = min(start + 1000, n)
        labels = np.asarray(predict(variables, split.images[start:stop]))
        correct += int(np.sum(labels == split.labels[start:stop]))
    return correct / n


def train_one(args, train: data.Split, test: data.Split, lam: float | None, seed: int, label: str):
    from tqdm import tqdm

    num_classes = int(max(train.labels.max(), test.labels.max()) + 1)
    model = models.build(args.model, num_classes, args.patch)
    variables = model.init(jax.random.key(seed), train.images[:1], train=False)
    params, batch_stats = variables['params'], variables.get('batch_stats', {})
    steps_per_epoch = len(train.labels) // args.batch_size
    if args.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, args.max_steps_per_epoch)
    tx = make_optimizer(args, steps_per_epoch * args.epochs, lam)
    opt_state = tx.init(params)
    step = steps.make_train_step(model, tx, lam is not None, args.label_smoothing)
    predict = jax.jit(lambda v, x: jnp.argmax(model.apply(v, x, train=False), -1))

    data_rng = np.random.default_rng(seed)  # the same batches, in the same order, for both runs
    history = []
    for epoch in range(1, args.epochs + 1):
        start = time.perf_counter()
        order = data_rng.permutation(len(train.labels))
        losses = []
        bar = tqdm(  # a bar only on a terminal: in a log, \r fragments are noise
            range(steps_per_epoch),
            desc=f'{label} epoch {epoch}',
            leave=False,
            file=sys.stderr,
            disable=not sys.stderr.isatty(),
        )
        for i in bar:
            idx = order[i * args.batch_size : (i + 1) * args.batch_size]
            x, y = train.images[idx], train.labels[idx]
            if args.augment:
                x = augment(x, data_rng)
            params, batch_stats, opt_state, loss = step(params, batch_stats, opt_state, x, y)
            losses.append(loss)
            if i % 10 == 0:
                bar.set_postfix(loss=f'{float(loss):.3f}')
        variables = {'params': params, 'batch_stats': batch_stats}
        train_loss = float(np.mean(jax.device_get(losses)))
        test_acc = accuracy(predict, variables, test)
        record = {
            'epoch': epoch,
            'loss': train_loss,
            'train_acc': accuracy(predict, variables, train, limit=10_000),
            'test_acc': test_acc,
            'seconds': time.perf_counter() - start,
        }
        history.append(record)
        print(
            f'{label:>8} seed {seed} epoch {epoch:3d}  loss {train_loss:.4f}  '
            f'train {100 * record["train_acc"]:.2f}%  test {100 * test_acc:.2f}%  '
            f'{record["seconds"]:.1f}s',
            flush=True,
        )
        if not np.isfinite(train_loss):
            print(f'{label}: loss is not finite, stopping this run', flush=True)
            break
    return history


def plot(results: dict, path: pathlib.Path, title: str) -> None:
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, runs in results.items():
        acc = np.array([[100 * r['test_acc'] for r in run] for run in runs.values()])
        epochs = np.arange(1, acc.shape[1] + 1)
        mean, std = acc.mean(0), acc.std(0)
        ax.plot(epochs, mean, marker='o', label=f'{label} ({len(runs)} seed(s))')
        ax.fill_between(epochs, mean - std, mean + std, alpha=0.2)
    ax.set_xlabel('epoch')
    ax.set_ylabel('test accuracy [%]')
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def build_parser() -> argparse.ArgumentParser:
    """The command line; a function so that scripts calling this one can be checked."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--dataset', default='digits', choices=data.DATASETS)
    parser.add_argument('--data-dir', default=None)
    parser.add_argument('--standardize', default='channel', choices=('channel', 'raw255'))
    parser.add_argument('--model', default='cnn', choices=MODELS)
    parser.add_argument('--patch', type=int, default=2, help='ViT patch size')
    parser.add_argument('--optimizer', default='adam', choices=('adam', 'sgd'))
    parser.add_argument('--lr', type=float, default=1e-3)
    parser.add_argument('--weight-decay', type=float, default=0.0)
    parser.add_argument('--label-smoothing', type=float, default=0.0)
    parser.add_argument('--lam', type=float, default=0.1, help="TrAct's λ")
    parser.add_argument('--epochs', type=int, default=10)
    parser.add_argument('--batch-size', type=int, default=64)
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--augment', action='store_true', help='random crop + flip (CIFAR)')
    parser.add_argument(
        '--runs', nargs='+', default=['baseline', 'tract'], choices=('baseline', 'tract')
    )
    parser.add_argument('--max-steps-per-epoch', type=int, default=None)
    parser.add_argument('--out', type=pathlib.Path, default=pathlib.Path('examples/runs/latest'))
    return parser


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)

    try:
        train, test = data.load(args.dataset, args.data_dir, args.standardize)
    except data.MissingDataError as error:
        parser.exit(2, f'error: {error}\n')
    print(
        f'{args.dataset}: {len(train.labels)} train / {len(test.labels)} test images of shape '
        f'{train.images.shape[1:]}; model {args.model}, {args.optimizer} lr {args.lr}, '
        f'λ {args.lam}, {args.epochs} epochs, batch {args.batch_size}',
        flush=True,
    )
    results: dict = {}
    for label in args.runs:
        lam = args.lam if label == 'tract' else None
        results[label] = {
            str(seed): train_one(args, train, test, lam, seed, label) for seed in args.seeds
        }
    summary = {}
    for label, runs in results.items():
        final = np.array([100 * run[-1]['test_acc'] for run in runs.values()])
        summary[label] = {'final_test_acc_mean': final.mean(), 'final_test_acc_std': final.std()}
        print(f'{label:>8}: final test accuracy {final.mean():.2f} ± {final.std():.2f}%')
    if len(args.seeds) == 1:
        print(
            'one seed: a single run, no spread. Differences of a point or so are within seed '
            'noise at this size; pass several --seeds for mean ± std.'
        )

    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        'args': {k: str(v) if isinstance(v, pathlib.Path) else v for k, v in vars(args).items()},
        'summary': summary,
        'runs': results,
    }
    (args.out / 'results.json').write_text(json.dumps(report, indent=2))
    seeds = f'{len(args.seeds)} seed' + ('s' if len(args.seeds) > 1 else '')
    title = (
        f'{args.dataset}, {args.model}, {args.optimizer} lr {args.lr:g}, λ {args.lam:g}, '
        f'{args.standardize}, {seeds}'
    )
    plot(results, args.out / 'accuracy.png', title)
    print(f'wrote {args.out / "results.json"} and {args.out / "accuracy.png"}')
    return report


if __name__ == '__main__':
    main()
