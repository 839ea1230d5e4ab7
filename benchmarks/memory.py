"""Extra temporary memory of a jitted TrAct step over a plain step (XLA memory analysis).

    python -m benchmarks.memory                       # batch 64 per device
    python -m benchmarks.memory --batch 128

Compiles (does not run) a plain ``adam`` step and a ``chain(tract(0.1), adam)`` step
for a ResNet-50 (7x7/2 stem on 224x224x3) and a ViT-B/16 (16x16 patch embedding) and
reports XLA's ``temp_size_in_bytes`` of each: the activations and scratch a step
needs beyond its arguments and outputs. The stem's unfolded patches are built in
chunks of at most ``tract_jax``'s 64 MiB, so they never exist for the whole batch.
Writes ``benchmarks/results/memory.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import platform

import jax
import optax

from examples import models, steps

RESULTS = pathlib.Path(__file__).parent / 'results'
MODELS = {
    'resnet50 (7x7/2 stem)': lambda: models.resnet50(1000),
    'vit_b16 (16x16 patch embed)': lambda: models.vit_base(16, 1000),
}


def temp_mib(model, tx, use_tract, batch):
    x = jax.ShapeDtypeStruct((batch, 224, 224, 3), 'float32')
    y = jax.ShapeDtypeStruct((batch,), 'int32')
    variables = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jax.numpy.ones((1, 224, 224, 3)))
    )
    opt_state = jax.eval_shape(tx.init, variables['params'])
    step = steps.make_train_step(model, tx, use_tract)
    compiled = step.lower(
        variables['params'], variables.get('batch_stats', {}), opt_state, x, y
    ).compile()
    return compiled.memory_analysis().temp_size_in_bytes / 2**20


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--batch', type=int, default=64)
    parser.add_argument('--out', type=pathlib.Path, default=RESULTS)
    args = parser.parse_args(argv)
    rows = []
    for name, factory in MODELS.items():
        model = factory()
        plain = temp_mib(model, steps.make_optimizer(optax.adam(1e-3), None), False, args.batch)
        tract = temp_mib(model, steps.make_optimizer(optax.adam(1e-3), 0.1), True, args.batch)
        rows.append(
            {
                'model': name,
                'batch': args.batch,
                'plain_temp_mib': plain,
                'tract_temp_mib': tract,
                'extra_pct': 100 * (tract / plain - 1),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    meta = {
        'date': datetime.date.today().isoformat(),
        'machine': f'{platform.machine()}, {jax.devices()[0].device_kind}',
        'jax': jax.__version__,
        'command': 'python -m benchmarks.memory ' + ' '.join(argv or []),
    }
    lines = [
        f'Compiled {meta["date"]} on {meta["machine"]} (jax {meta["jax"]}).',
        '',
        '| model | batch | plain step temp | TrAct step temp | extra |',
        '|---|---|---|---|---|',
    ] + [
        f'| {r["model"]} | {r["batch"]} | {r["plain_temp_mib"]:.0f} MiB | '
        f'{r["tract_temp_mib"]:.0f} MiB | {r["extra_pct"]:+.2f}% |'
        for r in rows
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / 'memory.json').write_text(json.dumps({'meta': meta, 'rows': rows}, indent=2))
    (args.out / 'memory.md').write_text('\n'.join(lines) + '\n')
    print('\n'.join(lines))


if __name__ == '__main__':
    main()
