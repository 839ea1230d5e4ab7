"""Vision models whose first layer is a TrAct layer (tract_jax.Conv).

Applied without ``mutable=['tract']`` each model is exactly its plain Flax version (the
TrAct layers record nothing then), so one definition serves the baseline and TrAct runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import flax.linen as nn
import jax.numpy as jnp

import tract_jax


def _batch_norm(train: bool):
    """BatchNorm in training (batch statistics) or evaluation (running averages) mode."""
    return partial(nn.BatchNorm, use_running_average=not train, momentum=0.9)


def _residual(x, y, strides: int, norm):
    """``relu(x + y)``, projecting ``x`` by a normalized 1x1 conv where shapes differ."""
    if x.shape != y.shape:
        x = norm()(nn.Conv(y.shape[-1], (1, 1), strides, use_bias=False)(x))
    return nn.relu(x + y)


class SmallCNN(nn.Module):
    """Two conv blocks and a linear head; for 8x8 to 32x32 images.

    ``stem_norm=False`` drops the BatchNorm right after the stem (the stem gets a bias
    instead), so the stem's scale reaches the next layer as it is.
    """

    num_classes: int = 10
    width: int = 32
    stem_norm: bool = True

    @nn.compact
    def __call__(self, x, train: bool = False):
        norm = _batch_norm(train)
        x = tract_jax.Conv(self.width, (3, 3), use_bias=not self.stem_norm, name='stem')(x)
        x = nn.relu(norm()(x) if self.stem_norm else x)
        x = nn.max_pool(x, (2, 2), (2, 2))
        x = nn.Conv(2 * self.width, (3, 3), use_bias=False)(x)
        x = nn.relu(norm()(x))
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes)(x)


class _BasicBlock(nn.Module):
    features: int
    strides: int = 1

    @nn.compact
    def __call__(self, x, train: bool):
        norm = _batch_norm(train)
        y = nn.Conv(self.features, (3, 3), self.strides, use_bias=False)(x)
        y = nn.relu(norm()(y))
        y = nn.Conv(self.features, (3, 3), use_bias=False)(y)
        y = norm(scale_init=nn.initializers.zeros)(y)
        return _residual(x, y, self.strides, norm)


class _Bottleneck(nn.Module):
    features: int
    strides: int = 1

    @nn.compact
    def __call__(self, x, train: bool):
        norm = _batch_norm(train)
        y = nn.relu(norm()(nn.Conv(self.features, (1, 1), use_bias=False)(x)))
        y = nn.Conv(self.features, (3, 3), self.strides, use_bias=False)(y)
        y = nn.relu(norm()(y))
        y = nn.Conv(4 * self.features, (1, 1), use_bias=False)(y)
        y = norm(scale_init=nn.initializers.zeros)(y)
        return _residual(x, y, self.strides, norm)


class ResNet(nn.Module):
    """ResNet; ``cifar_stem`` gives the paper's CIFAR variant (3x3/1 stem conv).

    As in the paper's CIFAR-10 setup the 3x3/2 max-pool after the stem is kept.
    """

    stage_sizes: Sequence[int]
    bottleneck: bool = False
    num_classes: int = 10
    cifar_stem: bool = True
    width: int = 64

    @nn.compact
    def __call__(self, x, train: bool = False):
        norm = _batch_norm(train)
        if self.cifar_stem:
            x = tract_jax.Conv(self.width, (3, 3), 1, padding=1, use_bias=False, name='stem')(x)
        else:
            x = tract_jax.Conv(self.width, (7, 7), 2, padding=3, use_bias=False, name='stem')(x)
        x = nn.relu(norm()(x))
        x = nn.max_pool(x, (3, 3), (2, 2), padding='SAME')
        block = _Bottleneck if self.bottleneck else _BasicBlock
        for i, size in enumerate(self.stage_sizes):
            for j in range(size):
                strides = 2 if i > 0 and j == 0 else 1
                x = block(self.width * 2**i, strides)(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes)(x)


def resnet18(num_classes: int = 10, cifar_stem: bool = True) -> ResNet:
    return ResNet((2, 2, 2, 2), num_classes=num_classes, cifar_stem=cifar_stem)


def resnet50(num_classes: int = 1000) -> ResNet:
    return ResNet((3, 4, 6, 3), bottleneck=True, num_classes=num_classes, cifar_stem=False)


class _EncoderBlock(nn.Module):
    heads: int
    mlp_dim: int

    @nn.compact
    def __call__(self, x):
        y = nn.LayerNorm()(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads)(y, y)
        y = nn.LayerNorm()(x)
        y = nn.Dense(x.shape[-1])(nn.gelu(nn.Dense(self.mlp_dim)(y)))
        return x + y


class ViT(nn.Module):
    """Vision transformer; the patch embedding is a TrAct conv of stride = patch size."""

    patch: int
    dim: int
    depth: int
    heads: int
    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool = False):
        del train
        p = self.patch
        x = tract_jax.Conv(self.dim, (p, p), p, padding='VALID', name='stem')(x)
        x = x.reshape(x.shape[0], -1, self.dim)
        pos = self.param('pos_embedding', nn.initializers.normal(0.02), (1, *x.shape[1:]))
        x = x + pos
        for _ in range(self.depth):
            x = _EncoderBlock(self.heads, 4 * self.dim)(x)
        x = nn.LayerNorm()(x).mean(axis=1)
        return nn.Dense(self.num_classes)(x)


def vit_tiny(patch: int = 4, num_classes: int = 10) -> ViT:
    return ViT(patch=patch, dim=192, depth=12, heads=3, num_classes=num_classes)


def vit_mini(patch: int = 7, num_classes: int = 10) -> ViT:
    """A 4-block, width-64 ViT: small enough to train on Fashion-MNIST on a CPU."""
    return ViT(patch=patch, dim=64, depth=4, heads=4, num_classes=num_classes)


def vit_cifar(patch: int = 8, num_classes: int = 10) -> ViT:
    """The paper's CIFAR-10 ViT (its Figure 4): 7 blocks, width 384, 12 heads, patch 8."""
    return ViT(patch=patch, dim=384, depth=7, heads=12, num_classes=num_classes)


def vit_small(patch: int = 16, num_classes: int = 1000) -> ViT:
    return ViT(patch=patch, dim=384, depth=12, heads=6, num_classes=num_classes)


def vit_base(patch: int = 16, num_classes: int = 1000) -> ViT:
    return ViT(patch=patch, dim=768, depth=12, heads=12, num_classes=num_classes)


BUILDERS = {
    'cnn': lambda patch, classes: SmallCNN(classes),
    'cnn_nonorm': lambda patch, classes: SmallCNN(classes, stem_norm=False),
    'resnet18': lambda patch, classes: resnet18(classes),
    'vit': vit_mini,  # the study's ViT
    'vit_tiny': vit_tiny,
    'vit_cifar': vit_cifar,
}


def build(name: str, num_classes: int, patch: int) -> nn.Module:
    """The example model ``name`` (a key of ``BUILDERS``); ``patch`` is used by the ViTs."""
    if name not in BUILDERS:
        raise ValueError(f'unknown model {name!r}; choose from {", ".join(BUILDERS)}')
    return BUILDERS[name](patch, num_classes)
