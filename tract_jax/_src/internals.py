"""Every private JAX and Flax API that tract_jax relies on, in one place.

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
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import jax


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
