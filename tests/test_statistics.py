"""The recorded statistics against explicitly unfolded patches, in kernel order."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import unfold

import tract_jax
from tract_jax._src import statistics

# (kernel_size, strides, padding, input_dilation, kernel_dilation, input spatial shape)
CONV_CASES = [
    ((3,), (1,), 'SAME', (1,), (1,), (9,)),
    ((3,), (2,), 'CAUSAL', (1,), (2,), (10,)),
    ((4,), (3,), 'VALID', (1,), (1,), (11,)),
    ((3,), (2,), ((2, 1),), (3,), (1,), (7,)),
    ((2,), (1,), 'CIRCULAR', (1,), (3,), (8,)),
    ((3, 3), (1, 1), 'SAME', (1, 1), (1, 1), (7, 6)),
    ((3, 2), (2, 1), 'VALID', (1, 1), (1, 2), (9, 7)),
    ((4, 4), (2, 2), 'SAME', (1, 1), (1, 1), (8, 7)),
    ((3, 3), (2, 3), 'CIRCULAR', (1, 1), (2, 1), (9, 8)),
    ((3, 3), (1, 1), 'REFLECT', (1, 1), (1, 1), (6, 6)),
    ((2, 3), (1, 2), 2, (1, 1), (1, 1), (5, 6)),
    ((3, 2), (1, 1), ((1, 2), (0, 1)), (2, 1), (1, 1), (5, 6)),
    ((3, 3), (2, 2), (1, (2, 0)), (1, 1), (2, 1), (9, 9)),
    ((2, 2, 2), (1, 2, 1), 'SAME', (1, 1, 1), (1, 1, 1), (4, 5, 3)),
    ((3, 1, 2), (2, 1, 1), 'VALID', (1, 1, 1), (1, 1, 2), (6, 3, 5)),
]


def _layer_kwargs(case):
    kernel_size, strides, padding, input_dilation, kernel_dilation, _ = case
    return dict(
        kernel_size=kernel_size,
        strides=strides,
        padding=padding,
        input_dilation=input_dilation,
        kernel_dilation=kernel_dilation,
    )


@pytest.mark.parametrize('case', CONV_CASES, ids=str)
def test_conv_statistic_is_gram_of_unfolded_patches(case, x64):
    channels, features = 2, 3
    x = jax.random.normal(jax.random.key(0), (2, *case[-1], channels), jnp.float64)
    layer = tract_jax.Conv(features, **_layer_kwargs(case))
    variables = layer.init(jax.random.key(1), x)
    y, state = layer.apply(variables, x, mutable=['tract'])

    patches = unfold(x, *case[:-1])
    stat = state['tract']['kernel']
    if patches.shape[0] < patches.shape[1]:
        np.testing.assert_array_equal(stat.rows, patches)
    else:
        np.testing.assert_allclose(stat.gram, patches.T @ patches, rtol=1e-12, atol=1e-12)
        assert stat.count == patches.shape[0]
    # The patches are in kernel order: they reproduce the layer's output.
    kernel = np.asarray(variables['params']['kernel']).reshape(-1, features)
    expected = patches @ kernel + np.asarray(variables['params']['bias'])
    np.testing.assert_allclose(y.reshape(-1, features), expected, rtol=1e-12, atol=1e-12)


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
    padded = statistics._padded(x, geometry)
    length = -(-padded.shape[1] // statistics._Window.of(geometry).strides[0])
    assert length >= statistics._CORRELATE_FROM  # the lax.conv path
    gram = statistics._gram_by_shifts(padded, statistics._Window.of(geometry))
    patches = unfold(x, *case[:-1])
    np.testing.assert_allclose(gram, patches.T @ patches, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ('kernel', 'strides', 'dilation', 'side', 'picks'),
    [
        ((7, 7), 2, 1, 224, 'shifts'),  # a ResNet stem: windows overlap
        ((3, 3), 1, 1, 224, 'shifts'),
        ((3, 3), 1, 1, 32, 'patches'),  # small images: the patches' one matmul is faster
        ((3, 7, 7), (1, 2, 2), 1, 64, 'shifts'),  # a video stem
        ((16, 16), 16, 1, 224, 'patches'),  # a patch embedding: no overlap, nothing shared
        ((4, 4), 4, 1, 224, 'patches'),
        ((2, 3), 3, 2, 224, 'patches'),  # (2 - 1) * 2 < 3: no overlap along the first axis
    ],
)
def test_auto_picks_shifts_where_windows_overlap(kernel, strides, dilation, side, picks):
    geometry = statistics.ConvGeometry(kernel, strides, 'SAME', 1, dilation)
    shape = (4, *([side] * len(kernel)), 3)
    assert statistics.chosen_method(shape, geometry) == picks


def test_gram_by_shifts_counts_fewer_multiply_adds_in_the_compiled_statistic():
    """XLA's cost analysis of the compiled statistic, not the model: a ResNet-50 stem."""
    x = jax.ShapeDtypeStruct((4, 224, 224, 3), jnp.float32)
    geometry = statistics.ConvGeometry((7, 7), 2, 3)

    def flops(method):
        fn = jax.jit(lambda x: statistics.geometry_statistic(x, geometry, method=method))
        cost = fn.lower(x).compile().cost_analysis()
        return (cost[0] if isinstance(cost, list) else cost)['flops']

    assert flops('shifts') < 0.4 * flops('patches')


@pytest.mark.parametrize(
    ('n', 'products'),
    [(767, 1), (768, 4 * 5 // 2), (1000, 5 * 6 // 2), (4000, 8 * 9 // 2)],
)
def test_large_gram_is_summed_in_upper_blocks(n, products, x64):
    """Against numpy's XᵀX, with the number of products the docstring gives."""
    x = jax.random.normal(jax.random.key(n), (50, n), jnp.float64)
    expected = np.asarray(x).T @ np.asarray(x)
    np.testing.assert_allclose(jax.jit(statistics.gram_matrix)(x), expected, atol=1e-12)
    hlo = jax.jit(statistics.gram_matrix).lower(x).as_text()
    assert hlo.count('stablehlo.dot_general') == products
    stat = statistics.to_gram(statistics.RowStatistic(x))  # every Gram statistic's way
    np.testing.assert_allclose(stat.gram, expected, atol=1e-12)


@pytest.mark.parametrize('case', CONV_CASES[::3], ids=str)
def test_conv_rows_equal_unfolded_patches(case, x64):
    x = jax.random.normal(jax.random.key(2), (1, *case[-1], 3), jnp.float64)
    rows = statistics.conv_rows(x, statistics.ConvGeometry(*case[:-1]))
    np.testing.assert_array_equal(rows, unfold(x, *case[:-1]))


@pytest.mark.parametrize('padding', ['SAME', 'VALID', 'CIRCULAR', 2])
def test_conv_outputs_and_params_identical_to_flax(padding):
    x = jax.random.normal(jax.random.key(0), (3, 10, 9, 4))
    kwargs = dict(features=5, kernel_size=(3, 3), strides=2, padding=padding)
    ours, theirs = tract_jax.Conv(**kwargs), nn.Conv(**kwargs)
    v_ours, v_theirs = ours.init(jax.random.key(1), x), theirs.init(jax.random.key(1), x)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), v_ours, v_theirs))
    y_plain = theirs.apply(v_theirs, x)
    y_recording, _ = ours.apply(v_ours, x, mutable=['tract'])
    np.testing.assert_array_equal(ours.apply(v_ours, x), y_plain)
    np.testing.assert_array_equal(y_recording, y_plain)


def test_dense_statistic_any_leading_dims(x64):
    x = jax.random.normal(jax.random.key(0), (2, 3, 4, 5), jnp.float64)
    layer = tract_jax.Dense(7)
    variables = layer.init(jax.random.key(1), x)
    y, state = layer.apply(variables, x, mutable=['tract'])
    np.testing.assert_array_equal(y, nn.Dense(7).apply(variables, x))
    rows = np.asarray(x).reshape(-1, 5)
    stat = state['tract']['kernel']
    np.testing.assert_allclose(stat.gram, rows.T @ rows, rtol=1e-13)
    assert stat.count == 24


def test_few_rows_are_kept_as_rows():
    x = jax.random.normal(jax.random.key(0), (3, 10))
    layer = tract_jax.Dense(2)
    _, state = layer.apply(layer.init(jax.random.key(1), x), x, mutable=['tract'])
    stat = state['tract']['kernel']
    assert isinstance(stat, tract_jax.RowStatistic)
    np.testing.assert_array_equal(stat.rows, x)


class _SharedStem(nn.Module):
    """One stem applied to two crops: statistics must accumulate over both."""

    @nn.compact
    def __call__(self, a, b):
        stem = tract_jax.Dense(2, name='stem')
        return jnp.concatenate([stem(a), stem(b)])


@pytest.mark.parametrize('rows_a, rows_b', [(2, 3), (4, 5), (12, 9), (3, 9)])
def test_calls_in_one_pass_accumulate(rows_a, rows_b, x64):
    a = jax.random.normal(jax.random.key(0), (rows_a, 8), jnp.float64)
    b = jax.random.normal(jax.random.key(1), (rows_b, 8), jnp.float64)
    model = _SharedStem()
    variables = model.init(jax.random.key(2), a, b)
    _, state = model.apply(variables, a, b, mutable=['tract'])
    stat = state['tract']['stem']['kernel']
    both = np.concatenate([a, b])
    if rows_a + rows_b < 8:
        np.testing.assert_array_equal(stat.rows, both)
    else:
        np.testing.assert_allclose(stat.gram, both.T @ both, rtol=1e-13)
        assert stat.count == rows_a + rows_b


@pytest.mark.parametrize(
    'in_dtype, stat_dtype',
    [(jnp.bfloat16, jnp.float32), (jnp.float16, jnp.float32), (jnp.uint8, jnp.float32)],
)
def test_statistics_are_float32_or_wider(in_dtype, stat_dtype):
    x = (jax.random.uniform(jax.random.key(0), (4, 6, 6, 3)) * 200).astype(in_dtype)
    layer = tract_jax.Conv(4, (3, 3), dtype=jnp.float32)
    variables = layer.init(jax.random.key(1), x.astype(jnp.float32))
    _, state = layer.apply(variables, x, mutable=['tract'])
    assert state['tract']['kernel'].gram.dtype == stat_dtype


def test_float64_inputs_give_float64_statistics(x64):
    x = jnp.ones((4, 3), jnp.float64)
    layer = tract_jax.Dense(2)
    _, state = layer.apply(layer.init(jax.random.key(0), x), x, mutable=['tract'])
    assert state['tract']['kernel'].gram.dtype == jnp.float64


def test_nothing_recorded_or_computed_without_mutable_tract():
    x = jnp.ones((2, 8, 8, 3))
    ours, plain = tract_jax.Conv(4, (3, 3)), nn.Conv(4, (3, 3))
    variables = ours.init(jax.random.key(0), x)
    assert 'tract' not in variables  # init records nothing
    jaxpr_ours = jax.make_jaxpr(lambda v: ours.apply(v, x))(variables)
    jaxpr_plain = jax.make_jaxpr(lambda v: plain.apply(v, x))(variables)
    assert str(jaxpr_ours) == str(jaxpr_plain)


def test_statistics_carry_no_gradient():
    x = jax.random.normal(jax.random.key(0), (8, 5))
    layer = tract_jax.Dense(3)
    variables = layer.init(jax.random.key(1), x)

    def f(x):
        _, state = layer.apply(variables, x, mutable=['tract'])
        return state['tract']['kernel'].gram.sum()

    np.testing.assert_array_equal(jax.grad(f)(x), jnp.zeros_like(x))


@pytest.mark.parametrize(
    'kwargs, words',
    [
        (dict(feature_group_count=3), 'feature_group_count=3'),
        (dict(mask=jnp.ones((3, 3, 3, 6))), 'mask'),
    ],
)
def test_unsupported_conv_options_are_named(kwargs, words):
    layer = tract_jax.Conv(6, (3, 3), **kwargs)
    with pytest.raises(ValueError, match=words):
        layer.init(jax.random.key(0), jnp.ones((1, 5, 5, 3)))


@pytest.mark.parametrize(
    'padding, batch, budget_images',
    [('SAME', 7, 2), ('CIRCULAR', 5, 3), ('REFLECT', 4, 1), ((2, 1), 6, 4), ('VALID', 9, 5)],
)
@pytest.mark.parametrize('method', ['patches', 'shifts'])
def test_chunked_statistic_equals_one_shot(padding, batch, budget_images, method, x64):
    x = jax.random.normal(jax.random.key(0), (batch, 11, 10, 3), jnp.float64) + 2.0
    args = (statistics.ConvGeometry((3, 3), 2, padding),)
    one_shot = statistics.geometry_statistic(x, *args, max_chunk_bytes=2**40, method='patches')
    cost = statistics._cost(x.shape, *args, x.dtype)
    per_image = cost.patches_bytes if method == 'patches' else cost.shifts_bytes
    chunked = statistics.geometry_statistic(
        x, *args, max_chunk_bytes=budget_images * per_image, method=method
    )
    assert isinstance(chunked, tract_jax.GramStatistic)
    np.testing.assert_allclose(chunked.gram, one_shot.gram, rtol=1e-12)
    assert chunked.count == one_shot.count


def test_chunking_bounds_the_memory_of_the_statistic():
    """XLA's memory analysis: the chunked statistic never holds all patches at once."""
    x = jax.ShapeDtypeStruct((32, 112, 112, 3), jnp.float32)
    args = (statistics.ConvGeometry((7, 7), 2, 3),)
    patches_bytes = 32 * 56 * 56 * 147 * 4  # 59 MiB if held at once

    def temp_bytes(budget):
        fn = jax.jit(
            lambda x: statistics.geometry_statistic(
                x, *args, max_chunk_bytes=budget, method='patches'
            )
        )
        return fn.lower(x).compile().memory_analysis().temp_size_in_bytes

    assert temp_bytes(2**40) >= patches_bytes
    assert temp_bytes(patches_bytes // 8) < patches_bytes / 3
