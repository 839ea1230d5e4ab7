"""How often the localhost multi-process runs hang: the example and the two-process check.

    python -m benchmarks.multiprocess_stress                 # 20 + 20 runs, a CPU a process
    python -m benchmarks.multiprocess_stress --devices 2     # as before issue 39: 2 CPUs a process
    python -m benchmarks.multiprocess_stress --runs 5 --which example

Runs ``examples/distributed.py`` as 2 processes at its default 100 steps, and
``tests/multiprocess_check.py`` as 2 processes, each ``--runs`` times through
``examples/launch.py``, and counts the runs that hung (a collective that failed on
XLA's CPU collective timeout, or a job past its deadline), that failed otherwise, and
that finished. Not part of CI: a hang is rare per run, so it takes many runs to see.
"""

from __future__ import annotations

import argparse
import collections
import os
import pathlib
import sys
import time

import jax

from examples import launch

ROOT = pathlib.Path(__file__).parent.parent
JOBS = {
    'example': lambda address, i: [
        sys.executable,
        str(ROOT / 'examples' / 'distributed.py'),
        '--processes',
        '2',
        '--coordinator',
        address,
        '--process-id',
        str(i),
    ],
    'check': lambda address, i: [
        sys.executable,
        str(ROOT / 'tests' / 'multiprocess_check.py'),
        address,
        str(i),
    ],
}


def outcome(job: str, devices: int, deadline_s: float, collective_timeout_s: int) -> str:
    """``'finished'``, ``'hung'`` or ``'failed'``: one run of ``job`` as 2 processes."""
    address = launch.coordinator()
    env = {**os.environ, 'PYTHONPATH': str(ROOT)}
    try:
        launch.run(
            lambda i: JOBS[job](address, i),
            2,
            deadline_s=deadline_s,
            devices=devices,
            env=env,
            cwd=str(ROOT),
            collective_timeout_s=collective_timeout_s,
        )
    except launch.JobFailed as failed:
        text = str(failed)
        hung = 'still running after' in text or '(gloo) failed' in text
        if not hung:
            print(text[-2000:], flush=True)
        return 'hung' if hung else 'failed'
    return 'finished'


def main(argv: list[str] | None = None) -> dict[str, collections.Counter]:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--runs', type=int, default=20, help='runs of each job')
    parser.add_argument('--devices', type=int, default=1, help='CPU devices a process')
    parser.add_argument('--which', nargs='+', default=list(JOBS), choices=list(JOBS))
    parser.add_argument('--deadline', type=float, default=300, help='seconds a run may take')
    parser.add_argument(
        '--collective-timeout',
        type=int,
        default=launch.COLLECTIVE_TIMEOUT_S,
        help='seconds a CPU collective may wait',
    )
    args = parser.parse_args(argv)
    print(f'jax {jax.__version__}, {args.devices} CPU device(s) a process', flush=True)
    counts = {}
    for job in args.which:
        counts[job] = collections.Counter()
        for run in range(args.runs):
            start = time.monotonic()
            result = outcome(job, args.devices, args.deadline, args.collective_timeout)
            counts[job][result] += 1
            print(f'{job} run {run + 1}: {result} in {time.monotonic() - start:.0f} s', flush=True)
    for job, count in counts.items():
        print(
            f'{job}: {count["hung"]} hung, {count["failed"]} failed, '
            f'{count["finished"]} finished of {args.runs}',
            flush=True,
        )
    return counts


if __name__ == '__main__':
    main()
