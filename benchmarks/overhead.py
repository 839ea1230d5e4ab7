"""TrAct's cost per training step, side by side with a plain step (and torch_tract).

    python -m benchmarks.overhead                 # all models, CPU-sized batches here
    python -m benchmarks.overhead --models resnet18_cifar --pairs 50
    python -m benchmarks.overhead --models resnet50_imagenet --plan-change segments=true \
        --out /tmp/segments    # the TrAct step under this platform's plan, changed

For each model it compiles a plain jitted step (``optax.adam``) and a TrAct step
(``chain(tract(0.1), adam)``), then times them *alternately* in one process after
warm-up, many pairs, so both see the same machine state; the figure is the median of
the per-pair ratios ``tract / plain`` with its interquartile range. It also reports
the extra FLOPs and bytes from XLA's cost analysis and the extra temporary memory
from its memory analysis of the compiled steps. Where torch and torch_tract are
installed it times the same models in PyTorch, plain vs ``TrAct(first_layer)``.

Writes ``benchmarks/results/overhead.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import pathlib
import platform
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from examples import models, steps
from tract_jax._src import choice

RESULTS = pathlib.Path(__file__).parent / 'results'

# name: (model factory, image side, CPU batch, accelerator batch, classes)
MODELS = {
    'resnet18_cifar': (lambda: models.resnet18(10), 32, 32, 128, 10),
    'vit_tiny4_cifar': (lambda: models.vit_tiny(4, 10), 32, 32, 128, 10),
    # batches on an accelerator: the first H100 run's protocol (issue 19)
    'resnet50_imagenet': (lambda: models.resnet50(1000), 224, 4, 64, 1000),
    'vit_s16_imagenet': (lambda: models.vit_small(16, 1000), 224, 8, 64, 1000),
    'vit_b16_imagenet': (lambda: models.vit_base(16, 1000), 224, 8, 64, 1000),
    # a model small enough to compile in seconds, for the scripts' smoke tests; no torch twin
    'smoke_cnn': (lambda: models.SmallCNN(10, width=8), 16, 4, 4, 10),
}
# ViT-B/16 is priced by benchmarks/compiled.py only: its CPU pairs would take too long.
MEASURED = [name for name in MODELS if name not in ('smoke_cnn', 'vit_b16_imagenet')]


def _analysis(compiled) -> dict[str, float]:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    memory = compiled.memory_analysis()
    return {
        'flops': float(cost.get('flops', np.nan)),
        'bytes': float(cost.get('bytes accessed', np.nan)),
        'temp_bytes': float(getattr(memory, 'temp_size_in_bytes', np.nan)),
    }


def _summary(plain: list[float], tract: list[float]) -> dict[str, Any]:
    ratios = np.asarray(tract) / np.asarray(plain)
    q1, med, q3 = np.percentile(ratios, [25, 50, 75])
    return {
        'plain_ms': 1e3 * float(np.median(plain)),
        'tract_ms': 1e3 * float(np.median(tract)),
        'overhead_pct': 100 * (med - 1),
        'overhead_iqr_pct': [100 * (q1 - 1), 100 * (q3 - 1)],
        'pairs': len(ratios),
    }


def plan_changes(pairs: list[str]) -> dict[str, Any]:
    """``FIELD=VALUE`` pairs as keywords for ``dataclasses.replace`` of a ``choice.Plan``:
    ``true``/``false``, ``none``, integers, or a precision's or dot algorithm preset's
    name (``high``, ``tf32_tf32_f32_x3``)."""
    fields = [f.name for f in dataclasses.fields(choice.Plan) if f.name != 'name']
    changes = {}
    for pair in pairs:
        name, _, text = pair.partition('=')
        if name not in fields:
            raise ValueError(f'--plan-change {pair!r}: a Plan field is one of {fields}')
        lower = text.lower()
        if lower in ('true', 'false', 'none'):
            changes[name] = {'true': True, 'false': False, 'none': None}[lower]
        elif text.isdigit():
            changes[name] = int(text)
        elif text.upper() in jax.lax.Precision.__members__:
            changes[name] = jax.lax.Precision[text.upper()]
        elif text.upper() in jax.lax.DotAlgorithmPreset.__members__:
            changes[name] = jax.lax.DotAlgorithmPreset[text.upper()]
        else:
            raise ValueError(f'--plan-change {pair!r}: {text!r} is no value a Plan field takes')
    return changes


def add_plan_change(parser: argparse.ArgumentParser, which: str) -> None:
    """The ``--plan-change FIELD=VALUE`` option; :func:`parsed_plan_changes` reads it."""
    parser.add_argument(
        '--plan-change',
        nargs='+',
        default=[],
        metavar='FIELD=VALUE',
        help=f'{which} changed so (e.g. segments=true); needs --out',
    )


def parsed_plan_changes(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> dict[str, Any]:
    """``--plan-change`` as :func:`plan_changes`; refused without an ``--out`` of its own,
    so that the plans' own results are never overwritten."""
    changes = plan_changes(args.plan_change)
    if changes and args.out == parser.get_default('out'):
        parser.error("--plan-change needs --out: these are not the plans' figures")
    return changes


def compile_steps(
    name: str, batch: int, changes: dict[str, Any] | None = None
) -> tuple[dict[str, list[Any]], jax.Array, jax.Array]:
    """The compiled plain and TrAct steps of a model, each with its initial state; the
    TrAct step under this platform's plan with ``changes`` (``Plan`` fields).

    Returns ``({'plain': [compiled, state], 'tract': [compiled, state]}, x, y)``; a
    step is run as ``compiled(*state, x, y)`` and returns the next state and the loss.
    """
    factory, side, _, _, classes = MODELS[name]
    model = factory()
    x = jax.random.normal(jax.random.key(0), (batch, side, side, 3))
    y = jax.random.randint(jax.random.key(1), (batch,), 0, classes)
    variables = model.init(jax.random.key(2), x[:1], train=False)
    runs = {}
    for kind, lam in (('plain', None), ('tract', 0.1)):
        tx = steps.make_optimizer(optax.adam(1e-3), lam)
        step = steps.make_train_step(model, tx, use_tract=lam is not None)
        params = jax.tree.map(jnp.copy, variables['params'])
        state = [
            params,
            jax.tree.map(jnp.copy, variables.get('batch_stats', {})),
            tx.init(params),
        ]
        with choice.changed(jax.default_backend(), **(changes or {})):
            runs[kind] = [step.lower(*state, x, y).compile(), state]
    return runs, x, y


def run_step(run: list[Any], x: jax.Array, y: jax.Array) -> float:
    """Runs one step of ``run = [compiled, state]``, keeps its new state; seconds taken."""
    compiled, state = run
    start = time.perf_counter()
    *new_state, loss = compiled(*state, x, y)
    jax.block_until_ready(loss)
    run[1] = new_state
    return time.perf_counter() - start


def bench_jax(
    name: str, batch: int, pairs: int, warmup: int, changes: dict[str, Any] | None = None
) -> dict[str, Any]:
    runs, x, y = compile_steps(name, batch, changes)
    analysis = {kind: _analysis(compiled) for kind, (compiled, _) in runs.items()}

    for _ in range(warmup):
        run_step(runs['plain'], x, y), run_step(runs['tract'], x, y)
    times = {'plain': [], 'tract': []}
    for i in range(pairs):
        order = ('plain', 'tract') if i % 2 == 0 else ('tract', 'plain')
        for kind in order:
            times[kind].append(run_step(runs[kind], x, y))
    result = _summary(times['plain'], times['tract'])
    p, t = analysis['plain'], analysis['tract']
    result.update(
        batch=batch,
        extra_flops_pct=100 * (t['flops'] / p['flops'] - 1),
        extra_bytes_pct=100 * (t['bytes'] / p['bytes'] - 1),
        plain_temp_mib=p['temp_bytes'] / 2**20,
        extra_temp_mib=(t['temp_bytes'] - p['temp_bytes']) / 2**20,
        extra_temp_pct=100 * (t['temp_bytes'] / p['temp_bytes'] - 1),
    )
    return result


def bench_torch(name: str, batch: int, pairs: int, warmup: int) -> dict[str, Any] | None:
    try:
        import torch
        import torch_tract  # noqa: F401
    except ImportError:
        return None
    from benchmarks import torch_models

    _, side, _, _, classes = MODELS[name]
    result = _summary(*torch_models.bench(name, batch, pairs, warmup, side, classes))
    result.update(
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        device=torch_models.device_name(),
    )
    return result


def _extra_ms(result: dict[str, Any]) -> float:
    """TrAct's absolute cost per step: the plain step's median times the median ratio − 1."""
    return result['plain_ms'] * result['overhead_pct'] / 100


def _markdown(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    lines = [
        f'Measured {meta["date"]} on {meta["machine"]} ({meta["backend"]}), `{meta["command"]}`.',
        '',
        '| model | batch | plain ms | TrAct ms | overhead (IQR) | extra ms | extra FLOPs '
        '| extra temp mem | torch plain ms | torch_tract overhead (IQR) | torch_tract extra ms |',
        '|---|---|---|---|---|---|---|---|---|---|---|',
    ]
    for r in rows:
        j = r['jax']
        t = r.get('torch')
        torch_cells = (
            f'{t["plain_ms"]:.1f} | {t["overhead_pct"]:+.1f}% ({t["overhead_iqr_pct"][0]:+.1f}, '
            f'{t["overhead_iqr_pct"][1]:+.1f}) | {_extra_ms(t):+.1f}'
            if t
            else 'n/a | n/a | n/a'
        )
        lines.append(
            f'| {r["model"]} | {j["batch"]} | {j["plain_ms"]:.1f} | {j["tract_ms"]:.1f} | '
            f'{j["overhead_pct"]:+.2f}% ({j["overhead_iqr_pct"][0]:+.1f}, '
            f'{j["overhead_iqr_pct"][1]:+.1f}) | {_extra_ms(j):+.1f} | '
            f'{j["extra_flops_pct"]:+.2f}% | '
            f'{j["extra_temp_mib"]:+.1f} MiB ({j["extra_temp_pct"]:+.1f}%) | {torch_cells} |'
        )
    return '\n'.join(lines) + '\n'


def _plot(rows: list[dict[str, Any]], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    names = [r['model'] for r in rows]
    pos = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(8, 4))
    for offset, key, label in ((-0.2, 'jax', 'tract_jax'), (0.2, 'torch', 'torch_tract')):
        vals = [r[key]['overhead_pct'] if r.get(key) else np.nan for r in rows]
        lo = [
            r[key]['overhead_pct'] - r[key]['overhead_iqr_pct'][0] if r.get(key) else 0
            for r in rows
        ]
        hi = [
            r[key]['overhead_iqr_pct'][1] - r[key]['overhead_pct'] if r.get(key) else 0
            for r in rows
        ]
        ax.bar(pos + offset, vals, 0.4, yerr=[lo, hi], label=label, capsize=3)
    ax.axhline(0, color='black', lw=0.8)
    ax.set_xticks(pos, names, rotation=15)
    ax.set_ylabel('step-time overhead of TrAct [%]\n(median, IQR over pairs)')
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--models', nargs='+', default=MEASURED, choices=list(MODELS))
    parser.add_argument('--pairs', type=int, default=30)
    parser.add_argument('--warmup', type=int, default=3)
    parser.add_argument('--batch', type=int, default=None, help='override every batch size')
    parser.add_argument('--no-torch', action='store_true')
    parser.add_argument('--out', type=pathlib.Path, default=RESULTS)
    add_plan_change(parser, "the TrAct step under this platform's plan")
    args = parser.parse_args(argv)
    if 'smoke_cnn' in args.models and not args.no_torch:
        parser.error('smoke_cnn has no PyTorch twin: pass --no-torch with it')
    changes = parsed_plan_changes(parser, args)

    backend = jax.default_backend()
    rows = []
    for name in args.models:
        _, _, cpu_batch, acc_batch, _ = MODELS[name]
        batch = args.batch or (cpu_batch if backend == 'cpu' else acc_batch)
        row = {'model': name, 'jax': bench_jax(name, batch, args.pairs, args.warmup, changes)}
        if not args.no_torch:
            row['torch'] = bench_torch(name, batch, args.pairs, args.warmup)
        print(json.dumps(row), flush=True)
        rows.append(row)

    meta = {
        'date': datetime.date.today().isoformat(),
        'machine': f'{platform.machine()}, {jax.devices()[0].device_kind}, '
        f'{jax.local_device_count()} device(s)',
        'backend': backend,
        'jax_device': str(jax.devices()[0]),
        'jax': jax.__version__,
        'command': 'python -m benchmarks.overhead '
        + ' '.join(argv if argv is not None else __import__('sys').argv[1:]),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / 'overhead.json').write_text(json.dumps({'meta': meta, 'rows': rows}, indent=2))
    (args.out / 'overhead.md').write_text(_markdown(meta, rows))
    _plot(rows, args.out / 'overhead.png')
    print(_markdown(meta, rows))


if __name__ == '__main__':
    main()
