"""The TrAct solve: one place for the Gram and the Woodbury forms.

For a kernel gradient ``G = XᵀΔ`` (``n x features``) TrAct's update is

    (XᵀX / b + λI)⁻¹ G                                   (Gram form, n x n solve)
  = (G − Xᵀ (X Xᵀ + λ b I)⁻¹ X G) / λ                    (Woodbury form, b x b solve)

with ``b`` the number of rows of ``X``. Both matrices are symmetric positive definite
with smallest eigenvalue at least ``λ`` (resp. ``λ b``), so a Cholesky solve is
stable; it runs in the statistic's dtype (float32 or wider) and the result is cast
back to the gradient's dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl

from tract_jax._src import statistics

_HIGHEST = jax.lax.Precision.HIGHEST


def _cholesky_solve(matrix: jax.Array, rhs: jax.Array) -> jax.Array:
    return jsl.cho_solve(jsl.cho_factor(matrix, lower=True), rhs)


def _eigen_solve(moment: jax.Array, rhs: jax.Array, shift: jax.Array) -> jax.Array:
    """``(moment + shift I)⁻¹ rhs`` for a PSD ``moment``, finite even where f32 rounding
    has made it numerically indefinite (its eigenvalues are clipped at zero)."""
    eigenvalues, vectors = jnp.linalg.eigh(moment, symmetrize_input=True)
    scale = 1.0 / (jnp.maximum(eigenvalues, 0) + shift)
    coefficients = jnp.matmul(vectors.T, rhs, precision=_HIGHEST) * scale[:, None]
    return jnp.matmul(vectors, coefficients, precision=_HIGHEST)


def _robust_solve(moment: jax.Array, rhs: jax.Array, shift: jax.Array) -> jax.Array:
    """``(moment + shift I)⁻¹ rhs``: Cholesky, or an eigendecomposition where that fails.

    With a large condition number (unstandardized pixels in a large patch) a float32
    Cholesky can break down and return NaN; then, and only then (``lax.cond``), the
    clipped eigendecomposition gives a finite update bounded by ``|rhs| / shift``.
    """
    eye = jnp.eye(moment.shape[0], dtype=moment.dtype)
    solution = _cholesky_solve(moment + shift * eye, rhs)
    return jax.lax.cond(
        jnp.all(jnp.isfinite(solution)),
        lambda: solution,
        lambda: _eigen_solve(moment, rhs, shift),
    )


def tract_solve(
    stat: statistics.Statistic, grad: jax.Array, lam: jax.typing.ArrayLike
) -> jax.Array:
    """Applies TrAct to a kernel gradient.

    Args:
      stat: the layer's statistic (``GramStatistic`` or ``RowStatistic``) of fan-in n.
      grad: the kernel gradient, any shape whose leading dims multiply to n
        (a Dense kernel ``(n, features)`` or a conv kernel ``(*window, in, features)``).
      lam: the ridge λ > 0.

    Returns:
      ``(XᵀX / b + λI)⁻¹ G``, of ``grad``'s shape and dtype. It is non-finite only if
      the statistic or the gradient is.
    """
    shape, out_dtype = grad.shape, grad.dtype
    n = statistics.fan_in(stat)
    if isinstance(stat, statistics.GramStatistic):
        dtype = stat.gram.dtype
        g = grad.reshape(n, -1).astype(dtype)
        new = _robust_solve(stat.gram / stat.count, g, jnp.asarray(lam, dtype))
    else:
        rows = stat.rows
        dtype = rows.dtype
        g = grad.reshape(n, -1).astype(dtype)
        lam = jnp.asarray(lam, dtype)
        b = rows.shape[0]
        outer = jnp.matmul(rows, rows.T, precision=_HIGHEST)
        xg = jnp.matmul(rows, g, precision=_HIGHEST)
        inner = _robust_solve(outer, xg, lam * b)
        new = (g - jnp.matmul(rows.T, inner, precision=_HIGHEST)) / lam
    return new.astype(out_dtype).reshape(shape)
