"""One job of several processes on localhost, as a pod runs one process per host.

A demo and test harness for ``jax.distributed`` on one CPU machine: each process gets
the coordinator's address and its id on its command line, and the CPU collectives
between processes run over gloo. Two things make that reliable here:

- **One CPU device per process** (``devices=1``). With two or more simulated devices
  in a process, XLA:CPU's collectives deadlock now and then when steps are queued
  without waiting for their results: a two-process job of jitted sums over a sharded
  batch hung in 4 of 4 runs with 2 devices a process (3 of 3 with async dispatch off)
  and finished in 3 of 3 with one, or with 2 devices and each sum's value read (jax
  0.10.2; the cause inside XLA is not known here; openxla/xla#16430 reports a crash in
  that setting). A job that needs more devices starts more
  processes; ``examples/distributed.py`` also waits for each step on CPU devices.
- **A hang is an error.** Every process runs with XLA's CPU collective timeout
  (``COLLECTIVE_TIMEOUT_S``; jaxlib 0.10 has it, 0.7 not), so a collective that waits
  longer fails with gloo's message; the launcher gives the whole job a deadline, kills
  every process once one fails, and its processes die with it (``PR_SET_PDEATHSIG`` on
  Linux), also when it is killed from outside. A process that calls :func:`fail_fast`
  exits as soon as it fails, not after ``jax.distributed``'s shutdown has waited for the
  others.

Real hosts use NCCL (GPUs) or the TPU interconnect, not gloo: none of this applies there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

COLLECTIVE_TIMEOUT_S = 60
"""The longest a CPU collective may wait for the other processes before it fails."""


class JobFailed(RuntimeError):
    """A process of the job failed, or the job outran its deadline; says which and why."""


@dataclasses.dataclass
class Finished:
    """One process of a finished job."""

    returncode: int
    output: str  # its stdout and stderr, when captured


def coordinator() -> str:
    """``host:port`` of a free port on localhost, for ``jax.distributed.initialize``."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return f'127.0.0.1:{s.getsockname()[1]}'


@functools.cache
def collective_timeout_supported() -> bool:
    """Whether this Python's jaxlib knows XLA's CPU collective timeout flag (jaxlib 0.10
    does; 0.7 aborts at start on an unknown flag). Asked once, of a child process."""
    env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
    env['XLA_FLAGS'] = f'--xla_cpu_collective_timeout_seconds={COLLECTIVE_TIMEOUT_S}'
    probe = [sys.executable, '-c', 'import jax; jax.devices()']
    return subprocess.run(probe, env=env, capture_output=True, timeout=120).returncode == 0


def process_env(
    devices: int = 1,
    base: dict[str, str] | None = None,
    collective_timeout_s: int = COLLECTIVE_TIMEOUT_S,
) -> dict[str, str]:
    """The environment of one process: the CPU platform, ``devices`` simulated CPU
    devices and, where jaxlib knows it, the collective timeout added to ``XLA_FLAGS``
    (any device count there replaced); elsewhere the launcher's deadline is all."""
    env = dict(os.environ if base is None else base)
    flags = [f for f in env.get('XLA_FLAGS', '').split() if 'device_count' not in f]
    flags.append(f'--xla_force_host_platform_device_count={devices}')
    if collective_timeout_supported():
        flags.append(f'--xla_cpu_collective_timeout_seconds={collective_timeout_s}')
    return {**env, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': ' '.join(flags)}


def fail_fast() -> None:
    """Called in a process of a job: an uncaught error ends the process at once, with its
    traceback, rather than at exit, where ``jax.distributed``'s shutdown waits up to 5
    minutes for the other processes; so the launcher sees the failure and stops the job."""

    def hook(kind, value, traceback):  # pragma: no cover - runs in the job's processes
        sys.__excepthook__(kind, value, traceback)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)

    sys.excepthook = hook


# Each process starts as this few lines of Python, which ask Linux to kill the process
# when the launcher ends (PR_SET_PDEATHSIG, kept across exec), then exec its command. Not
# subprocess's preexec_fn: that forks the launcher, and a fork of a process running
# JAX's threads can deadlock in the child (JAX warns of it).
_DIE_WITH_LAUNCHER = """
import ctypes, os, signal, sys
if sys.platform.startswith('linux'):
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
    if os.getppid() != int(sys.argv[1]):  # the launcher ended before the call
        sys.exit(1)
os.execvp(sys.argv[2], sys.argv[2:])
"""


def _cause(output: str) -> str:
    """What a failed process's output says went wrong, where it is a known cause."""
    if 'gloo' in output.lower():
        return (
            ' A CPU collective (gloo) failed: one that waits longer than the collective '
            'timeout for the other processes fails; with more than one CPU device a '
            'process and steps queued, they deadlock now and then.'
        )
    return ''


def run(
    command: Callable[[int], Sequence[str]],
    processes: int,
    *,
    deadline_s: float,
    devices: int = 1,
    capture: bool = True,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
    collective_timeout_s: int = COLLECTIVE_TIMEOUT_S,
) -> list[Finished]:
    """Runs ``command(i)`` for ``i`` in ``range(processes)`` as one job.

    Args:
      command: the command line of process ``i``.
      processes: how many processes.
      deadline_s: how long the whole job may take.
      devices: simulated CPU devices per process.
      capture: keep each process's output (else it goes to this process's stdout).
      env: the environment to start from (default: this process's).
      cwd: the processes' working directory.
      collective_timeout_s: how long a CPU collective may wait for the other processes.

    Returns:
      Each process's exit code and output, all zero.

    Raises:
      JobFailed: a process failed (the others are killed; the message has its output
        when captured), or the job was still running at the deadline (all are killed).
    """
    env = process_env(devices, env, collective_timeout_s)
    with contextlib.ExitStack() as stack:
        logs = [
            stack.enter_context(tempfile.TemporaryFile('w+')) if capture else None
            for _ in range(processes)
        ]
        launcher = [sys.executable, '-c', _DIE_WITH_LAUNCHER, str(os.getpid())]
        children = [
            subprocess.Popen(
                [*launcher, *command(i)],
                stdout=log,
                stderr=subprocess.STDOUT if capture else None,
                env=env,
                cwd=cwd,
            )
            for i, log in enumerate(logs)
        ]

        def output(i: int) -> str:
            if logs[i] is None:
                return ''
            logs[i].seek(0)
            return logs[i].read()

        try:
            start = time.monotonic()
            while True:
                codes = [child.poll() for child in children]
                failed = next((i for i, code in enumerate(codes) if code), None)
                if failed is not None:
                    raise JobFailed(
                        f'process {failed} of {processes} exited with {codes[failed]}; the '
                        f'others were stopped.{_cause(output(failed))} Its output:\n'
                        f'{output(failed)[-4000:]}'
                    )
                if None not in codes:
                    return [Finished(code, output(i)) for i, code in enumerate(codes)]
                if time.monotonic() - start > deadline_s:
                    raise JobFailed(
                        f'the {processes} processes were still running after {deadline_s:.0f} '
                        's and were stopped: a process or a collective is waiting for the '
                        'others (with more than one CPU device a process and steps '
                        'queued, CPU collectives deadlock now and then). Outputs:\n'
                        + '\n'.join(f'[{i}] {output(i)[-2000:]}' for i in range(processes))
                    )
                time.sleep(0.1)
        finally:
            for child in children:
                if child.poll() is None:
                    child.kill()
                    child.wait()
