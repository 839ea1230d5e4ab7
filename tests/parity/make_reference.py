"""Writes reference outputs of the official PyTorch TrAct (torch_tract 1.0.0).

Run once, where torch is installed (the test suite itself never needs torch):

    pip install torch==2.13.0 torch_tract==1.0.0
    python tests/parity/make_reference.py

It runs TrAct's Linear and Conv2d, in float64, on fixed seeded inputs covering both
branches of the official code (Gram inverse when rows >= n, Woodbury when rows < n),
and saves inputs, weights, output gradients and the resulting weight and bias
gradients to torch_tract_reference.npz beside this file.
"""

import pathlib
from importlib import metadata

import numpy as np
import torch
from torch_tract import TrAct

CASES = {
    # name: (kind, input shape, layer args, lambda)
    'linear_gram': ('linear', (32, 8), dict(in_features=8, out_features=5), 0.1),
    'linear_woodbury': ('linear', (6, 20), dict(in_features=20, out_features=4), 0.1),
    'linear_3d_input': ('linear', (4, 5, 6), dict(in_features=6, out_features=3), 0.5),
    'conv_stride2_pad1': (
        'conv',
        (3, 2, 9, 7),
        dict(in_channels=2, out_channels=5, kernel_size=3, stride=2, padding=1),
        0.1,
    ),
    'conv_rect_pad': (
        'conv',
        (2, 3, 8, 8),
        dict(in_channels=3, out_channels=4, kernel_size=(3, 2), stride=(1, 2), padding=(2, 1)),
        0.3,
    ),
    'conv_woodbury': (
        'conv',
        (1, 4, 5, 5),
        dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=0),
        0.1,
    ),
}


def main():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    out = {
        'torch_version': np.array(torch.__version__),
        'torch_tract_version': np.array(metadata.version('torch_tract')),
    }
    for name, (kind, shape, args, lam) in CASES.items():
        layer = torch.nn.Linear(**args) if kind == 'linear' else torch.nn.Conv2d(**args)
        layer = TrAct(layer.double(), l=lam)
        x = torch.tensor(rng.standard_normal(shape) * 2.0 + 0.5)
        y = layer(x)
        grad_out = torch.tensor(rng.standard_normal(tuple(y.shape)))
        (y * grad_out).sum().backward()
        for key, value in {
            'x': x,
            'weight': layer.weight,
            'bias': layer.bias,
            'grad_out': grad_out,
            'weight_grad': layer.weight.grad,
            'bias_grad': layer.bias.grad,
        }.items():
            out[f'{name}/{key}'] = value.detach().numpy().reshape(value.shape)
        out[f'{name}/lam'] = np.array(lam)
        for key in ('stride', 'padding', 'kernel_size'):
            if key in args:
                out[f'{name}/{key}'] = np.array(getattr(layer, key))
    path = pathlib.Path(__file__).with_name('torch_tract_reference.npz')
    np.savez(path, **out)
    print(f'wrote {len(CASES)} cases to {path}')


if __name__ == '__main__':
    main()
