"""The benchmark models in PyTorch, timed plain vs ``torch_tract.TrAct(stem)``.

Imported by ``benchmarks/overhead.py`` only where torch and torch_tract are installed
(``pip install torch==2.13.0 torch_tract``); the test suite never imports it. Runs on
CUDA where torch sees a GPU (each timed call ends with ``torch.cuda.synchronize()``),
else on the CPU: :data:`DEVICE` says which, and the benchmarks record it.
"""

from __future__ import annotations

import copy
import time

import torch
from torch import nn
from torch_tract import TrAct

DEVICE = torch.device('cuda' if torch.cuda.is_available() else 'cpu')


def device_name() -> str:
    """What the torch side ran on, for the benchmark records."""
    if DEVICE.type == 'cuda':
        return f'cuda: {torch.cuda.get_device_name(DEVICE)}'
    return f'cpu ({torch.get_num_threads()} threads)'


def _sync() -> None:
    if DEVICE.type == 'cuda':
        torch.cuda.synchronize(DEVICE)


class _Basic(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.short = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x):
        y = torch.relu(self.b1(self.c1(x)))
        return torch.relu(self.short(x) + self.b2(self.c2(y)))


class _Bottleneck(nn.Module):
    def __init__(self, cin, width, stride):
        super().__init__()
        cout = 4 * width
        self.body = nn.Sequential(
            nn.Conv2d(cin, width, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, stride, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        )
        self.short = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x):
        return torch.relu(self.short(x) + self.body(x))


class ResNet(nn.Module):
    def __init__(self, stages, bottleneck, classes, cifar_stem, width=64):
        super().__init__()
        if cifar_stem:
            self.stem = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        else:
            self.stem = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        layers = [nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
        cin = width
        for i, size in enumerate(stages):
            for j in range(size):
                stride = 2 if i > 0 and j == 0 else 1
                w = width * 2**i
                layers.append(_Bottleneck(cin, w, stride) if bottleneck else _Basic(cin, w, stride))
                cin = 4 * w if bottleneck else w
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(cin, classes)

    def forward(self, x):
        return self.head(self.body(self.stem(x)).mean(dim=(2, 3)))


class ViT(nn.Module):
    def __init__(self, patch, dim, depth, heads, classes, side):
        super().__init__()
        self.stem = nn.Conv2d(3, dim, patch, patch)
        self.pos = nn.Parameter(torch.zeros(1, (side // patch) ** 2, dim))
        layer = nn.TransformerEncoderLayer(
            dim, heads, 4 * dim, dropout=0.0, activation='gelu', batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.stem(x).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.norm(self.blocks(x)).mean(dim=1))


def build(name: str, side: int, classes: int) -> nn.Module:
    return {
        'resnet18_cifar': lambda: ResNet((2, 2, 2, 2), False, classes, True),
        'vit_tiny4_cifar': lambda: ViT(4, 192, 12, 3, classes, side),
        'resnet50_imagenet': lambda: ResNet((3, 4, 6, 3), True, classes, False),
        'vit_s16_imagenet': lambda: ViT(16, 384, 12, 6, classes, side),
    }[name]()


def bench(
    name: str, batch: int, pairs: int, warmup: int, side: int, classes: int
) -> tuple[list[float], list[float]]:
    """Step times (seconds) of the plain and the TrAct model, timed alternately."""
    torch.manual_seed(0)
    plain = build(name, side, classes).to(DEVICE)
    tract = copy.deepcopy(plain)
    tract.stem = TrAct(tract.stem, l=0.1)
    x = torch.randn(batch, 3, side, side, device=DEVICE)
    y = torch.randint(0, classes, (batch,), device=DEVICE)
    runs = {}
    for kind, model in (('plain', plain), ('tract', tract)):
        runs[kind] = (model, torch.optim.Adam(model.parameters(), 1e-3))

    def run(kind):
        model, opt = runs[kind]
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        _sync()
        return time.perf_counter() - start

    for _ in range(warmup):
        run('plain'), run('tract')
    times = {'plain': [], 'tract': []}
    for i in range(pairs):
        for kind in ('plain', 'tract') if i % 2 == 0 else ('tract', 'plain'):
            times[kind].append(run(kind))
    return times['plain'], times['tract']


def first_layer_calls(shape, kernel, strides, padding, features, lam):
    """``benchmarks/first_layer.py``'s torch calls: a ``Conv2d``'s forward and backward for
    a fixed output cotangent, plain and as ``TrAct(conv)``; ``shape`` is channels-last."""
    torch.manual_seed(0)
    batch, height, width, channels = shape
    x = torch.randn(batch, channels, height, width, device=DEVICE)
    padding = 0 if padding == 'VALID' else padding
    plain = nn.Conv2d(channels, features, kernel, strides, padding, bias=False).to(DEVICE)
    tract = TrAct(copy.deepcopy(plain), l=lam)
    with torch.no_grad():
        cotangent = torch.randn_like(plain(x))

    def step(layer):
        layer.weight.grad = None
        layer(x).backward(cotangent)
        _sync()

    return {'torch plain': (step, (plain,)), 'torch TrAct': (step, (tract,))}
