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


def _spd_solve(matrix: jax.Array, rhs: jax.Array) -> jax.Array:
    return jsl.cho_solve(jsl.cho_factor(matrix, lower=True), rhs)


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
      ``(XᵀX / b + λI)⁻¹ G``, of ``grad``'s shape and dtype.
    """
    shape, out_dtype = grad.shape, grad.dtype
    n = statistics.fan_in(stat)
    if isinstance(stat, statistics.GramStatistic):
        dtype = stat.gram.dtype
        g = grad.reshape(n, -1).astype(dtype)
        lam = jnp.asarray(lam, dtype)
        matrix = stat.gram / stat.count + lam * jnp.eye(n, dtype=dtype)
        new = _spd_solve(matrix, g)
    else:
        rows = stat.rows
        dtype = rows.dtype
        g = grad.reshape(n, -1).astype(dtype)
        lam = jnp.asarray(lam, dtype)
        b = rows.shape[0]
        kernel = jnp.matmul(rows, rows.T, precision=_HIGHEST) + (lam * b) * jnp.eye(b, dtype=dtype)
        xg = jnp.matmul(rows, g, precision=_HIGHEST)
        new = (g - jnp.matmul(rows.T, _spd_solve(kernel, xg), precision=_HIGHEST)) / lam
    return new.astype(out_dtype).reshape(shape)
