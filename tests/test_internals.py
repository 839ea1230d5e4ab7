"""Pins every private JAX/Flax API tract_jax relies on (tract_jax/_src/internals.py).

A JAX or Flax release that changes one of them fails here, by name, instead of training
with a statistic from the wrong pass.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

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
