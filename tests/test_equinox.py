"""The Equinox front end: convert, the statistic in the gradient, padding modes, errors."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tract_jax
import tract_jax.equinox
from tract_jax._src import statistic, unfold
from tract_jax._src.equinox_layers import _Spec

KEY = jax.random.key(0)


def _stats(model, x, loss=lambda y: jnp.sum(jnp.sin(y))):
    grads = eqx.filter_grad(lambda m: loss(jax.vmap(m)(x)))(model)
    return tract_jax.equinox.split_stats(grads)


@pytest.mark.parametrize(
    ('padding', 'mode'),
    [
        ('SAME', 'REFLECT'),
        ('SAME_LOWER', 'REPLICATE'),
        (((2, 1), (0, 2)), 'CIRCULAR'),
        (1, 'REPLICATE'),
        ('SAME_LOWER', 'ZEROS'),
        ('VALID', 'ZEROS'),
    ],
)
def test_statistic_is_gram_of_the_patches_equinox_convolves(padding, mode, x64):
    conv = eqx.nn.Conv2d(
        2, 3, (3, 4), stride=(2, 1), padding=padding, dilation=(1, 2), padding_mode=mode,
        dtype=jnp.float64, key=KEY,
    )  # fmt: skip
    x = jax.random.normal(KEY, (2, 2, 9, 10), jnp.float64)
    spec = _Spec.of(conv)
    rows = unfold.conv_rows(jnp.moveaxis(x, 1, -1), spec.geometry)
    rows = statistic.with_layout(statistic.RowStatistic(rows), 'features_first', 12).rows
    # The patches, through the weight, give Equinox's own output: so they are its patches.
    y = jax.vmap(conv)(x) - conv.bias[None]
    patches_out = rows @ conv.weight.reshape(3, -1).T
    np.testing.assert_allclose(patches_out, jnp.moveaxis(y, 1, -1).reshape(-1, 3), atol=1e-12)

    _, stats = _stats(tract_jax.equinox.convert(conv, lambda m: m), x)
    stat = stats['layer']['weight']
    np.testing.assert_allclose(stat.gram, rows.T @ rows, rtol=1e-12, atol=1e-12)
    assert float(stat.count) == rows.shape[0]


class _Model(eqx.Module):
    """The stem's input is computed inside the model, and the stem may be called twice."""

    stem: eqx.nn.Conv2d
    head: eqx.nn.Linear
    twice: bool = eqx.field(static=True, default=False)
    remat: bool = eqx.field(static=True, default=False)

    def __init__(self, key, twice=False, remat=False):
        k1, k2 = jax.random.split(key)
        self.stem = eqx.nn.Conv2d(1, 4, 3, padding=1, key=k1)
        self.head = eqx.nn.Linear(4, 3, key=k2)
        self.twice, self.remat = twice, remat

    def __call__(self, x):
        x = (x - x.mean()) / (x.std() + 1e-3)  # computed inside: not the batch itself
        stem = eqx.filter_checkpoint(lambda s, x: s(x)) if self.remat else (lambda s, x: s(x))
        h = stem(self.stem, x)
        if self.twice:
            h = h + stem(self.stem, x[:, ::-1])
        return self.head(jax.nn.relu(h).mean(axis=(1, 2)))


X = jax.random.normal(KEY, (5, 1, 6, 6)) * 3 + 1


def _inner_input(x):
    return jax.vmap(lambda x: (x - x.mean()) / (x.std() + 1e-3))(x)


def test_input_computed_inside_the_model_shared_calls_accumulate_and_remat_records_once():
    expected = tract_jax.conv_statistic(
        _inner_input(X), (3, 3), padding=1, channels_last=False, layout='features_first'
    )
    scale = float(jnp.abs(expected.gram).max())  # float32 sums, compared at its rounding
    for remat in (False, True):
        model = tract_jax.equinox.convert(_Model(KEY, remat=remat), lambda m: m.stem)
        stat = _stats(model, X)[1]['stem']['layer']['weight']
        np.testing.assert_allclose(stat.gram, expected.gram, atol=1e-5 * scale)
        assert float(stat.count) == 5 * 36

        model = tract_jax.equinox.convert(_Model(KEY, twice=True, remat=remat), lambda m: m.stem)
        stat = _stats(model, X)[1]['stem']['layer']['weight']
        flipped = tract_jax.conv_statistic(
            _inner_input(X)[:, :, ::-1], (3, 3), padding=1, channels_last=False,
            layout='features_first',
        )  # fmt: skip
        np.testing.assert_allclose(stat.gram, expected.gram + flipped.gram, atol=2e-5 * scale)
        assert float(stat.count) == 2 * 5 * 36


def test_convert_keeps_outputs_and_split_stats_zeroes_the_probes():
    model = _Model(KEY)
    converted = tract_jax.equinox.convert(model, lambda m: m.stem)
    np.testing.assert_array_equal(jax.vmap(converted)(X), jax.vmap(model)(X))
    assert converted.stem.layer.weight is model.stem.weight
    grads, stats = _stats(converted, X)
    assert not np.any(grads.stem.tract_gram) and not np.any(grads.stem.tract_count)
    assert set(stats) == {'stem'}


def test_training_loop_with_filter_jit_lowers_the_loss():
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = jnp.asarray((digits.images[:, None] / 16.0 - 0.3) / 0.4, jnp.float32)
    y = jnp.asarray(digits.target)
    model = eqx.nn.Sequential(
        [
            eqx.nn.Conv2d(1, 16, 3, padding=1, key=jax.random.key(1)),
            eqx.nn.Lambda(lambda h: jax.nn.relu(h).ravel()),
            eqx.nn.Linear(16 * 64, 10, key=jax.random.key(2)),
        ]
    )
    model = tract_jax.equinox.convert(model, lambda m: m.layers[0])
    tx = optax.chain(tract_jax.tract(0.1), optax.adam(1e-2))
    opt_state = tx.init(eqx.filter(model, eqx.is_array))

    @eqx.filter_jit
    def step(model, opt_state, x, y):
        def loss_fn(model):
            logits = jax.vmap(model)(x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = eqx.filter_value_and_grad(loss_fn)(model)
        grads, stats = tract_jax.equinox.split_stats(grads)
        params = eqx.filter(model, eqx.is_array)
        updates, opt_state = tx.update(grads, opt_state, params, tract_stats=stats)
        return eqx.apply_updates(model, updates), opt_state, loss

    rng = np.random.default_rng(0)
    losses = []
    for _ in range(60):
        idx = rng.choice(len(x), 64, replace=False)
        model, opt_state, loss = step(model, opt_state, x[idx], y[idx])
        losses.append(float(loss))
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10]), losses
    assert not np.any(model.layers[0].tract_gram)  # the probes never move


def test_unsupported_layers_and_missing_statistics_are_named():
    with pytest.raises(ValueError, match='groups=2'):
        tract_jax.equinox.convert(eqx.nn.Conv2d(4, 4, 3, groups=2, key=KEY), lambda m: m)
    with pytest.raises(TypeError, match='got a ConvTranspose2d'):
        tract_jax.equinox.convert(eqx.nn.ConvTranspose2d(4, 4, 3, key=KEY), lambda m: m)
    with pytest.raises(TypeError, match='got a LayerNorm'):
        tract_jax.equinox.convert(eqx.nn.LayerNorm(4), lambda m: m)
    plain = _Model(KEY)
    grads = eqx.filter_grad(lambda m: jnp.sum(jax.vmap(m)(X)))(plain)
    with pytest.raises(ValueError, match='split_stats: the gradient has no TrAct layer'):
        tract_jax.equinox.split_stats(grads)
    converted = tract_jax.equinox.convert(plain, lambda m: m.stem)
    grads = eqx.filter_grad(lambda m: jnp.sum(jax.vmap(m)(X)))(converted)
    no_stem = eqx.tree_at(lambda g: g.stem.tract_gram, grads, None)  # as if not differentiated
    with pytest.raises(ValueError, match="TrAct layer at 'stem' has no statistic"):
        tract_jax.equinox.split_stats(no_stem)
