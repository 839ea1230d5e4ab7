"""Independent references for the tests: explicit unfolding and least squares in NumPy."""

import itertools

import jax
import numpy as np
import pytest

cpu_only = pytest.mark.skipif(
    jax.default_backend() != 'cpu', reason="about the CPU plan's compiled program"
)
"""For tests of what XLA:CPU compiles (its cost counts, its ops); other platforms' steps
are checked by exporting them (test_export.py), and measured by benchmarks/gpu_check.sh."""

gpu_only = pytest.mark.skipif(
    jax.default_backend() != 'gpu', reason='runs what Triton compiles for a GPU (none here)'
)
"""For tests of what only a GPU runs (the Pallas kernel compiled by Triton); on these
CPU-only machines they skip, and ``bash benchmarks/gpu_check.sh kernel`` runs them first
on a lent GPU, before it times the kernel."""


def same_pads(size, k, stride):
    """lax's 'SAME' padding of one spatial dim (input already dilated)."""
    out = -(-size // stride)
    total = max((out - 1) * stride + k - size, 0)
    return total // 2, total - total // 2


def unfold(x, kernel_size, strides, padding, input_dilation, kernel_dilation):
    """Patches of a channels-last N-D conv, by loops: (rows, prod(kernel) * C).

    Columns are spatial offsets (row-major) outer and channels inner, the order of a
    Flax kernel ``(*kernel_size, C, features)`` reshaped to ``(n, features)``.
    """
    x = np.asarray(x, np.float64)
    batch, *spatial, channels = x.shape
    rank = len(spatial)
    dilated = [(s - 1) * d + 1 for s, d in zip(spatial, input_dilation, strict=True)]
    xd = np.zeros((batch, *dilated, channels))
    xd[(slice(None), *(slice(None, None, d) for d in input_dilation))] = x
    k_eff = [(k - 1) * d + 1 for k, d in zip(kernel_size, kernel_dilation, strict=True)]
    mode = 'constant'
    if padding == 'SAME':
        pads = [same_pads(dilated[i], k_eff[i], strides[i]) for i in range(rank)]
    elif padding == 'VALID':
        pads = [(0, 0)] * rank
    elif padding in ('CIRCULAR', 'REFLECT'):
        pads = [((k - 1) // 2, k // 2) for k in k_eff]
        mode = {'CIRCULAR': 'wrap', 'REFLECT': 'reflect'}[padding]
    elif padding == 'CAUSAL':
        pads = [(k_eff[0] - 1, 0)]
    elif isinstance(padding, int):
        pads = [(padding, padding)] * rank
    else:
        pads = [(p, p) if isinstance(p, int) else tuple(p) for p in padding]
    xp = np.pad(xd, [(0, 0), *pads, (0, 0)], mode=mode)
    out = [(xp.shape[1 + i] - k_eff[i]) // strides[i] + 1 for i in range(rank)]
    rows = []
    for b in range(batch):
        for pos in itertools.product(*(range(o) for o in out)):
            patch = []
            for off in itertools.product(*(range(k) for k in kernel_size)):
                idx = tuple(pos[i] * strides[i] + off[i] * kernel_dilation[i] for i in range(rank))
                patch.extend(xp[(b, *idx)])
            rows.append(patch)
    return np.array(rows).reshape(len(rows), -1)


def two_step_update(x, z, dz, kernel, bias, lam, eta=1e-2):
    """TrAct's two steps solved by least squares, as an update direction.

    1. proposal on activations: ``Z* = Z - eta * b * dL/dZ``;
    2. ``K* = argmin ||Z* - X K - bias||² + lam * b * ||K - K0||²`` (np.linalg.lstsq
       on the stacked system).

    Returns ``(K0 - K*) / eta``, which TrAct's closed form must equal.
    """
    x, z, dz, kernel = (np.asarray(a, np.float64) for a in (x, z, dz, kernel))
    b, n = x.shape
    target = z - eta * b * dz - (0.0 if bias is None else np.asarray(bias, np.float64))
    scale = np.sqrt(lam * b)
    lhs = np.concatenate([x, scale * np.eye(n)])
    rhs = np.concatenate([target, scale * kernel])
    new_kernel, *_ = np.linalg.lstsq(lhs, rhs, rcond=None)
    return (kernel - new_kernel) / eta


def linen_train_step(model, tx, capture=()):
    """The linen step users write: every mutated collection is merged back into variables.

    Returns ``step(variables, opt_state, x, y) -> (variables, opt_state)``, not jitted.
    """
    import jax
    import optax

    import tract_jax

    def step(variables, opt_state, x, y):
        def loss_fn(params):
            with tract_jax.capture(*capture):
                logits, state = model.apply(
                    {**variables, 'params': params}, x, mutable=['batch_stats', 'tract']
                )
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return loss, state

        grads, state = jax.grad(loss_fn, has_aux=True)(variables['params'])
        updates, opt_state = tx.update(
            grads, opt_state, variables['params'], tract_stats=state['tract']
        )
        params = optax.apply_updates(variables['params'], updates)
        return {**variables, **state, 'params': params}, opt_state

    return step


# (kernel_size, strides, padding, input_dilation, kernel_dilation, input spatial shape)
CONV_CASES = [
    ((3,), (1,), 'SAME', (1,), (1,), (9,)),
    ((3,), (2,), 'CAUSAL', (1,), (2,), (10,)),
    ((4,), (3,), 'VALID', (1,), (1,), (11,)),
    ((3,), (2,), ((2, 1),), (3,), (1,), (7,)),
    ((2,), (1,), 'CIRCULAR', (1,), (3,), (8,)),
    ((3, 3), (1, 1), 'SAME', (1, 1), (1, 1), (7, 6)),
    ((3, 2), (2, 1), 'VALID', (1, 1), (1, 2), (9, 7)),
    ((4, 4), (2, 2), 'SAME', (1, 1), (1, 1), (8, 7)),
    ((3, 3), (2, 3), 'CIRCULAR', (1, 1), (2, 1), (9, 8)),
    ((3, 3), (1, 1), 'REFLECT', (1, 1), (1, 1), (6, 6)),
    ((2, 3), (1, 2), 2, (1, 1), (1, 1), (5, 6)),
    ((3, 2), (1, 1), ((1, 2), (0, 1)), (2, 1), (1, 1), (5, 6)),
    ((3, 3), (2, 2), (1, (2, 0)), (1, 1), (2, 1), (9, 9)),
    ((4, 4), (4, 4), 'VALID', (1, 1), (1, 1), (9, 10)),  # windows that tile: a patch embedding
    ((2, 3), (2, 3), 1, (2, 1), (1, 1), (4, 7)),
    ((2, 2, 2), (1, 2, 1), 'SAME', (1, 1, 1), (1, 1, 1), (4, 5, 3)),
    ((3, 1, 2), (2, 1, 1), 'VALID', (1, 1, 1), (1, 1, 2), (6, 3, 5)),
]

# The 2-D cases, and geometries the 2-D Grams (by segments, by kernel) are tested on too.
CASES_2D = [case for case in CONV_CASES if len(case[0]) == 2] + [
    ((7, 7), (2, 2), 3, (1, 1), (1, 1), (21, 40)),  # a ResNet stem's geometry
    ((3, 5), (2, 3), 1, (1, 1), (1, 2), (12, 31)),
    ((3, 3), (1, 1), 'VALID', (1, 2), (1, 1), (6, 11)),
]
