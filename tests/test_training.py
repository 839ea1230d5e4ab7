"""End to end: a jitted TrAct training step lowers the loss on real images (digits)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

import tract_jax


class SmallCNN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = tract_jax.Conv(16, (3, 3), use_bias=False)(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        x = nn.max_pool(nn.relu(x), (2, 2), (2, 2))
        x = nn.relu(nn.Conv(32, (3, 3))(x)).mean(axis=(1, 2))
        return nn.Dense(10)(x)


def test_tract_step_with_batchnorm_lowers_the_loss():
    digits = load_digits()
    images = (digits.images[..., None] / 16.0 - 0.3) / 0.4  # 8x8, roughly standardized
    images, labels = jnp.asarray(images, jnp.float32), jnp.asarray(digits.target)
    model = SmallCNN()
    variables = model.init(jax.random.key(0), images[:2], train=False)
    params, batch_stats = variables['params'], variables['batch_stats']
    tx = optax.chain(tract_jax.tract(0.1), optax.adam(1e-2))
    opt_state = tx.init(params)

    def loss_fn(params, batch_stats, x, y):
        logits, state = model.apply(
            {'params': params, 'batch_stats': batch_stats},
            x,
            train=True,
            mutable=['batch_stats', 'tract'],
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, state

    @jax.jit
    def step(params, batch_stats, opt_state, x, y):
        (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats, x, y)
        updates, opt_state = tx.update(grads, opt_state, params, tract_stats=state['tract'])
        return optax.apply_updates(params, updates), state['batch_stats'], opt_state, loss

    eval_x, eval_y = images[:512], labels[:512]
    first = float(loss_fn(params, batch_stats, eval_x, eval_y)[0])
    rng = np.random.default_rng(0)
    for _ in range(100):
        idx = rng.choice(len(images), 64, replace=False)
        params, batch_stats, opt_state, loss = step(
            params, batch_stats, opt_state, images[idx], labels[idx]
        )
        assert np.isfinite(float(loss))
    last = float(loss_fn(params, batch_stats, eval_x, eval_y)[0])
    assert last < 0.5 * first, (first, last)
