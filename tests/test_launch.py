"""examples/launch.py: a job of processes on localhost fails loudly and leaves no process.

A hung multi-process run waits forever with no output and leaves its processes behind;
these tests show each way out: a failed process stops the job, a deadline stops it, a
collective that waits too long fails with gloo's message, and the processes die with
the launcher, also when it is killed from outside.
"""

import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import jax
import pytest

from examples import launch

ROOT = pathlib.Path(__file__).parent.parent


def _python(code: str) -> list[str]:
    return [sys.executable, '-c', textwrap.dedent(code)]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    with open(f'/proc/{pid}/stat') as stat:
        return stat.read().split(')')[-1].split()[0] != 'Z'


def _wait_gone(pids, seconds=10.0):
    end = time.monotonic() + seconds
    while time.monotonic() < end and any(map(_alive, pids)):
        time.sleep(0.05)
    return [pid for pid in pids if _alive(pid)]


def test_a_job_of_processes_returns_their_outputs():
    finished = launch.run(lambda i: _python(f'print("process {i}")'), 2, deadline_s=60)
    assert [f.output.strip() for f in finished] == ['process 0', 'process 1']
    assert [f.returncode for f in finished] == [0, 0]


def test_each_process_gets_one_cpu_device_and_the_collective_timeout():
    env = launch.process_env(base={'XLA_FLAGS': '--xla_force_host_platform_device_count=8'})
    assert env['JAX_PLATFORMS'] == 'cpu'
    timeout = [f'--xla_cpu_collective_timeout_seconds={launch.COLLECTIVE_TIMEOUT_S}']
    assert env['XLA_FLAGS'].split() == [
        '--xla_force_host_platform_device_count=1',
        *(timeout if launch.collective_timeout_supported() else []),
    ]


def test_the_collective_timeout_is_known_to_jaxlib_0_10_not_0_7():
    """An unknown XLA flag aborts every process at start: the launcher asks first."""
    release = tuple(int(part) for part in jax.__version__.split('.')[:2])
    if release >= (0, 10) or release <= (0, 7):  # the two ends CI tests; between, either
        assert launch.collective_timeout_supported() == (release >= (0, 10))


def test_a_failed_process_stops_the_others(tmp_path):
    pid_file = tmp_path / 'pid'
    code = {
        0: 'import sys, time; time.sleep(1); print("boom"); sys.exit(3)',
        1: f'import os, time; open({str(pid_file)!r}, "w").write(str(os.getpid())); '
        'time.sleep(120)',
    }
    start = time.monotonic()
    with pytest.raises(launch.JobFailed, match=r'process 0 of 2 exited with 3(.|\n)*boom'):
        launch.run(lambda i: _python(code[i]), 2, deadline_s=60)
    assert time.monotonic() - start < 30
    assert not _wait_gone([int(pid_file.read_text())])


def test_a_job_past_its_deadline_is_stopped():
    start = time.monotonic()
    with pytest.raises(launch.JobFailed, match='still running after 2 s'):
        launch.run(lambda i: _python('import time; time.sleep(120)'), 2, deadline_s=2)
    assert time.monotonic() - start < 30


def test_the_processes_die_with_a_launcher_killed_from_outside(tmp_path):
    """SIGKILL gives the launcher no chance to clean up: the kernel ends its processes
    (PR_SET_PDEATHSIG)."""
    launcher = _python(
        f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        from examples import launch
        # One write a line: the two processes share the pipe.
        code = 'import os, time; os.write(1, b"%d\\\\n" % os.getpid()); time.sleep(120)'
        launch.run(lambda i: [sys.executable, '-c', code], 2, deadline_s=120, capture=False)
        """
    )
    process = subprocess.Popen(launcher, stdout=subprocess.PIPE, text=True)
    pids = [int(process.stdout.readline()) for _ in range(2)]
    assert all(map(_alive, pids))
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not _wait_gone(pids)


@pytest.mark.skipif(
    not launch.collective_timeout_supported(),
    reason="this jaxlib has no CPU collective timeout: the launcher's deadline is all",
)
def test_a_collective_that_waits_too_long_fails_with_the_cause():
    """Both processes sum once; then process 0 sums again while process 1 never joins:
    with the collective timeout that sum fails (gloo's error) instead of waiting forever,
    and with ``fail_fast`` the process exits at once rather than waiting at shutdown."""
    code = f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from examples import launch
        launch.fail_fast()
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import NamedSharding, PartitionSpec as P
        jax.config.update('jax_cpu_collectives_implementation', 'gloo')
        jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
        mesh = jax.make_mesh((2,), ('d',))
        x = jax.make_array_from_process_local_data(
            NamedSharding(mesh, P('d')), np.ones((4,), np.float32))
        total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))
        print(float(total(x)), flush=True)
        if jax.process_index() == 1:
            time.sleep(120)
        print(float(total(x + 1)), flush=True)
        """
    address = launch.coordinator()
    start = time.monotonic()
    with pytest.raises(launch.JobFailed, match=r'process 0 of 2 exited(.|\n)*\(gloo\) failed'):
        launch.run(
            lambda i: [*_python(code), address, str(i)], 2, deadline_s=120, collective_timeout_s=5
        )
    assert time.monotonic() - start < 60
