"""Where does TrAct help? Plain vs TrAct over seeds and epoch budgets, with paired intervals.

    python -m examples.study --dataset fashion_mnist --model vit --patch 7 \\
        --budgets 1 2 4 --seeds 0 1 2 --out examples/runs/study/fmnist_vit7
    python -m examples.study --dataset npz --data-dir my_data.npz --model cnn_nonorm \\
        --lams 0.05 0.1 0.2

Each arm (plain, and TrAct at each ``--lams`` value) trains every seed from the same
initial weights and over the same batches in the same order, so the arms differ only in
the first layer's update. Each budget in ``--budgets`` is a full run with its own cosine
schedule (the paper's protocol: "TrAct at E epochs matches plain at 2E"). The seeds train
together, vmapped in one jitted epoch (a ``lax.scan`` over the batches), compiled once per
arm and reused for every budget; the data lives on the device.

For every budget it reports each arm's mean test accuracy, and for each TrAct arm the
paired difference (TrAct − plain, seed by seed) with a 95% Student-t interval, and the
paper's speedup measure: the smallest budget at which TrAct's mean reaches plain's mean at
the largest budget. Writes ``study.json`` (every run), ``study.md`` (the table) and
``study.png`` (accuracy vs budget, 95% bands) to ``--out``.

Optimizers: ``adam``, ``sgd`` (momentum 0.9), and ``sgd_adam``: the first layer by SGD
(momentum 0.9, ``--first-lr``) and the rest by Adam, via ``optax.multi_transform``; its
plain arm is the control (the same split without TrAct).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

if __package__ in (None, ''):  # run as a script: make `examples` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import tract_jax
from examples import data, models, steps

MODELS = ('cnn', 'cnn_nonorm', 'vit', 'vit_cifar')
OPTIMIZERS = ('adam', 'sgd', 'sgd_adam')


def cosine(peak: float, total_steps: jax.Array):
    """Cosine decay from ``peak`` to 0 over ``total_steps`` (a traced number: one compile)."""
    return lambda count: peak * 0.5 * (1 + jnp.cos(jnp.pi * jnp.minimum(count / total_steps, 1)))


def first_layer_labels(params):
    """``'first'`` for the stem's parameters, ``'rest'`` for every other."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: 'first' if path[0].key == 'stem' else 'rest', params
    )


def make_optimizer(args, total_steps, lam: float | None) -> optax.GradientTransformation:
    """The arm's optimizer; TrAct (when ``lam``) first in the chain, before any split."""
    if args.optimizer == 'adam':
        base = optax.adam(cosine(args.lr, total_steps))
    elif args.optimizer == 'sgd':
        base = optax.sgd(cosine(args.lr, total_steps), momentum=0.9)
    else:  # first layer by SGD, the rest by Adam
        first_lr = args.lr if args.first_lr is None else args.first_lr
        base = optax.multi_transform(
            {
                'first': optax.sgd(cosine(first_lr, total_steps), momentum=0.9),
                'rest': optax.adam(cosine(args.lr, total_steps)),
            },
            first_layer_labels,
        )
    return base if lam is None else optax.chain(tract_jax.tract(lam), base)


class Arm:
    """One arm (plain, or TrAct at one λ): jitted init, epoch and evaluation of every seed.

    ``loop='scan'`` trains the seeds batched (``vmap``) with a ``lax.scan`` over the
    batches: one dispatch per epoch, fast for transformers. ``loop='python'`` runs one
    jitted step per seed and batch: XLA's CPU backend runs convolutions inside a loop
    about 7x slower, and ``vmap`` over weights makes them grouped convolutions, 2.4x
    slower per seed (measured on a SmallCNN step here), so CNNs take this loop.
    """

    def __init__(self, args, model, lam: float | None):
        self.lam = lam
        train_step = steps.train_step(model, lam is not None, args.label_smoothing)

        def one_seed_step(carry, idx, images, labels, total_steps):
            tx = make_optimizer(args, total_steps, lam)
            *carry, loss = train_step(tx, *carry, images[idx], labels[idx])
            return tuple(carry), loss

        def one_seed_epoch(carry, order, images, labels, total_steps):
            carry, losses = jax.lax.scan(
                lambda carry, idx: one_seed_step(carry, idx, images, labels, total_steps),
                carry,
                order,
            )
            return carry, losses.mean()

        def one_seed_init(key, example):
            variables = model.init(key, example, train=False)
            params = variables['params']
            tx = make_optimizer(args, 1, lam)  # the state's structure does not depend on it
            return params, variables.get('batch_stats', {}), tx.init(params)

        def correct(params, batch_stats, images, labels):
            """How many of ``images`` the model classifies right (labels -1: never)."""
            variables = {'params': params, 'batch_stats': batch_stats}
            logits = model.apply(variables, images, train=False)
            return jnp.sum(jnp.argmax(logits, -1) == labels)

        def chunks(images, labels, size=1000):
            pad = -len(labels) % size
            images = jnp.pad(images, [(0, pad)] + [(0, 0)] * (images.ndim - 1))
            labels = jnp.pad(labels, (0, pad), constant_values=-1)
            return images.reshape(-1, size, *images.shape[1:]), labels.reshape(-1, size)

        def one_seed_accuracy(params, batch_stats, images, labels):
            n = len(labels)
            images, labels = chunks(images, labels, min(1000, n))
            hits = jax.lax.map(lambda xy: correct(params, batch_stats, *xy), (images, labels))
            return jnp.sum(hits) / n

        if args.loop == 'scan':
            accuracy = jax.jit(jax.vmap(one_seed_accuracy, in_axes=(0, 0, None, None)))
            self.init = jax.jit(jax.vmap(one_seed_init, in_axes=(0, None)))
            self.epoch = jax.jit(
                jax.vmap(one_seed_epoch, in_axes=(0, 0, None, None, None)), donate_argnums=0
            )
            self.accuracy = lambda carry, x, y: accuracy(carry[0], carry[1], x, y)
            return

        init, step = jax.jit(one_seed_init), jax.jit(one_seed_step, donate_argnums=0)
        correct = jax.jit(correct)

        def accuracy(carries, images, labels):
            batches = list(zip(*chunks(images, labels, min(1000, len(labels))), strict=True))
            hits = [sum(correct(c[0], c[1], x, y) for x, y in batches) for c in carries]
            return jnp.stack(hits) / len(labels)

        def epoch(carries, order, images, labels, total_steps):
            losses = []
            for i, seed_order in enumerate(order):
                seed_losses = []
                for idx in seed_order:
                    carries[i], loss = step(carries[i], idx, images, labels, total_steps)
                    seed_losses.append(loss)
                losses.append(jnp.mean(jnp.stack(seed_losses)))
            return carries, jnp.stack(losses)

        self.init = lambda keys, example: [init(key, example) for key in keys]
        self.epoch = epoch
        self.accuracy = accuracy


def run_arm(arm: Arm, args, train, test, budgets, label: str) -> dict:
    """Test accuracy (and final training loss) per budget and seed."""
    train_x, train_y = jnp.asarray(train.images), jnp.asarray(train.labels)
    test_x, test_y = jnp.asarray(test.images), jnp.asarray(test.labels)
    keys = jnp.stack([jax.random.key_data(jax.random.key(s)) for s in args.seeds])
    steps_per_epoch = len(train.labels) // args.batch_size
    out = {}
    for budget in budgets:
        start = time.perf_counter()
        carry = arm.init(jax.random.wrap_key_data(keys), train_x[:1])
        rngs = [np.random.default_rng(seed) for seed in args.seeds]  # same order, every arm
        total = jnp.asarray(steps_per_epoch * budget, jnp.float32)
        for _ in range(budget):
            order = np.stack(
                [
                    r.permutation(len(train.labels))[: steps_per_epoch * args.batch_size]
                    for r in rngs
                ]
            ).reshape(len(args.seeds), steps_per_epoch, args.batch_size)
            carry, losses = arm.epoch(carry, jnp.asarray(order), train_x, train_y, total)
        acc = np.asarray(arm.accuracy(carry, test_x, test_y)) * 100
        seconds = time.perf_counter() - start
        out[budget] = {
            'test_acc': acc.tolist(),
            'final_loss': np.asarray(losses).tolist(),
            'seconds': seconds,
        }
        print(
            f'{label:>14} {budget:3d} epochs: test '
            + ' '.join(f'{a:.2f}' for a in acc)
            + f'  (mean {acc.mean():.2f}; {seconds:.0f}s)',
            flush=True,
        )
    return out


def paired(tract: list[float], plain: list[float]) -> dict:
    """Mean of the seed-by-seed differences with a 95% Student-t interval."""
    from scipy import stats

    d = np.asarray(tract) - np.asarray(plain)
    n = len(d)
    mean = float(d.mean())
    if n < 2:
        return {'mean': mean, 'low': math.nan, 'high': math.nan, 'se': math.nan}
    se = float(d.std(ddof=1) / math.sqrt(n))
    half = float(stats.t.ppf(0.975, n - 1)) * se
    return {'mean': mean, 'low': mean - half, 'high': mean + half, 'se': se}


def first_budget_reaching(means: dict, target: float) -> int | None:
    """The smallest budget whose mean accuracy is at least ``target``, or None."""
    reached = [b for b, m in sorted(means.items()) if m >= target]
    return reached[0] if reached else None


def summarize(runs: dict, budgets: list[int]) -> dict:
    means = {arm: {b: float(np.mean(r[b]['test_acc'])) for b in budgets} for arm, r in runs.items()}
    top = max(budgets)
    summary = {'means': means, 'arms': {}}
    for arm in runs:
        if arm == 'plain':
            continue
        reach = first_budget_reaching(means[arm], means['plain'][top])
        summary['arms'][arm] = {
            'paired': {
                b: paired(runs[arm][b]['test_acc'], runs['plain'][b]['test_acc']) for b in budgets
            },
            'reaches_plain_at_largest_budget_at': reach,
            'speedup': top / reach if reach else None,
            'plain_reaches_its_largest_at': first_budget_reaching(means['plain'], means[arm][top]),
        }
    return summary


def markdown(args, runs: dict, summary: dict, budgets: list[int]) -> str:
    n = len(args.seeds)
    lines = [
        f'{describe(args)}; {n} seed{"s" if n > 1 else ""}; test accuracy [%], mean ± std over '
        'seeds; Δ = TrAct − plain, paired by seed, with its 95% interval.',
        '',
    ]
    arms = [a for a in runs if a != 'plain']
    header = '| epochs | plain | ' + ' | '.join(f'{a} | Δ [95% CI]' for a in arms) + ' |'
    lines += [header, '|' + '---|' * (2 + 2 * len(arms))]
    for b in budgets:
        plain = np.asarray(runs['plain'][b]['test_acc'])
        row = f'| {b} | {plain.mean():.2f} ± {plain.std(ddof=1) if n > 1 else 0:.2f} |'
        for a in arms:
            acc = np.asarray(runs[a][b]['test_acc'])
            p = summary['arms'][a]['paired'][b]
            sd = acc.std(ddof=1) if n > 1 else 0
            interval = f'{p["mean"]:+.2f} [{p["low"]:+.2f}, {p["high"]:+.2f}]'
            row += f' {acc.mean():.2f} ± {sd:.2f} | {interval} |'
        lines.append(row)
    lines.append('')
    top = max(budgets)
    for a in arms:
        s = summary['arms'][a]
        reach = s['reaches_plain_at_largest_budget_at']
        lines.append(
            f"- {a}: reaches plain's {top}-epoch mean at "
            + (f'{reach} epochs (speedup {s["speedup"]:g}×)' if reach else 'no budget tried')
        )
    return '\n'.join(lines) + '\n'


def describe(args) -> str:
    model = f'{args.model}' + (f' patch {args.patch}' if args.model.startswith('vit') else '')
    opt = f'{args.optimizer} lr {args.lr:g}'
    if args.optimizer == 'sgd_adam':
        opt += f' (first layer SGD lr {args.first_lr if args.first_lr is not None else args.lr:g})'
    return (
        f'{args.dataset} ({args.train_size or "all"} train), {model}, {args.standardize}, {opt}, '
        f'batch {args.batch_size}, label smoothing {args.label_smoothing:g}'
    )


def plot(args, runs: dict, summary: dict, budgets: list[int], path: pathlib.Path) -> None:
    """Left: each arm's mean accuracy per budget, 95% band of the mean. Right: the paired
    difference to plain per budget, with its 95% interval."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from scipy import stats

    fig, (ax, delta) = plt.subplots(1, 2, figsize=(9.6, 4.2))
    n = len(args.seeds)
    t = float(stats.t.ppf(0.975, n - 1)) if n > 1 else 0.0
    for arm, r in runs.items():
        acc = np.array([r[b]['test_acc'] for b in budgets])  # (budgets, seeds)
        mean = acc.mean(1)
        half = t * acc.std(1, ddof=1) / math.sqrt(n) if n > 1 else np.zeros_like(mean)
        (line,) = ax.plot(budgets, mean, marker='o', label=arm)
        ax.fill_between(budgets, mean - half, mean + half, alpha=0.2)
        if arm in summary['arms']:
            p = [summary['arms'][arm]['paired'][b] for b in budgets]
            errorbars(delta, budgets, p, color=line.get_color())
    delta.axhline(0, color='black', lw=0.8)
    for a in (ax, delta):
        budget_axis(a, budgets)
    ax.set_ylabel('test accuracy [%]')
    delta.set_ylabel('TrAct − plain [points], paired, 95% CI')
    ax.legend(fontsize=8)
    fig.suptitle(describe(args) + f', {n} seeds', fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def errorbars(ax, x, pairs: list[dict], **kwargs) -> None:
    """Paired differences (``paired``'s dicts) at ``x`` with their 95% intervals."""
    mid = np.array([p['mean'] for p in pairs])
    err = np.array([[p['mean'] - p['low'], p['high'] - p['mean']] for p in pairs]).T
    ax.errorbar(x, mid, yerr=err, marker='o', capsize=4, **kwargs)


def budget_axis(ax, budgets: list[int]) -> None:
    """Epoch budgets on a log₂ axis, each labelled."""
    ax.set_xscale('log', base=2)
    ax.set_xticks(budgets, [str(b) for b in budgets])
    ax.set_xlabel('epochs (each a full cosine run)')
    ax.grid(alpha=0.3)


def build_parser() -> argparse.ArgumentParser:
    """The command line; a function so that scripts calling this one can be checked."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--dataset', default='digits', choices=data.DATASETS)
    parser.add_argument('--data-dir', default=None, help='folder (or .npz file) with the data')
    parser.add_argument('--train-size', type=int, default=None, help='a fixed random subset')
    parser.add_argument('--standardize', default='channel', choices=('channel', 'raw255'))
    parser.add_argument('--model', default='cnn', choices=MODELS)
    parser.add_argument('--patch', type=int, default=7, help='ViT patch size')
    parser.add_argument('--optimizer', default='adam', choices=OPTIMIZERS)
    parser.add_argument('--lr', type=float, default=1e-3)
    parser.add_argument('--first-lr', type=float, default=None, help="sgd_adam's first layer")
    parser.add_argument('--label-smoothing', type=float, default=0.0)
    parser.add_argument('--lams', type=float, nargs='+', default=[0.1], help="TrAct's λ")
    parser.add_argument('--budgets', type=int, nargs='+', default=[1, 2, 4])
    parser.add_argument('--batch-size', type=int, default=128)
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--out', type=pathlib.Path, default=pathlib.Path('examples/runs/study'))
    parser.add_argument(
        '--loop',
        choices=('scan', 'python'),
        default=None,
        help='seeds vmapped and a lax.scan over batches, or a jitted step per seed and '
        'batch (default: scan for ViTs, python for CNNs, whose convolutions XLA:CPU runs '
        'slowly inside loops)',
    )
    parser.add_argument(
        '--merge',
        type=pathlib.Path,
        nargs='+',
        help='study.json files of one setting run with different seeds: write them as one',
    )
    return parser


def prepare(args) -> tuple[data.Split, data.Split, Any]:
    """The training split (``--train-size`` images drawn at random, the same draw in every
    run), the test split, and the model for their classes."""
    train, test = data.load(args.dataset, args.data_dir, args.standardize)
    if args.train_size is not None and args.train_size < len(train.labels):
        keep = np.random.default_rng(12345).permutation(len(train.labels))[: args.train_size]
        train = data.Split(train.images[keep], train.labels[keep])
    num_classes = int(max(train.labels.max(), test.labels.max()) + 1)
    return train, test, models.build(args.model, num_classes, args.patch)


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.out)
    if args.loop is None:
        args.loop = 'scan' if args.model.startswith('vit') else 'python'
    budgets = sorted(set(args.budgets))

    try:
        train, test, model = prepare(args)
    except data.MissingDataError as error:
        parser.exit(2, f'error: {error}\n')
    if len(train.labels) < args.batch_size:
        parser.error(f'--batch-size {args.batch_size} exceeds the {len(train.labels)} images')
    print(f'{describe(args)}; budgets {budgets}; seeds {args.seeds}', flush=True)

    start = time.perf_counter()
    runs = {}
    for lam in [None, *args.lams]:
        label = 'plain' if lam is None else f'TrAct λ={lam:g}'
        runs[label] = run_arm(Arm(args, model, lam), args, train, test, budgets, label)
    return write(args, runs, budgets, time.perf_counter() - start)


def write(args, runs: dict, budgets: list[int], seconds: float) -> dict:
    """Summarize, print the table, and write study.json, study.md and study.png."""
    summary = summarize(runs, budgets)
    table = markdown(args, runs, summary, budgets)
    print(table)
    if len(args.seeds) == 1:
        print('one seed: no interval; pass several --seeds.')

    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        'args': {k: str(v) if isinstance(v, pathlib.Path) else v for k, v in vars(args).items()},
        'describe': describe(args),
        'seconds': seconds,
        'runs': runs,
        'summary': summary,
    }
    (args.out / 'study.json').write_text(json.dumps(report, indent=1))
    (args.out / 'study.md').write_text(table)
    plot(args, runs, summary, budgets, args.out / 'study.png')
    print(f'wrote study.json, study.md, study.png to {args.out} ({seconds:.0f}s)')
    return report


def merge(paths: list[pathlib.Path], out: pathlib.Path) -> dict:
    """One study from several runs of the same setting with different seeds (each seed's
    result does not depend on which seeds trained beside it)."""
    reports = [json.loads(pathlib.Path(p).read_text()) for p in paths]
    how = ('seeds', 'out', 'merge', 'loop')  # how a study ran, not what it measured
    setting = [{k: v for k, v in r['args'].items() if k not in how} for r in reports]
    if any(s != setting[0] for s in setting):
        raise ValueError('--merge: the studies differ in more than their seeds and --out')
    args = argparse.Namespace(**reports[0]['args'])
    args.seeds = [seed for r in reports for seed in r['args']['seeds']]
    args.out = out
    if len(set(args.seeds)) != len(args.seeds):
        raise ValueError(f'--merge: a seed appears twice ({args.seeds})')
    budgets = sorted({int(b) for b in reports[0]['runs']['plain']})
    runs = {
        arm: {
            b: {
                key: [v for r in reports for v in r['runs'][arm][str(b)][key]]
                for key in ('test_acc', 'final_loss')
            }
            for b in budgets
        }
        for arm in reports[0]['runs']
    }
    return write(args, runs, budgets, sum(r['seconds'] for r in reports))


if __name__ == '__main__':
    main()
