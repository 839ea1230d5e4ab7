import jax
import pytest


@pytest.fixture
def x64():
    """Float64 for tests that compare math; restored afterwards."""
    jax.config.update('jax_enable_x64', True)
    yield
    jax.config.update('jax_enable_x64', False)


# make_reference.py needs torch (run by hand, see its docstring); multidevice_check.py and
# multiprocess_check.py are scripts run in subprocesses by test_distributed.py (importing
# either would set x64 and its device count).
collect_ignore = ['parity/make_reference.py', 'multidevice_check.py', 'multiprocess_check.py']
