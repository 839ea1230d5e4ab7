"""Parity with the official PyTorch implementation (torch_tract 1.0.0).

The reference arrays were written by tests/parity/make_reference.py (float64) and are
committed; this test needs no torch.
"""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tract_jax

REFERENCE = np.load(pathlib.Path(__file__).parent / 'parity' / 'torch_tract_reference.npz')
CASES = sorted({key.split('/')[0] for key in REFERENCE.files if '/' in key})


def _case(name):
    return {k.split('/', 1)[1]: REFERENCE[k] for k in REFERENCE.files if k.startswith(name + '/')}


def test_reference_is_from_the_official_release():
    assert str(REFERENCE['torch_tract_version']) == '1.0.0'
    assert len(CASES) == 6


@pytest.mark.parametrize('name', CASES)
def test_matches_torch_tract(name, x64):
    c = _case(name)
    lam = float(c['lam'])
    if name.startswith('linear'):
        layer = tract_jax.Dense(c['weight'].shape[0], param_dtype=jnp.float64)
        x = jnp.asarray(c['x'])
        params = {'kernel': jnp.asarray(c['weight'].T), 'bias': jnp.asarray(c['bias'])}
        grad_out = jnp.asarray(c['grad_out'])
        to_torch = lambda k: k.T  # noqa: E731
    else:
        pad = [(int(p), int(p)) for p in c['padding']]
        layer = tract_jax.Conv(
            c['weight'].shape[0],
            tuple(int(k) for k in c['kernel_size']),
            strides=tuple(int(s) for s in c['stride']),
            padding=pad,
            param_dtype=jnp.float64,
        )
        x = jnp.asarray(c['x']).transpose(0, 2, 3, 1)  # NCHW -> NHWC
        params = {
            'kernel': jnp.asarray(c['weight'].transpose(2, 3, 1, 0)),  # OIHW -> HWIO
            'bias': jnp.asarray(c['bias']),
        }
        grad_out = jnp.asarray(c['grad_out']).transpose(0, 2, 3, 1)
        to_torch = lambda k: k.transpose(3, 2, 0, 1)  # noqa: E731

    def loss_fn(params):
        y, state = layer.apply({'params': params}, x, mutable=['tract'])
        return jnp.sum(y * grad_out), state['tract']

    grads, stats = jax.grad(loss_fn, has_aux=True)(params)
    tx = tract_jax.tract(lam)
    updates, _ = tx.update(grads, tx.init(params), tract_stats=stats)
    np.testing.assert_allclose(
        to_torch(updates['kernel']), c['weight_grad'], rtol=1e-10, atol=1e-12
    )
    np.testing.assert_allclose(updates['bias'], c['bias_grad'], rtol=1e-12, atol=1e-12)
