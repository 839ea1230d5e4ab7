"""TrAct's extra time on the first layer alone, tract_jax next to torch_tract.

    python -m benchmarks.first_layer       # writes benchmarks/results/first_layer.md

A whole training step on this CPU takes 0.2-2 s and varies by a few percent from one
step to the next, more than TrAct's few milliseconds: ``benchmarks/overhead.py`` can
bound TrAct's cost per step but not resolve it. Here each framework's first layer
(those of the benchmark models, ``benchmarks/micro.py``'s layers) is timed alone,
forward and backward for a fixed output cotangent, plain and with TrAct:

- tract_jax: ``flax.linen.Conv`` and its kernel gradient, vs ``tract_jax.Conv``
  recording its statistic, its kernel gradient and ``tract(0.1)``'s update of it;
- torch_tract (where torch and torch_tract are installed): ``torch.nn.Conv2d`` vs
  ``TrAct(conv)``, whose backward unfolds the input and solves.

The four are called in turn, round after round, and TrAct's extra milliseconds are the
median over rounds of the TrAct call's time minus the plain one's in the same round.
That is TrAct's whole work per step in both frameworks (nothing else in a step
changes); what this leaves out is how that work overlaps the rest of a step.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import platform
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import tract_jax
from benchmarks.micro import LAYERS, Call, interleaved, layer_shape

LAM = 0.1


def jax_calls(shape, kernel, strides, padding, features) -> dict[str, Call]:
    """The plain and the TrAct first layer's gradient step, jitted, for channels-last input."""
    x = jax.random.normal(jax.random.key(0), shape)
    fields = dict(strides=strides, padding=padding, use_bias=False)
    plain, layer = nn.Conv(features, kernel, **fields), tract_jax.Conv(features, kernel, **fields)
    params = plain.init(jax.random.key(1), x)['params']
    cotangent = jax.random.normal(
        jax.random.key(2), jax.eval_shape(plain.apply, {'params': params}, x).shape
    )
    tx = tract_jax.tract(LAM)
    state = tx.init(params)

    @jax.jit
    def plain_grad(params, x):
        return jax.grad(lambda p: jnp.vdot(plain.apply({'params': p}, x), cotangent))(params)

    @jax.jit
    def tract_update(params, x):
        def loss(p):
            y, variables = layer.apply({'params': p}, x, mutable=['tract'])
            return jnp.vdot(y, cotangent), variables['tract']

        grads, stats = jax.grad(loss, has_aux=True)(params)
        return tx.update(grads, state, tract_stats=stats)[0]

    return {'jax plain': (plain_grad, (params, x)), 'jax TrAct': (tract_update, (params, x))}


def _extra(times: dict[str, np.ndarray], framework: str) -> tuple[float, float, float]:
    """Quartiles over rounds of the TrAct call's time minus the plain call's."""
    q1, median, q3 = np.percentile(
        times[f'{framework} TrAct'] - times[f'{framework} plain'], [25, 50, 75]
    )
    return float(q1), float(median), float(q3)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--runs', type=int, default=30, help='rounds')
    parser.add_argument('--layers', nargs='+', default=list(LAYERS), choices=list(LAYERS))
    parser.add_argument('--no-torch', action='store_true', help='time tract_jax only')
    parser.add_argument(
        '--out', type=pathlib.Path, default=pathlib.Path(__file__).parent / 'results'
    )
    args = parser.parse_args(argv)
    torch_calls, torch_device = None, None
    if not args.no_torch:
        try:
            from benchmarks.torch_models import device_name
            from benchmarks.torch_models import first_layer_calls as torch_calls

            torch_device = device_name()
        except ImportError:
            print('torch or torch_tract not installed: tract_jax only', flush=True)

    rows = []
    for name in args.layers:
        _, kernel, strides, padding, features = LAYERS[name]
        shape = layer_shape(name)
        calls = jax_calls(shape, kernel, strides, padding, features)
        frameworks = ['jax']
        if torch_calls is not None and len(kernel) == 2:  # torch_tract: Conv2d only
            calls.update(torch_calls(shape, kernel, strides, padding, features, LAM))
            frameworks.append('torch')
        times = interleaved(calls, runs=args.runs)
        row = {'layer': name, 'batch': shape[0], 'runs': args.runs}
        for framework in frameworks:
            row[framework] = {
                'plain_ms': float(np.median(times[f'{framework} plain'])),
                'tract_ms': float(np.median(times[f'{framework} TrAct'])),
                'extra_ms_quartiles': _extra(times, framework),
            }
        print(row, flush=True)
        rows.append(row)

    def cells(result):
        if result is None:
            return '— | — | —'
        q1, median, q3 = result['extra_ms_quartiles']
        extra = f'{median:+.2f} ({q1:+.2f}, {q3:+.2f})'
        return f'{result["plain_ms"]:.2f} | {result["tract_ms"]:.2f} | {extra}'

    meta = {
        'date': datetime.date.today().isoformat(),
        'machine': platform.machine(),
        'jax_device': str(jax.devices()[0]),
        'jax': jax.__version__,
        'torch_device': torch_device,
        'runs': args.runs,
    }
    torch_on = f'; torch on {torch_device}' if torch_device else ''
    lines = [
        f'Measured {meta["date"]} on {platform.machine()} ({meta["jax_device"]}, jax '
        f'{jax.__version__}{torch_on}), `python -m benchmarks.first_layer`, '
        f'{args.runs} rounds; the first layer alone, forward and backward, medians in ms; '
        'extra: median (quartiles) over rounds of TrAct minus plain in the same round.',
        '',
        '| layer | batch | plain (jax) | TrAct (tract_jax) | tract_jax extra ms '
        '| plain (torch) | TrAct (torch_tract) | torch_tract extra ms |',
        '|---|---|---|---|---|---|---|---|',
        *(
            f'| {row["layer"]} | {row["batch"]} | {cells(row["jax"])} | {cells(row.get("torch"))} |'
            for row in rows
        ),
    ]
    print('\n'.join(lines))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / 'first_layer.md').write_text('\n'.join(lines) + '\n')
    (args.out / 'first_layer.json').write_text(json.dumps({'meta': meta, 'rows': rows}, indent=2))
    return rows


if __name__ == '__main__':
    main()
