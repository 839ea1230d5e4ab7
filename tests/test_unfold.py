"""Unfolding (unfold.py): the rows of X against patches cut out by loops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import CONV_CASES, unfold

from tract_jax._src import unfold as unfold_


@pytest.mark.parametrize('case', CONV_CASES[::3], ids=str)
def test_conv_rows_equal_unfolded_patches(case, x64):
    x = jax.random.normal(jax.random.key(2), (1, *case[-1], 3), jnp.float64)
    rows = unfold_.conv_rows(x, unfold_.ConvGeometry(*case[:-1]))
    np.testing.assert_array_equal(rows, unfold(x, *case[:-1]))
