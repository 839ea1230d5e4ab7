"""Global-batch statistics on 8 simulated CPU devices (jit over a mesh, shard_map, pmap)
and across two processes on localhost (jax.distributed, gloo; examples/launch.py).

XLA_FLAGS has to be set before jax is imported, so the checks run in subprocesses
(tests/multidevice_check.py, tests/multiprocess_check.py); each prints 'ok <name>'
after comparing, in float64, the distributed update with the single-device update on
the whole batch.
"""

import os
import pathlib
import subprocess
import sys

import pytest

from examples import launch

HERE = pathlib.Path(__file__).parent
CHECKS = [
    *(f'every plan sharded, {stem}: statistics' for stem in ('3x3/1', '7x7/2', '4x4/4')),
    'every plan sharded, 3x3x3/1x2x2: statistics',
    *(
        f'every plan, 8 devices, {stem}: all-reduces, no gather'
        for stem in ('ResNet-50', 'ViT-B/16', 'CIFAR', 'video')
    ),
    'equinox, jit, data mesh (8)',
    'jit, data mesh (8)',
    'jit, data x model mesh (4x2)',
    'jit, data mesh (8), Pallas kernel',
    'explicit sharding, conv stem, batch 16: statistics',
    'explicit sharding, dense stem, batch 16: statistics',
    'explicit sharding, dense stem, batch 32: statistics',
    'shard_map, conv stem, 2 per device',
    'pmap, conv stem, 2 per device',
    'shard_map, dense stem, 2 per device',
    'pmap, dense stem, 2 per device',
    'shard_map, dense stem, 4 per device',
    'pmap, dense stem, 4 per device',
]


def _env():
    env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
    # The scripts set their own device count; keep the suite's compile flags (conftest.py).
    env['XLA_FLAGS'] = ' '.join(
        flag for flag in os.environ.get('XLA_FLAGS', '').split() if 'device_count' not in flag
    )
    env['JAX_PLATFORMS'] = 'cpu'  # 8 simulated CPU devices, also where a GPU is present
    env['PYTHONPATH'] = os.pathsep.join([str(HERE.parent), env.get('PYTHONPATH', '')])
    return env


def _run(script, *args):
    return subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=600,
        cwd=HERE.parent,
    )


@pytest.fixture(scope='module')
def multidevice_output():
    result = _run(HERE / 'multidevice_check.py')
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.splitlines()


@pytest.mark.parametrize('check', CHECKS)
def test_distributed_update_equals_single_device(check, multidevice_output):
    assert f'ok {check}' in multidevice_output


def test_distributed_example_trains_on_8_devices():
    result = _run(HERE.parent / 'examples' / 'distributed.py', '--steps', '30')
    assert result.returncode == 0, result.stdout + result.stderr
    assert 'devices: 8' in result.stdout
    first, last = (
        float(line.split()[-1])
        for line in result.stdout.splitlines()
        if line.startswith(('first loss', 'last loss'))
    )
    assert last < first


MULTIPROCESS_CHECKS = [
    'jit, conv stem, batch 16 over 2 processes',
    'shard_map, conv stem, batch 16 over 2 processes',
    'conv stem: without process 1',
    'jit, dense stem, batch 32 over 2 processes',
    'shard_map, dense stem, batch 32 over 2 processes',
    'dense stem: without process 1',
]


@pytest.fixture(scope='module')
def multiprocess_outputs():
    """Both processes' lines; each process checks its own copy of the update. A process
    that fails, or a job still running after 300 s, fails the tests with the outputs."""
    address = launch.coordinator()

    def command(i):
        return [sys.executable, str(HERE / 'multiprocess_check.py'), address, str(i)]

    finished = launch.run(command, 2, deadline_s=300, env=_env(), cwd=HERE.parent)
    return [process.output.splitlines() for process in finished]


@pytest.mark.parametrize('check', MULTIPROCESS_CHECKS)
def test_two_processes_update_equals_whole_batch_update(check, multiprocess_outputs):
    for lines in multiprocess_outputs:
        assert any(line.startswith(f'ok {check}') for line in lines), lines


def test_distributed_example_trains_on_2_processes():
    result = _run(
        HERE.parent / 'examples' / 'distributed.py',
        '--processes',
        '2',
        '--steps',
        '30',
        '--deadline',
        '300',
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    for process in (0, 1):
        prefix = f'[process {process}] '
        assert f'{prefix}devices: 2, processes: 2' in lines
        first, last = (
            float(line.split()[-1])
            for line in lines
            if line.startswith((f'{prefix}first loss', f'{prefix}last loss'))
        )
        assert last < first
    losses = {line.split()[-1] for line in lines if 'last loss' in line}
    assert len(losses) == 1, lines  # one job: both processes hold the same model
