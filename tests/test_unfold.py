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


@pytest.mark.parametrize('case', CONV_CASES, ids=str)
def test_images_minor_rows_are_the_same_rows_position_major(case, x64):
    """The TPU plan's order: row (position, image) of ``images_minor`` is row (image,
    position) of the loops' patches, every case (tiling windows take their own path)."""
    x = jax.random.normal(jax.random.key(3), (3, *case[-1], 2), jnp.float64)
    rows = unfold_.conv_rows(x, unfold_.ConvGeometry(*case[:-1]), images_minor=True)
    expected = unfold(x, *case[:-1])
    positions = expected.shape[0] // 3
    expected = expected.reshape(3, positions, -1).transpose(1, 0, 2).reshape(rows.shape)
    np.testing.assert_array_equal(rows, expected)
