"""The rule: the statistics that reach tract() are those of the pass they precondition.

Each test is a training loop users really write, run for a few steps, and compared with
the statistics (or the parameters) of the same loop written so that nothing could leak.
"""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx
from helpers import linen_train_step

import tract_jax

X = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
Y = jnp.arange(4) % 3


def _count(stats, *path):
    stat = stats
    for key in (*path, 'kernel'):
        stat = stat[key]
    return float(stat.count) if isinstance(stat, tract_jax.GramStatistic) else stat.rows.shape[0]


# --- linen ---------------------------------------------------------------------------


class LinenNet(nn.Module):
    stem: type = tract_jax.Conv
    remat: bool = False
    twice: bool = False

    @nn.compact
    def __call__(self, x):
        stem = (nn.remat(self.stem) if self.remat else self.stem)(4, (3, 3), name='stem')
        h = stem(x) + stem(x[:, ::-1]) if self.twice else stem(x)
        h = nn.BatchNorm(use_running_average=False, name='bn')(h)
        return nn.Dense(3, name='head')(nn.relu(h).mean(axis=(1, 2)))


def _merged_back_loop(model, steps=3, capture=()):
    """The linen loop that keeps every mutated collection: variables = {**variables, **state}."""
    variables = model.init(jax.random.key(1), X)
    tx = optax.chain(tract_jax.tract(0.1), optax.sgd(0.1))
    opt_state = tx.init(variables['params'])
    traces = []
    train_step = linen_train_step(model, tx, capture)

    @jax.jit
    def step(variables, opt_state, x):
        traces.append(None)  # counts the compilations
        return train_step(variables, opt_state, x, Y)

    counts = []
    for i in range(steps):
        variables, opt_state = step(variables, opt_state, X * (i + 1))
        counts.append(_count(variables['tract'], 'stem'))
    return counts, len(traces)


@pytest.mark.parametrize('remat', [False, True])
def test_linen_merged_back_variables_do_not_accumulate(remat):
    counts, _ = _merged_back_loop(LinenNet(remat=remat))
    assert counts == [4 * 64] * 3  # was 256, 512, 768


def test_linen_shared_stem_still_accumulates_in_one_apply_also_under_remat():
    assert _merged_back_loop(LinenNet(twice=True))[0] == [2 * 4 * 64] * 3
    assert _merged_back_loop(LinenNet(twice=True, remat=True))[0] == [2 * 4 * 64] * 3


def test_linen_capture_with_merged_back_variables():
    counts, _ = _merged_back_loop(LinenNet(stem=nn.Conv), capture=('stem',))
    assert counts == [4 * 64] * 3


class _DenseStem(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, name='head')(nn.relu(tract_jax.Dense(8, name='stem')(x.reshape(4, -1))))


def test_linen_row_statistic_does_not_grow_or_recompile():
    # 4 rows < fan-in 192: the statistic is the rows themselves. Merged back, they grew
    # 4 -> 8 -> 12 and every step compiled anew.
    counts, traces = _merged_back_loop(_DenseStem(), steps=4)
    assert counts == [4] * 4
    assert traces == 2  # the first step has no 'tract' in variables, the rest one


def test_linen_update_with_merged_back_variables_equals_a_fresh_apply(x64):
    model = LinenNet()
    variables = model.init(jax.random.key(1), X)
    _, state = model.apply(variables, 2 * X, mutable=['batch_stats', 'tract'])
    stale = {**variables, **state}

    def stats(variables):
        return model.apply(variables, X, mutable=['batch_stats', 'tract'])[1]['tract']

    chex.assert_trees_all_close(stats(stale), stats(variables), rtol=0, atol=0)


def test_linen_apply_without_mutable_tract_ignores_stale_statistics():
    model = LinenNet()
    variables = model.init(jax.random.key(1), X)
    _, state = model.apply(variables, X, mutable=['batch_stats', 'tract'])
    stale = {**variables, **state}
    out, new_state = model.apply(stale, X, mutable=['batch_stats'])
    chex.assert_trees_all_equal(out, model.apply(variables, X, mutable=['batch_stats'])[0])
    assert set(new_state) == {'batch_stats'}


# --- NNX -----------------------------------------------------------------------------


class NnxNet(nnx.Module):
    def __init__(self, rngs, remat=False, twice=False):
        self.stem = tract_jax.nnx.Conv(3, 4, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(4, rngs=rngs)
        self.head = nnx.Linear(4, 3, rngs=rngs)
        self.remat, self.twice = remat, twice

    def __call__(self, x):
        stem = nnx.remat(lambda stem, x: stem(x)) if self.remat else (lambda stem, x: stem(x))
        h = stem(self.stem, x) + stem(self.stem, x[:, ::-1]) if self.twice else stem(self.stem, x)
        return self.head(nnx.relu(self.bn(h)).mean(axis=(1, 2)))


def _loss(model, x):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), Y).mean()


def _nnx_training(between_steps, steps=3, **net):
    """An nnx.jit loop; ``between_steps(model, x)`` runs between the training steps."""
    model = NnxNet(nnx.Rngs(0), **net)
    optimizer = nnx.Optimizer(
        model, optax.chain(tract_jax.tract(0.1), optax.sgd(0.1)), wrt=nnx.Param
    )

    @nnx.jit
    def train_step(model, optimizer, x):
        grads = nnx.grad(_loss)(model, x)
        stats = tract_jax.nnx.pop_stats(model)
        optimizer.update(model, grads, tract_stats=stats)
        return stats

    counts = []
    for i in range(steps):
        x = X * (i + 1)
        counts.append(_count(train_step(model, optimizer, x), 'stem'))
        between_steps(model, x)
    return counts, nnx.state(model, nnx.Param)


def test_nnx_logging_forward_in_train_mode_is_not_recorded():
    @nnx.jit
    def train_accuracy(model, x):  # a forward in train mode, between steps
        return (model(x).argmax(-1) == Y).mean()

    counts, params = _nnx_training(train_accuracy)
    assert counts == [4 * 64] * 3  # was 256, 512, 512
    chex.assert_trees_all_equal(params, _nnx_training(lambda m, x: None)[1])


def test_nnx_statistics_never_popped_do_not_leak():
    @nnx.jit
    def saliency(model, x):  # a gradient taken for another purpose, nothing popped
        return nnx.grad(_loss)(model, x)

    counts, params = _nnx_training(saliency)
    assert counts == [4 * 64] * 3  # was 256, 512, 512
    chex.assert_trees_all_equal(params, _nnx_training(lambda m, x: None)[1])


def test_nnx_eval_and_train_alternating_with_evaluation_passes():
    @nnx.jit
    def evaluate(model, x):
        return _loss(model, x)

    def between_steps(model, x):
        model.eval()
        evaluate(model, x)
        evaluate(model, 2 * x)
        model.train()
        evaluate(model, x)  # train mode, not differentiated

    counts, params = _nnx_training(between_steps)
    assert counts == [4 * 64] * 3
    chex.assert_trees_all_close(params, _nnx_training(lambda m, x: None)[1])


def test_nnx_shared_stem_accumulates_and_remat_records_once(x64):
    counts, params = _nnx_training(lambda m, x: None, twice=True)
    assert counts == [2 * 4 * 64] * 3
    counts, remat_params = _nnx_training(lambda m, x: None, twice=True, remat=True)
    assert counts == [2 * 4 * 64] * 3
    chex.assert_trees_all_close(remat_params, params, rtol=1e-12)
    assert _nnx_training(lambda m, x: None, remat=True)[0] == [4 * 64] * 3


def test_nnx_pop_stats_rejects_statistics_of_different_passes():
    class TwoStems(nnx.Module):
        def __init__(self, rngs):
            self.a = tract_jax.nnx.Linear(3, 2, rngs=rngs)
            self.b = tract_jax.nnx.Linear(3, 2, rngs=rngs)

    model, x = TwoStems(nnx.Rngs(0)), jnp.ones((5, 3))
    nnx.grad(lambda m: m.a(x).sum() + m.b(x).sum())(model)
    nnx.grad(lambda m: m.a(x).sum())(model)  # b's statistic is from the first pass
    with pytest.raises(ValueError, match=r'pop_stats: .* 2 different gradient computations'):
        tract_jax.nnx.pop_stats(model)
