"""The TrAct solve: one place for the Gram and the Woodbury forms.

For a kernel gradient ``G = XᵀΔ`` (``n x features``) TrAct's update is

    (XᵀX / b + λI)⁻¹ G                                   (Gram form, n x n solve)
  = (G − Xᵀ (X Xᵀ + λ b I)⁻¹ X G) / λ                    (Woodbury form, b x b solve)

with ``b`` the number of rows of ``X``. Both matrices are symmetric positive definite
with smallest eigenvalue at least ``λ`` (resp. ``λ b``), so a Cholesky solve is
stable; it runs in the statistic's dtype (float32 or wider) and the result is cast
back to the gradient's dtype. The solve has no data-dependent control flow: on a GPU
a ``lax.cond`` copies its predicate to the host and waits for the device, every step.

On CPU the factorization is built from XLA operations (a recursive blocked Cholesky,
below) rather than LAPACK: jaxlib's LAPACK is a multithreaded OpenBLAS whose threads
fight XLA's own thread pool when XLA runs other work of the training step next to
the call. GPUs and TPUs keep their native Cholesky (``choice.py`` says why).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl

from tract_jax._src import choice, statistic

_HIGHEST = jax.lax.Precision.HIGHEST
_LEAF = 64  # the largest block the recursive Cholesky factors column by column


def _matmul(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.matmul(a, b, precision=_HIGHEST)


def _leaf_inverse_cholesky(matrix: jax.Array) -> jax.Array:
    """``L⁻¹`` for ``matrix = L Lᵀ``: a right-looking loop over the k columns, which
    also builds ``L⁻¹`` row by row by forward substitution."""
    k = matrix.shape[0]
    index = jnp.arange(k)
    eye = jnp.eye(k, dtype=matrix.dtype)

    def column(j, carry):
        schur, factor, inverse = carry
        pivot = jnp.sqrt(schur[j, j])
        col = jnp.where(index >= j, schur[:, j] / pivot, 0)
        schur = schur - jnp.outer(col, col)
        factor = factor.at[:, j].set(col)
        # Row j of L⁻¹; its rows >= j are still zero, so the product needs no mask.
        inverse = inverse.at[j].set((eye[j] - _matmul(factor[j], inverse)) / pivot)
        return schur, factor, inverse

    zeros = jnp.zeros_like(matrix)
    return jax.lax.fori_loop(0, k, column, (matrix, zeros, zeros))[2]


def _inverse_cholesky(matrix: jax.Array) -> jax.Array:
    """``L⁻¹`` for ``matrix = L Lᵀ`` by 2x2 blocks, recursively; all but the leaves are
    matmuls. A non-positive pivot (a breakdown) gives NaN, as LAPACK's would."""
    n = matrix.shape[0]
    if n <= _LEAF:
        return _leaf_inverse_cholesky(matrix)
    h = n // 2
    inv11 = _inverse_cholesky(matrix[:h, :h])
    l21 = _matmul(matrix[h:, :h], inv11.T)
    inv22 = _inverse_cholesky(matrix[h:, h:] - _matmul(l21, l21.T))
    inv21 = -_matmul(inv22, _matmul(l21, inv11))
    upper = jnp.zeros((h, n - h), matrix.dtype)
    return jnp.block([[inv11, upper], [inv21, inv22]])


def _xla_cholesky_solve(matrix: jax.Array, rhs: jax.Array) -> jax.Array:
    inverse = _inverse_cholesky(matrix)
    return _matmul(inverse.T, _matmul(inverse, rhs))


def _native_cholesky_solve(matrix: jax.Array, rhs: jax.Array) -> jax.Array:
    return jsl.cho_solve(jsl.cho_factor(matrix, lower=True), rhs)


def _cholesky_solve(matrix: jax.Array, rhs: jax.Array) -> jax.Array:
    """``matrix⁻¹ rhs`` for a symmetric positive definite ``matrix``, NaN on breakdown,
    by the factorization of the platform's plan."""

    def solve(native: bool, matrix: jax.Array, rhs: jax.Array) -> jax.Array:
        return (_native_cholesky_solve if native else _xla_cholesky_solve)(matrix, rhs)

    return choice.per_platform(lambda plan: plan.native_cholesky, solve, matrix, rhs)


def ridge_solve(moment: jax.Array, rhs: jax.Array, shift: jax.Array) -> jax.Array:
    """``(moment + shift I)⁻¹ rhs`` for a PSD ``moment``: finite for every finite input.

    In exact arithmetic every pivot of this Cholesky is at least ``shift``. In floating
    point, eigenvalues of ``moment`` below about ``eps · trace(moment)`` are rounding
    noise (a float32 Gram of [0, 255] pixels in large patches even has negative ones),
    and a shift below that lets the factorization break down. So the shift is floored
    at ``eps · trace(moment)``: the exact solve wherever the statistic resolves
    ``shift`` (standardized 16x16x3 patches: a floor near 1e-4 against λ = 0.1), and a
    factorization that does not break down where it does not. Should it break down
    all the same, the solve of the majorant ``trace(moment) I ⪰ moment`` is taken, a
    finite step no longer than the exact one, by a select: no control flow, for an
    ``n x features`` division and select per step.
    """
    eye = jnp.eye(moment.shape[0], dtype=moment.dtype)
    trace = jnp.trace(moment)
    shift = jnp.maximum(shift, jnp.finfo(moment.dtype).eps * trace)
    solution = _cholesky_solve(moment + shift * eye, rhs)
    return jnp.where(jnp.all(jnp.isfinite(solution)), solution, rhs / (shift + trace))


def tract_solve(stat: statistic.Statistic, grad: jax.Array, lam: jax.typing.ArrayLike) -> jax.Array:
    """Applies TrAct to a kernel gradient.

    Args:
      stat: the layer's statistic (``GramStatistic`` or ``RowStatistic``) of fan-in n.
      grad: the kernel gradient, in the statistic's layout: for ``'features_last'``
        a Dense ``(n, features)`` or conv ``(*window, in, features)`` kernel, for
        ``'features_first'`` a Linear ``(features, n)`` or conv
        ``(features, in, *window)`` kernel.
      lam: the ridge λ > 0.

    Returns:
      ``(XᵀX / b + λI)⁻¹ G``, of ``grad``'s shape and dtype. It is non-finite only if
      the statistic or the gradient is.
    """
    shape, out_dtype = grad.shape, grad.dtype
    dtype = statistic.dtype_of(stat)
    g = statistic.kernel_matrix(grad, stat.layout).astype(dtype)
    if isinstance(stat, statistic.GramStatistic):
        new = ridge_solve(stat.gram / stat.count, g, jnp.asarray(lam, dtype))
    else:
        rows = stat.rows
        lam = jnp.asarray(lam, dtype)
        b = rows.shape[0]
        outer = _matmul(rows, rows.T)
        xg = _matmul(rows, g)
        inner = ridge_solve(outer, xg, lam * b)
        new = (g - _matmul(rows.T, inner)) / lam
    return statistic.from_kernel_matrix(new.astype(out_dtype), shape, stat.layout)
