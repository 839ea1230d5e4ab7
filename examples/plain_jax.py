"""TrAct in plain JAX: a hand-written conv net (a params dict, ``lax.conv``) on digits.

No framework: the first layer's input is the batch itself, so its statistic is one call
of the public API inside the training step, at the kernel's path in the params dict.
The kernel is OIHW, as PyTorch-converted weights are, so the statistic is made with
``layout='features_first'`` and images in NCHW (``channels_last=False``).

    python examples/plain_jax.py [--steps 200] [--lam 0.1] [--no-tract]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

import tract_jax

STEM = {'kernel_size': (3, 3), 'strides': (1, 1), 'padding': ((1, 1), (1, 1))}


def init(key: jax.Array) -> dict[str, jax.Array]:
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        'stem_w': jax.random.normal(k1, (16, 1, 3, 3)) / 3.0,  # OIHW
        'stem_b': jnp.zeros(16),
        'conv_w': jax.random.normal(k2, (32, 16, 3, 3)) / 12.0,
        'head_w': jax.random.normal(k3, (32, 10)) / 6.0,
        'head_b': jnp.zeros(10),
    }


def forward(params: dict[str, jax.Array], images: jax.Array) -> jax.Array:
    """Logits of NCHW images."""
    h = jax.lax.conv_general_dilated(
        images, params['stem_w'], STEM['strides'], STEM['padding']
    ) + params['stem_b'].reshape(1, -1, 1, 1)
    h = jax.nn.relu(h)
    h = jax.nn.relu(jax.lax.conv_general_dilated(h, params['conv_w'], (2, 2), 'SAME'))
    return h.mean(axis=(2, 3)) @ params['head_w'] + params['head_b']


def make_step(tx: optax.GradientTransformation, use_tract: bool):
    @jax.jit
    def step(params, opt_state, images, labels):
        def loss_fn(params):
            logits = forward(params, images)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        extra = {}
        if use_tract:  # the stem's input is the batch: its statistic, at the kernel's key
            stat = tract_jax.conv_statistic(
                images, **STEM, channels_last=False, layout='features_first'
            )
            extra = {'tract_stats': {'stem_w': stat}}
        updates, opt_state = tx.update(grads, opt_state, params, **extra)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--steps', type=int, default=200)
    parser.add_argument('--lam', type=float, default=0.1)
    parser.add_argument('--lr', type=float, default=0.05)
    parser.add_argument('--no-tract', action='store_true')
    args = parser.parse_args(argv)

    digits = load_digits()
    images = ((digits.images / 16.0 - 0.3) / 0.4)[:, None].astype(np.float32)  # NCHW
    labels = digits.target.astype(np.int32)
    use_tract = not args.no_tract
    sgd = optax.sgd(args.lr, momentum=0.9)
    tx = optax.chain(tract_jax.tract(args.lam), sgd) if use_tract else sgd
    params = init(jax.random.key(0))
    opt_state = tx.init(params)
    step = make_step(tx, use_tract)
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(args.steps):
        idx = rng.choice(len(images), 64, replace=False)
        params, opt_state, loss = step(params, opt_state, images[idx], labels[idx])
        losses.append(float(loss))
    accuracy = float((forward(params, images).argmax(-1) == labels).mean())
    arm = 'TrAct' if use_tract else 'plain'
    print(f'{arm}: first loss {losses[0]:.3f}, last loss {np.mean(losses[-10:]):.3f}, '
          f'train accuracy {accuracy:.3f}')  # fmt: skip
    return {
        'first_loss': losses[0],
        'last_loss': float(np.mean(losses[-10:])),
        'accuracy': accuracy,
    }


if __name__ == '__main__':
    main()
