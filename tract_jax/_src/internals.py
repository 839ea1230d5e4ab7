"""Every private JAX and Flax API that tract_jax relies on, and every API that changed
between the oldest and the newest releases it supports, in one place.

Three things tract_jax needs have no public API:

- the current JAX trace and its differentiation traces (``jax._src.core.trace_ctx``,
  ``jax._src.interpreters.ad``), to tell which ``jax.grad`` pass a stateful layer
  (NNX, Equinox) records in;
- the stack of linen modules being called (``flax.linen.module._context``), to tell
  one ``apply`` from the next;
- Flax's padding canonicalization (``flax.linen.linear.canonicalize_padding``), so
  that a statistic unfolds its input exactly as ``nn.Conv`` pads it.

Each is looked up here, at import, and ``tests/test_internals.py`` pins its behaviour
on the installed releases. A JAX or Flax release that moves one fails at
``import tract_jax`` with an :class:`InternalsChanged` error that names it, instead
of a wrong statistic later.

Below those, the public APIs that differ inside the supported range (pyproject.toml's
floors to the newest releases) get one lookup per version range; CI runs the suite,
``tests/test_internals.py`` included, at both ends.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import flax
import jax
import optax


class InternalsChanged(ImportError):
    """A private JAX/Flax API that tract_jax relies on is missing or has changed."""


def _lookup(what: str, find: Callable[[], Any]) -> Any:
    try:
        return find()
    except (ImportError, AttributeError) as error:
        raise InternalsChanged(
            f'tract_jax relies on {what}, which this installation (jax {jax.__version__}, '
            f'flax {flax.__version__}) does not have as expected ({error}). Install the '
            'jax/flax versions pyproject.toml allows, or report this at the tract_jax '
            'issue tracker with both versions.'
        ) from error


def _jax_traces() -> tuple[Any, tuple[type, ...]]:
    from jax._src import core
    from jax._src.interpreters import ad

    return core.trace_ctx, (ad.JVPTrace, ad.LinearizeTrace)


_TRACE_CTX, DIFFERENTIATION_TRACES = _lookup(
    'jax._src.core.trace_ctx and jax._src.interpreters.ad.JVPTrace/LinearizeTrace',
    _jax_traces,
)


def current_trace() -> Any:
    """The trace JAX is running under now (the innermost one)."""
    return _TRACE_CTX.trace


def parent_trace(trace: Any) -> Any | None:
    """The trace ``trace`` was started under, or ``None`` at the bottom."""
    return getattr(trace, 'parent_trace', None)


def _linen_context() -> Any:
    from flax.linen import module

    context = module._context
    context.module_stack  # noqa: B018 (fails here, not at the first apply, if renamed)
    return context


_LINEN_CONTEXT = _lookup('flax.linen.module._context.module_stack', _linen_context)


def linen_module_stack() -> list[Any]:
    """The linen modules being called now, outermost first (``None`` entries for
    unbound frames)."""
    return list(_LINEN_CONTEXT.module_stack)


def _canonicalize_padding() -> Callable[[Any, int], Any]:
    from flax.linen.linear import canonicalize_padding

    return canonicalize_padding


canonicalize_padding: Callable[[Any, int], Any] = _lookup(
    'flax.linen.linear.canonicalize_padding', _canonicalize_padding
)
"""Flax's own reading of a ``padding`` field: a string, or ``(low, high)`` per dim."""


# APIs that changed inside the supported range: one lookup per version range.


def release(version: str) -> tuple[int, ...]:
    """``'0.12.1'`` (or ``'0.12.1rc1'``, ``'0.12.1.dev3'``) as ``(0, 12, 1)``."""
    parts = []
    for part in version.split('.')[:3]:
        digits = ''.join(itertools.takewhile(str.isdigit, part))
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


JAX = release(jax.__version__)
FLAX = release(flax.__version__)
OPTAX = release(optax.__version__)

MULTI_STEPS_HAS_ACCUMULATOR_DTYPE = OPTAX >= (0, 2, 8)
"""Whether ``optax.MultiSteps`` takes ``accumulator_dtype``; before optax 0.2.8 it
accumulates in the parameters' dtype."""


def _private_use_abstract_mesh() -> Callable[[Any], Any]:
    from jax._src import mesh

    return mesh.use_abstract_mesh


if JAX >= (0, 7, 2):
    use_abstract_mesh = jax.sharding.use_abstract_mesh
else:  # jax 0.7.1 (the floor): the same context manager, not yet public
    use_abstract_mesh = _lookup('jax._src.mesh.use_abstract_mesh', _private_use_abstract_mesh)

if FLAX >= (0, 12, 1):  # Variable.get_value/set_value; '.value' is deprecated

    def variable_value(variable: Any) -> Any:
        """The value an NNX ``Variable`` holds."""
        return variable.get_value()

    def set_variable_value(variable: Any, value: Any) -> None:
        """Replaces the value an NNX ``Variable`` holds."""
        variable.set_value(value)

else:  # flax 0.11.0 to 0.12.0: only the '.value' property

    def variable_value(variable: Any) -> Any:
        """The value an NNX ``Variable`` holds."""
        return variable.value

    def set_variable_value(variable: Any, value: Any) -> None:
        """Replaces the value an NNX ``Variable`` holds."""
        variable.value = value
