"""The model, data and whole-batch reference update shared by the distributed checks.

Imported by tests/multidevice_check.py (8 simulated devices in one process) and
tests/multiprocess_check.py (two processes on localhost); both set their device
count before importing jax, so this module sets nothing up itself.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import tract_jax


class Net(nn.Module):
    stem: str

    @nn.compact
    def __call__(self, x):
        if self.stem == 'conv':
            x = tract_jax.Conv(6, (3, 3), strides=2, param_dtype=jnp.float64, name='stem')(x)
            x = nn.relu(x).mean(axis=(1, 2))
        else:
            x = nn.relu(tract_jax.Dense(6, param_dtype=jnp.float64, name='stem')(x))
        return nn.Dense(4, param_dtype=jnp.float64, name='head')(x)


def loss_and_stats(model, params, x, y):
    logits, state = model.apply({'params': params}, x, mutable=['tract'])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, state['tract']


def update_with(tx, model, params, x, y):
    """``tx``'s first update from the gradient and statistics of ``(x, y)``."""
    grads, stats = jax.grad(functools.partial(loss_and_stats, model), has_aux=True)(params, x, y)
    return tx.update(grads, tx.init(params), params, tract_stats=stats)[0]


@functools.partial(jax.jit, static_argnums=0)  # one compile, not one per operation
def reference(model, params, x, y):
    return update_with(tract_jax.tract(0.1), model, params, x, y)


def check(name, got, want):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-10, atol=1e-13)
    print('ok', name, flush=True)


def problem(stem, batch):
    rng = np.random.default_rng(0)
    shape = (batch, 8, 8, 3) if stem == 'conv' else (batch, 20)
    x = jnp.asarray(rng.normal(size=shape) * 2 + 0.5)
    y = jnp.asarray(rng.integers(0, 4, batch))
    model = Net(stem)
    params = jax.jit(model.init)(jax.random.key(0), x)['params']
    return model, params, x, y
