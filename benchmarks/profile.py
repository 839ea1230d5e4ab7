"""Where a TrAct step's extra time goes: per-op times of the plain and TrAct steps.

    python -m benchmarks.profile                          # ViT-S/16, CPU batch
    python -m benchmarks.profile --model resnet50_imagenet --steps 10

Compiles the same two steps as ``benchmarks/overhead.py``, records ``--steps`` of
each with ``jax.profiler`` (a Perfetto trace per step kind under ``--out``), and
prints, per op kind (the op's name without its number), the mean time per step in
either step and the difference, largest first, then every run of each op that only
the TrAct step has. A wide spread in one op's runs (the same op taking 2 ms in one
step and 70 ms in the next) is what exposed jaxlib's threaded LAPACK contending
with XLA's thread pool; see the README, "Cost per step".
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import pathlib
import re

import jax

from benchmarks import overhead

_NOT_OPS = ('$', 'Thunk', 'Pjit', 'PjRt', 'Slinky', 'Common', 'end: ', 'Threadpool')


def op_times(trace_dir: pathlib.Path) -> dict[str, list[float]]:
    """Every run of every XLA op in the newest Perfetto trace under ``trace_dir``, in ms."""
    path = sorted(trace_dir.glob('plugins/profile/*/perfetto_trace.json.gz'))[-1]
    with gzip.open(path) as f:
        events = json.load(f)
    events = events['traceEvents'] if isinstance(events, dict) else events
    times = collections.defaultdict(list)
    for event in events:
        if event.get('ph') == 'X' and not event['name'].startswith(_NOT_OPS):
            times[event['name']].append(event['dur'] / 1e3)
    return times


def _kind(op: str) -> str:
    return re.sub(r'(\.\d+)+(\.clone)?$', '', op)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--model', default='vit_s16_imagenet', choices=list(overhead.MODELS))
    parser.add_argument('--steps', type=int, default=5)
    parser.add_argument('--top', type=int, default=15)
    parser.add_argument('--out', type=pathlib.Path, default=pathlib.Path('/tmp/tract_jax_profile'))
    args = parser.parse_args(argv)

    _, _, cpu_batch, acc_batch, _ = overhead.MODELS[args.model]
    batch = cpu_batch if jax.default_backend() == 'cpu' else acc_batch
    runs, x, y = overhead.compile_steps(args.model, batch)
    for _ in range(3):
        overhead.run_step(runs['plain'], x, y), overhead.run_step(runs['tract'], x, y)
    times = {}
    for kind in runs:
        with jax.profiler.trace(str(args.out / kind), create_perfetto_trace=True):
            for _ in range(args.steps):
                overhead.run_step(runs[kind], x, y)
        times[kind] = op_times(args.out / kind)

    per_kind = {}
    for kind, ops in times.items():
        totals = collections.Counter()
        for op, durations in ops.items():
            totals[_kind(op)] += sum(durations) / args.steps
        per_kind[kind] = totals
    plain, tract = per_kind['plain'], per_kind['tract']
    print(f'{args.model}, batch {batch}, {args.steps} steps each; traces in {args.out}')
    print(
        f'summed op time per step (all threads): plain {sum(plain.values()):.1f} ms, '
        f'TrAct {sum(tract.values()):.1f} ms'
    )
    print('\n| op kind | plain ms/step | TrAct ms/step | difference |\n|---|---|---|---|')
    kinds = sorted(set(plain) | set(tract), key=lambda k: -abs(tract[k] - plain[k]))
    for k in kinds[: args.top]:
        print(f'| {k} | {plain[k]:.2f} | {tract[k]:.2f} | {tract[k] - plain[k]:+.2f} |')
    only = {op: d for op, d in times['tract'].items() if _kind(op) not in plain}
    print('\n| op only in the TrAct step | runs (ms) |\n|---|---|')
    for op, durations in sorted(only.items(), key=lambda kv: -sum(kv[1]))[: args.top]:
        print(f'| {op} | {", ".join(f"{d:.2f}" for d in durations)} |')


if __name__ == '__main__':
    main()
