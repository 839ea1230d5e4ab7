import jax
import pytest


@pytest.fixture
def x64():
    """Float64 for tests that compare math; restored afterwards."""
    jax.config.update('jax_enable_x64', True)
    yield
    jax.config.update('jax_enable_x64', False)


# Needs torch; run by hand to regenerate the parity reference (see its docstring).
collect_ignore = ['parity/make_reference.py']
