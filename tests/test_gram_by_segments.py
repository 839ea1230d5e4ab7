"""The Gram from segments of image rows (gram_by_segments.py) against unfolded patches."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import CASES_2D, cpu_only, unfold

from tract_jax._src import choice, gram_by_segments, statistics
from tract_jax._src import unfold as unfold_module

HIGHEST = jax.lax.Precision.HIGHEST


def _gram(x, case, lanes):
    geometry = statistics.ConvGeometry(*case[:-1])
    padded = unfold_module.padded(x, geometry)
    window = unfold_module.Window.of(geometry)
    return gram_by_segments.gram_by_segments(padded, window, lanes=lanes, precision=HIGHEST)


@pytest.mark.parametrize('lanes', [1, 24, 64, 128])
@pytest.mark.parametrize('case', CASES_2D, ids=str)
def test_gram_by_segments_is_the_gram_of_unfolded_patches(case, lanes, x64):
    """Whole rows, several segments, and one output column per segment (lanes=1)."""
    x = jax.random.normal(jax.random.key(5), (3, *case[-1], 2), jnp.float64) + 0.5
    patches = unfold(x, *case[:-1])
    np.testing.assert_allclose(_gram(x, case, lanes), patches.T @ patches, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('lanes', [24, 128])
@pytest.mark.parametrize('case', [c for c in CASES_2D if c[3] == (1, 1)], ids=str)
def test_the_zeros_of_the_padding_need_not_be_written(case, lanes, x64):
    """Given the input before its zero padding and those zeros: whole unpadded rows
    where they fit (stride and dilation 1 along the rows), else the padded segments.
    (A dilated input is padded first, zeros and all.)"""
    x = jax.random.normal(jax.random.key(7), (3, *case[-1], 2), jnp.float64) + 0.5
    geometry = statistics.ConvGeometry(*case[:-1])
    before, config = unfold_module.zero_padding(x, geometry)
    assert not any(interior for *_, interior in config)
    window = unfold_module.Window.of(geometry)
    pads = [(low, high) for low, high, _ in config]
    found = gram_by_segments.gram_by_segments(
        before, window, lanes=lanes, precision=HIGHEST, pads=pads
    )
    patches = unfold(x, *case[:-1])
    np.testing.assert_allclose(found, patches.T @ patches, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ('fields', 'shape', 'expected'),
    [
        (((3, 3), 1, 1), (1, 32, 32, 3), True),  # CIFAR: 96 values a row
        (((5, 5), (1, 2), 'SAME'), (1, 28, 28, 1), True),  # MNIST, strided along columns
        (((3, 3), 1, 1), (1, 64, 64, 3), False),  # 192 values: cut into segments
        (((7, 7), 2, 3), (1, 32, 32, 3), False),  # strided along rows
        (((3, 3), 1, 1, 1, (2, 1)), (1, 32, 32, 3), False),  # dilated along rows
    ],
)
def test_whole_rows_where_a_row_fits_and_the_window_moves_a_row(fields, shape, expected):
    window = unfold_module.Window.of(statistics.ConvGeometry(*fields))
    assert gram_by_segments.whole_rows(shape, window, choice.SEGMENT_LANES) is expected


def test_a_cifar_stem_reads_its_images_unpadded():
    """The statistic of a CIFAR stem by whole rows: no pad, the products one convolution
    over the rows and the rows' products at the two borders."""
    geometry = statistics.ConvGeometry((3, 3), 1, 1)
    fn = jax.jit(lambda x: statistics.geometry_statistic(x, geometry, method='segments'))
    text = fn.lower(jax.ShapeDtypeStruct((8, 32, 32, 3), jnp.float32)).as_text()
    assert 'stablehlo.pad' not in text
    assert text.count('stablehlo.convolution') == 1
    assert text.count('stablehlo.dot_general') == 2 + 2  # the borders, then the picks


def test_a_strided_stem_reads_its_segments_in_one_convolution():
    """A ResNet-50 stem (7x7/2): one pad, the convolution that cuts the segments with
    both phases side by side, and one convolution for every offset of every pair of
    phases; the rest are the products of the rows the blocks leave out and the picks."""
    geometry = statistics.ConvGeometry((7, 7), 2, 3)
    fn = jax.jit(lambda x: statistics.geometry_statistic(x, geometry, method='segments'))
    text = fn.lower(jax.ShapeDtypeStruct((8, 224, 224, 3), jnp.float32)).as_text()
    assert text.count('stablehlo.pad') == 1
    assert text.count('stablehlo.convolution') == 2
    assert 'tensor<2x21x3x126xf32>' in text  # the cut's kernel: 2 rows, 2 x 63 values
    assert '-> tensor<4x1x126x126xf32>' in text  # offsets 0 to 3, both phases either side


def test_the_cut_runs_at_the_precision_of_the_products_it_feeds():
    """Under the TPU plan (HIGH: three bfloat16 passes) the cut keeps each value's two
    bfloat16 parts, which is what the HIGH products read of it; under the CPU's
    (HIGHEST) it is exact."""
    geometry = statistics.ConvGeometry((7, 7), 2, 3)
    for plan, precision in ((choice.TPU, 'HIGH'), (choice.CPU, 'HIGHEST')):
        fn = jax.jit(
            lambda x, plan=plan: statistics.geometry_statistic(
                x, geometry, method='segments', plan=plan
            )
        )
        text = fn.lower(jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)).as_text()
        convolutions = [line for line in text.splitlines() if 'stablehlo.convolution' in line]
        assert len(convolutions) == 2
        assert all(f'precision {precision}>' in line for line in convolutions)


def test_a_cut_at_high_leaves_the_high_statistic_as_it_was():
    """Emulated as benchmarks.precision does (bfloat16 parts, each product exact, summed
    in float32): the HIGH Gram of the values a HIGH cut keeps (``hi + lo``) is the HIGH
    Gram of the values themselves, up to float32 summation, in raw pixels and in
    standardized inputs alike; a few values split into another pair of the same sum."""
    from benchmarks.precision import gram_in_passes, split

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (4096, 27)).astype(np.float32)
    standardized = (pixels - 120.3) / 64.1
    for rows, exact in (
        (pixels, True),
        (standardized, False),
        (rng.normal(size=(4096, 27)), False),
    ):
        rows = jnp.asarray(rows, jnp.float32)
        hi, lo = split(rows, 2)
        cut = hi + lo
        assert bool(jnp.all(cut == rows)) is exact  # 8-bit pixels are bfloat16 numbers
        assert float(jnp.mean(split(cut, 2)[0] != hi)) < 0.01
        want, found = gram_in_passes(rows, 3), gram_in_passes(cut, 3)
        np.testing.assert_allclose(found, want, rtol=0, atol=1e-6 * float(jnp.max(want)))


def test_the_statistic_by_segments_under_jit(x64):
    """As the layers call it (method='segments'), jitted: the count is the rows'."""
    case = CASES_2D[-3]
    x = jax.random.normal(jax.random.key(6), (4, *case[-1], 3), jnp.float64)
    geometry = statistics.ConvGeometry(*case[:-1])
    stat = jax.jit(lambda x: statistics.geometry_statistic(x, geometry, method='segments'))(x)
    patches = unfold(x, *case[:-1])
    np.testing.assert_allclose(stat.gram, patches.T @ patches, rtol=1e-12, atol=1e-12)
    assert stat.count == patches.shape[0]


@pytest.mark.parametrize(
    ('fields', 'side', 'columns', 'values'),
    [
        (((7, 7), 2, 3), 224, 8, 63),  # ResNet-50: 14 of 8 columns (21); 2 phases: 126 values
        (((3, 3), 1, 1), 32, 32, 102),  # CIFAR: the whole row, 34 columns
        (((3, 3), 1, 1), 31, 31, 99),  # 31 is prime: still the whole row
        (((11, 11), 4, 2), 224, 5, 81),  # AlexNet's stem: 55 = 11 segments of 5 (27 columns)
        (((7, 7), 2, 3), 226, 1, 21),  # 113 is prime, 113 columns too wide: one column
    ],
)
def test_segments_fill_a_tile_of_lanes(fields, side, columns, values):
    geometry = statistics.ConvGeometry(*fields)
    window = unfold_module.Window.of(geometry)
    padded = unfold_module.padded(jnp.zeros((1, side, side, 3)), geometry)
    out = window.out(padded.shape[1:-1])
    found = gram_by_segments.segment_columns(window, out[1], 3, choice.SEGMENT_LANES)
    assert found == columns
    assert out[1] % found == 0
    assert 3 * gram_by_segments.segment_width(found, window) == values


def test_segments_are_for_2d_convolutions_only():
    x = jnp.zeros((2, 5, 5, 5, 1))
    window = unfold_module.Window((3, 3, 3), (1, 1, 1), (1, 1, 1))
    with pytest.raises(ValueError, match='for 2-D convolutions; this one has 3 spatial dims'):
        gram_by_segments.gram_by_segments(x, window, lanes=128, precision=HIGHEST)
    video = statistics.ConvGeometry((3, 3, 3))
    assert statistics.gram_cost(x.shape, video).segments == 0
    assert statistics.chosen_method(x.shape, video, plan=choice.TPU) != 'segments'


@cpu_only
def test_cost_counts_the_multiply_adds_of_the_compiled_statistic():
    """XLA's count of the compiled statistic's flops per image, the difference between
    two batches (the 0/1 picks are per batch, and XLA orders their contractions as it
    sees fit), against gram_by_segments.cost: the cut and the segments' products. XLA
    leaves out of its count the taps that fall on a convolution's zero padding (the
    cut's 3 rows and columns either side, the offsets past the last row), which the
    cost counts, as a TPU multiplies them: 2% of a ResNet-50 stem's."""
    geometry = statistics.ConvGeometry((7, 7), 2, 3)
    cost = statistics.gram_cost((1, 224, 224, 3), geometry)

    def flops(batch):
        fn = jax.jit(lambda x: statistics.geometry_statistic(x, geometry, method='segments'))
        compiled = fn.lower(jax.ShapeDtypeStruct((batch, 224, 224, 3), jnp.float32)).compile()
        analysis = compiled.cost_analysis()
        return (analysis[0] if isinstance(analysis, list) else analysis)['flops']

    per_image = (flops(4) - flops(2)) / 2
    assert 0.97 * 2 * cost.segments <= per_image <= 2 * cost.segments


@cpu_only
def test_cost_counts_the_multiply_adds_of_whole_rows():
    """By whole rows (a CIFAR stem): the convolution over the rows (every offset, all
    rows), the two border rows' products, and the per-batch picks."""
    batch, shape = 4, (4, 32, 32, 3)
    geometry = statistics.ConvGeometry((3, 3), 1, 1)
    cost = statistics.gram_cost(shape, geometry)
    m = 3 * 32
    assert cost.segments == (3 * 32 + 2) * m * m
    fn = jax.jit(lambda x: statistics.geometry_statistic(x, geometry, method='segments'))
    analysis = fn.lower(jax.ShapeDtypeStruct(shape, jnp.float32)).compile().cost_analysis()
    flops = (analysis[0] if isinstance(analysis, list) else analysis)['flops']
    picks = 6 * (m * m * 32 * 9 + m * 32 * 9 * 9)
    expected = 2 * (batch * cost.segments + picks)
    assert 0.98 * expected <= flops <= 1.05 * expected
