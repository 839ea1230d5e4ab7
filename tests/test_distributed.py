"""Global-batch statistics on 8 simulated CPU devices (jit over a mesh, shard_map, pmap).

XLA_FLAGS has to be set before jax is imported, so the checks run in a subprocess
(tests/multidevice_check.py); each prints 'ok <name>' after comparing, in float64,
the distributed update with the single-device update on the whole batch.
"""

import os
import pathlib
import subprocess
import sys

import pytest

HERE = pathlib.Path(__file__).parent
CHECKS = [
    'equinox, jit, data mesh (8)',
    'jit, data mesh (8)',
    'jit, data x model mesh (4x2)',
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


def _run(script, *args):
    env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
    # The scripts set their own device count; keep the suite's compile flags (conftest.py).
    env['XLA_FLAGS'] = ' '.join(
        flag for flag in os.environ.get('XLA_FLAGS', '').split() if 'device_count' not in flag
    )
    env['JAX_PLATFORMS'] = 'cpu'  # 8 simulated CPU devices, also where a GPU is present
    env['PYTHONPATH'] = os.pathsep.join([str(HERE.parent), env.get('PYTHONPATH', '')])
    return subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        env=env,
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
