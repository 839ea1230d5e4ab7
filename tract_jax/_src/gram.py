"""The Gram matrix ``XᵀX`` of a matrix of rows, in one product or in column blocks.

Which of the two a platform takes, and at which matmul precision, is decided in
``choice.py``; this module only computes.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp


def gram_of_rows(
    rows: jax.Array, *, parts: int, precision: jax.lax.PrecisionLike, bands: bool = False
) -> jax.Array:
    """``XᵀX`` of ``rows``, ``(..., n)``, in one product (``parts < 2``) or summed in
    column blocks.

    Every leading dim indexes rows, and the products contract over all of them rather
    than over one merged dim: merged, rows whose images are not the major dim (a
    TPU's images-minor patches) would leave a batch that ``jit`` splits over devices
    no way to stay split, and XLA's partitioner gathered it onto every device.

    With ``parts`` blocks of about ``n / parts`` columns each, only the blocks on and
    above the diagonal are multiplied (3 blocks: 0.67x the multiply-adds; 4: 0.62x;
    8: 0.56x) and those below are their exact transposes. They are multiplied one
    block per product (``parts (parts + 1) / 2`` products, each reading two blocks),
    or with ``bands`` one band per product: a block against every column from the
    diagonal on (``parts`` products, each reading a block and the columns right of it).
    """
    if parts < 2:
        return rows_product(rows, rows, precision)
    edges = _edges(rows.shape[-1], parts)
    pairs = list(itertools.combinations_with_replacement(range(parts), 2))
    if bands:
        band = [
            rows_product(rows[..., lo:hi], rows[..., lo:], precision)
            for lo, hi in itertools.pairwise(edges)
        ]
        upper = {
            (i, j): band[i][:, edges[j] - edges[i] : edges[j + 1] - edges[i]] for i, j in pairs
        }
    else:
        columns = [rows[..., lo:hi] for lo, hi in itertools.pairwise(edges)]
        upper = {(i, j): rows_product(columns[i], columns[j], precision) for i, j in pairs}
    return symmetric_from_upper(upper, parts)


def rows_product(a: jax.Array, b: jax.Array, precision: jax.lax.PrecisionLike) -> jax.Array:
    """``aᵀb`` of rows ``(..., p)`` and ``(..., q)``: ``(p, q)``, summed over every
    leading dim (none merged, so that a batch split over devices stays split)."""
    if a.ndim == 2:
        return jnp.matmul(a.T, b, precision=precision)
    rows = tuple(range(a.ndim - 1))
    return jax.lax.dot_general(a, b, ((rows, rows), ((), ())), precision=precision)


def _edges(n: int, parts: int) -> list[int]:
    """Where ``n`` columns are cut into ``parts`` blocks of about ``n / parts`` each."""
    return [i * n // parts for i in range(parts + 1)]


def multiply_adds(rows: int, n: int, parts: int) -> int:
    """The multiply-adds of :func:`gram_of_rows` for ``rows x n`` rows in ``parts``
    blocks (the full square for one product; bands or blocks alike otherwise)."""
    if parts < 2:
        return rows * n * n
    widths = [hi - lo for lo, hi in itertools.pairwise(_edges(n, parts))]
    return rows * sum(w * sum(widths[i:]) for i, w in enumerate(widths))


def symmetric_from_upper(upper: dict[tuple[int, int], jax.Array], k: int) -> jax.Array:
    """The ``k x k`` block matrix whose blocks ``(i, j)``, ``i <= j``, are ``upper``'s and
    whose blocks below the diagonal are their transposes."""
    return jnp.block(
        [[upper[i, j] if i <= j else upper[j, i].T for j in range(k)] for i in range(k)]
    )
