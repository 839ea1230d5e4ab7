"""Pins every private JAX/Flax API tract_jax relies on (tract_jax/_src/internals.py).

A JAX or Flax release that changes one of them fails here, by name, instead of training
with a statistic from the wrong pass.
"""

import inspect
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest

import tract_jax
from tract_jax._src import internals, passes


def test_pass_detection_on_this_jax():
    """Pins what the NNX front end relies on: the pass is found through remat and jit."""
    assert passes.current_pass() is None
    seen = []

    def f(w):
        seen.append(passes.current_pass())
        inner = jax.checkpoint(lambda w: seen.append(passes.current_pass()) or w * 2)(w)
        inner = jax.jit(lambda w: seen.append(passes.current_pass()) or w + 1)(inner)
        return inner.sum()

    jax.grad(f)(jnp.ones(3))
    assert seen[0] is not None and all(s is seen[0] for s in seen)
    jax.jit(jax.grad(f))(jnp.ones(3))
    assert seen[3] is not None and seen[3] is not seen[0] and all(s is seen[3] for s in seen[3:])
    seen.clear()
    jax.jit(f)(jnp.ones(3))
    assert seen == [None, None, None]


def test_trace_chain_ends_and_finds_jvp_traces():
    assert internals.current_trace() is not None  # the eval trace at the bottom
    assert internals.parent_trace(internals.current_trace()) is None
    found = []
    jax.grad(lambda x: found.append(internals.current_trace()) or x)(1.0)
    assert isinstance(found[0], internals.DIFFERENTIATION_TRACES)
    found.clear()
    jax.linearize(lambda x: found.append(internals.current_trace()) or x, 1.0)
    assert isinstance(found[0], internals.DIFFERENTIATION_TRACES)


def test_linen_module_stack_holds_the_apply_root():
    seen = []

    class Inner(nn.Module):
        @nn.compact
        def __call__(self, x):
            seen.append(internals.linen_module_stack())
            return x

    class Outer(nn.Module):
        @nn.compact
        def __call__(self, x):
            return Inner()(x)

    model = Outer()
    model.apply({}, jnp.ones(2))
    stack = [m for m in seen[0] if m is not None]
    assert isinstance(stack[0], Outer) and isinstance(stack[-1], Inner)
    model.apply({}, jnp.ones(2))
    first_root = stack[0]
    second_root = next(m for m in seen[1] if m is not None)
    assert second_root is not first_root  # a fresh clone per apply: one apply, one pass


@pytest.mark.parametrize(
    'padding, expected',
    [
        ('SAME', 'SAME'),
        ('CIRCULAR', 'CIRCULAR'),
        (1, [(1, 1), (1, 1)]),
        ((2, (0, 1)), [(2, 2), (0, 1)]),
    ],
)
def test_canonicalize_padding_reads_flax_paddings(padding, expected):
    assert internals.canonicalize_padding(padding, 2) == expected


def test_a_missing_internal_fails_by_name():
    def gone():
        raise AttributeError("module 'jax._src.core' has no attribute 'trace_ctx'")

    with pytest.raises(internals.InternalsChanged, match=r'jax\._src\.core\.trace_ctx'):
        internals._lookup('jax._src.core.trace_ctx', gone)


@pytest.mark.parametrize(
    'version, expected',
    [('0.7.1', (0, 7, 1)), ('0.12.1rc1', (0, 12, 1)), ('0.13.0.dev3', (0, 13, 0)), ('1.0', (1, 0))],
)
def test_release_reads_version_strings(version, expected):
    assert internals.release(version) == expected


def test_nnx_variable_value_lookup_fits_this_flax():
    """flax >= 0.12.1 takes get_value/set_value (and deprecates .value); older, .value."""
    from flax import nnx

    variable = nnx.Variable(jnp.zeros(2))
    with warnings.catch_warnings():
        warnings.simplefilter('error', DeprecationWarning)
        internals.set_variable_value(variable, jnp.ones(2))
        assert internals.variable_value(variable).tolist() == [1.0, 1.0]
    assert hasattr(nnx.Variable, 'get_value') == (internals.FLAX >= (0, 12, 1))


def test_use_abstract_mesh_lookup_fits_this_jax():
    mesh = jax.make_mesh((1,), ('data',), axis_types=(jax.sharding.AxisType.Explicit,))
    with internals.use_abstract_mesh(mesh.abstract_mesh):
        assert jax.sharding.get_abstract_mesh() == mesh.abstract_mesh
    assert hasattr(jax.sharding, 'use_abstract_mesh') == (internals.JAX >= (0, 7, 2))


def test_multi_steps_lookup_fits_this_optax():
    takes = 'accumulator_dtype' in inspect.signature(optax.MultiSteps).parameters
    assert takes == internals.MULTI_STEPS_HAS_ACCUMULATOR_DTYPE == (internals.OPTAX >= (0, 2, 8))


def test_multi_steps_without_accumulator_dtype_says_what_it_accumulates_in(monkeypatch):
    """Before optax 0.2.8 MultiSteps accumulates in the parameters' dtype: another dtype is
    a clear error at init, never a silent change (forced here on any optax)."""
    monkeypatch.setattr(internals, 'MULTI_STEPS_HAS_ACCUMULATOR_DTYPE', False)
    params = {'kernel': jnp.zeros((3, 2), jnp.bfloat16), 'step': jnp.zeros((), jnp.int32)}
    stats = {'kernel': tract_jax.dense_statistic(jnp.ones((4, 3)))}
    inner = optax.chain(tract_jax.tract(0.1), optax.sgd(0.1))
    tx = tract_jax.MultiSteps(inner, 2, stats_like=stats)
    with pytest.raises(ValueError, match=r'optax >= 0\.2\.8.*bfloat16.*accumulator_dtype=None'):
        tx.init(params)
    assert tract_jax.MultiSteps(inner, 2, stats_like=stats, accumulator_dtype=None).init(params)
    float32 = {'kernel': jnp.zeros((3, 2))}
    assert tract_jax.MultiSteps(inner, 2, stats_like=stats).init(float32)
