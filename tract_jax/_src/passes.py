"""Which differentiated pass a statistic belongs to, for the stateful front ends.

Flax linen statistics live in the output of one ``apply`` (see ``linen.py``). NNX
layers keep their statistic on the module between calls, so something must tell a
statistic of this gradient computation from one left by an earlier pass (an extra
forward for logging, a gradient that was never popped). That something is the pass
itself: the innermost JAX differentiation trace (``jax.grad``, ``jax.value_and_grad``,
``nnx.grad``, ``jax.vjp``, ...) that the layer is called under. It is found from the
current trace by following parent traces, which also leads out of ``jax.checkpoint``
/ ``nnx.remat`` and ``jit`` inside the differentiated function, so a shared or
rematerialized stem still belongs to its pass.

This reads JAX's trace context, which is internal: ``internals.py`` holds that access
and ``tests/test_internals.py`` pins it, so that a change there fails loudly.
"""

from __future__ import annotations

import itertools
import weakref
from typing import Any

from tract_jax._src import internals


def current_pass() -> Any | None:
    """The innermost differentiation trace the caller runs under, or ``None``."""
    trace = internals.current_trace()
    while trace is not None:
        if isinstance(trace, internals.DIFFERENTIATION_TRACES):
            return trace
        trace = internals.parent_trace(trace)
    return None


_SERIALS: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
_COUNTER = itertools.count()


class PassMark:
    """Marks the differentiated pass that recorded a statistic.

    Kept in a statistic variable's metadata, which NNX copies through its transforms
    (``nnx.remat``, ``nnx.jit``, ``nnx.grad``) with the variable. All marks compare
    equal, so that a mark never changes a graph definition and never makes
    ``nnx.jit`` recompile; ask :meth:`is_current` which pass one belongs to. The pass
    is held weakly: a finished pass's trace is freed, and its marks become stale.
    """

    __slots__ = ('_trace', 'serial')

    def __init__(self, trace: Any):
        self._trace = weakref.ref(trace)
        if trace not in _SERIALS:
            _SERIALS[trace] = next(_COUNTER)
        self.serial: int = _SERIALS[trace]
        """A number of its own for each pass, also once the pass has finished."""

    def is_current(self, trace: Any) -> bool:
        """Whether this mark was made in the pass ``trace``."""
        return self._trace() is trace

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PassMark)

    def __hash__(self) -> int:
        return hash(PassMark)

    def __repr__(self) -> str:
        return f'PassMark({self.serial})'
