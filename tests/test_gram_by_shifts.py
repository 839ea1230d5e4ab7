"""The Gram by shifts (gram_by_shifts.py) against explicitly unfolded patches."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import CONV_CASES, cpu_only, unfold

from tract_jax._src import choice, gram_by_shifts, statistics
from tract_jax._src import unfold as unfold_module

HIGHEST = jax.lax.Precision.HIGHEST


@pytest.mark.parametrize('case', CONV_CASES, ids=str)
def test_gram_by_shifts_is_the_gram_of_unfolded_patches(case, x64):
    """The patches' Gram is the one the layers record on these small inputs (tested above)."""
    x = jax.random.normal(jax.random.key(3), (5, *case[-1], 2), jnp.float64) + 0.5
    geometry = statistics.ConvGeometry(*case[:-1])
    assert statistics.chosen_method(x.shape, geometry) == 'patches'
    stat = statistics.geometry_statistic(x, geometry, method='shifts')
    patches = unfold(x, *case[:-1])
    if patches.shape[0] < patches.shape[1]:
        np.testing.assert_array_equal(stat.rows, patches)
    else:
        np.testing.assert_allclose(stat.gram, patches.T @ patches, rtol=1e-12, atol=1e-12)
        assert stat.count == patches.shape[0]


LONG_CASES = [  # phases of at least _CORRELATE_FROM rows: one lax.conv per pair of phases
    ((7, 7), (2, 2), 3, (1, 1), (1, 1), (70, 12)),  # a ResNet stem's geometry
    ((3, 3), (1, 1), 'SAME', (1, 1), (1, 1), (40, 6)),
    ((5, 3), (3, 1), ((4, 1), (1, 1)), (1, 1), (2, 1), (110, 5)),
    ((3, 2), (2, 1), 'VALID', (2, 1), (1, 1), (40, 5)),
    ((3, 2, 2), (2, 1, 1), 'SAME', (1, 1, 1), (1, 1, 1), (70, 3, 4)),
]


@pytest.mark.parametrize('case', LONG_CASES, ids=str)
def test_gram_by_shifts_correlating_long_phases(case, x64):
    x = jax.random.normal(jax.random.key(4), (3, *case[-1], 2), jnp.float64) + 0.5
    geometry = statistics.ConvGeometry(*case[:-1])
    padded = unfold_module.padded(x, geometry)
    length = -(-padded.shape[1] // unfold_module.Window.of(geometry).strides[0])
    assert length >= choice.CORRELATE_FROM  # the lax.conv path
    gram = gram_by_shifts.gram_by_shifts(
        padded,
        unfold_module.Window.of(geometry),
        correlate_from=choice.CORRELATE_FROM,
        precision=HIGHEST,
    )
    patches = unfold(x, *case[:-1])
    np.testing.assert_allclose(gram, patches.T @ patches, rtol=1e-12, atol=1e-12)


@cpu_only
def test_gram_by_shifts_counts_fewer_multiply_adds_in_the_compiled_statistic():
    """XLA's cost analysis of the compiled statistic, not the model: a ResNet-50 stem."""
    x = jax.ShapeDtypeStruct((4, 224, 224, 3), jnp.float32)
    geometry = statistics.ConvGeometry((7, 7), 2, 3)

    def flops(method):
        fn = jax.jit(lambda x: statistics.geometry_statistic(x, geometry, method=method))
        cost = fn.lower(x).compile().cost_analysis()
        return (cost[0] if isinstance(cost, list) else cost)['flops']

    assert flops('shifts') < 0.4 * flops('patches')
