"""Image classifiers by name, as plain ``nn.Module``s (the timm way).

Every model takes ``(N, C, H, W)`` float images in ``[0, 1]`` of any spatial size (adaptive
pooling before the head) and returns ``(N, num_classes)`` logits. The registry holds the
default key (``convnet``), a CIFAR ResNet-18, a hacker panel of other families, and the
small networks used as surrogates for the common feature space.

Example:
    >>> import torch
    >>> from uge_hf.models import create_model, list_models
    >>> "convnet" in list_models()
    True
    >>> create_model("mobilenet-small", num_classes=10)(torch.rand(2, 3, 40, 24)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}

# CIFAR-10 channel statistics: every model normalizes its own input, so callers and the
# perturbation always work in [0, 1] pixel space where epsilon is defined.
_MEAN = (0.4914, 0.4822, 0.4465)
_STD = (0.2470, 0.2435, 0.2616)


def register_model(name: str):
    """Decorator adding a model factory ``fn(num_classes, in_channels) -> nn.Module``."""

    def wrap(fn):
        _REGISTRY[name] = fn
        return fn

    return wrap


def list_models() -> list[str]:
    """Names of all registered architectures, sorted."""
    return sorted(_REGISTRY)


def create_model(name: str, num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """Build an architecture by name, randomly initialized from torch's current RNG state."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown architecture {name!r}; available: {', '.join(list_models())}")
    return _REGISTRY[name](num_classes=num_classes, in_channels=in_channels)


class Normalize(nn.Module):
    def __init__(self, in_channels: int):
        super().__init__()
        mean = torch.tensor(_MEAN[:in_channels] if in_channels == 3 else [0.5] * in_channels)
        std = torch.tensor(_STD[:in_channels] if in_channels == 3 else [0.25] * in_channels)
        self.register_buffer("mean", mean.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", std.view(1, -1, 1, 1), persistent=False)

    def forward(self, x):
        return (x - self.mean) / self.std


def conv_bn(cin: int, cout: int, stride: int = 1, act: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class ConvNet(nn.Module):
    """The dataset-condensation ConvNet: [conv3x3, instance norm, ReLU, avgpool] x depth."""

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 64, depth: int = 3):
        super().__init__()
        layers, cin = [Normalize(in_channels)], in_channels
        for _ in range(depth):
            layers += [nn.Conv2d(cin, width, 3, padding=1), nn.GroupNorm(width, width), nn.ReLU(inplace=True), nn.AvgPool2d(2)]
            cin = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width * 4 * 4, num_classes)

    def forward(self, x):
        x = F.adaptive_avg_pool2d(self.features(x), 4)
        return self.classifier(x.flatten(1))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(conv_bn(cin, cout, stride), conv_bn(cout, cout, act=False))
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return F.relu(self.body(x) + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet: 3x3 stem, no max-pool, BasicBlock stages."""

    def __init__(self, num_classes: int, in_channels: int, blocks: tuple[int, ...], widths: tuple[int, ...]):
        super().__init__()
        layers, cin = [Normalize(in_channels), conv_bn(in_channels, widths[0])], widths[0]
        for i, (n, w) in enumerate(zip(blocks, widths)):
            for j in range(n):
                layers.append(BasicBlock(cin, w, 2 if (i > 0 and j == 0) else 1))
                cin = w
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.classifier(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


class VGG(nn.Module):
    """VGG-style plain stack; ``cfg`` lists widths, ``"M"`` a 2x2 max-pool."""

    def __init__(self, num_classes: int, in_channels: int, cfg: tuple):
        super().__init__()
        layers, cin = [Normalize(in_channels)], in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers.append(conv_bn(cin, v))
                cin = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.classifier(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.body = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout),
        )

    def forward(self, x):
        return x + self.body(x) if self.use_res else self.body(x)


class MobileNetV2(nn.Module):
    """MobileNetV2: inverted residuals with depthwise convolutions; narrow by default."""

    def __init__(self, num_classes: int, in_channels: int, stages=((1, 16, 1, 1), (4, 24, 2, 2), (4, 32, 2, 2), (4, 64, 2, 2)),
                 head: int = 256):
        super().__init__()
        layers, cin = [Normalize(in_channels), conv_bn(in_channels, 32)], 32
        for expand, cout, n, stride in stages:
            for j in range(n):
                layers.append(InvertedResidual(cin, cout, stride if j == 0 else 1, expand))
                cin = cout
        layers += [nn.Conv2d(cin, head, 1, bias=False), nn.BatchNorm2d(head), nn.ReLU6(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(head, num_classes)

    def forward(self, x):
        return self.classifier(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


class DenseNet(nn.Module):
    """A 3-block CIFAR DenseNet: each layer sees the concatenation of all earlier ones in its block."""

    def __init__(self, num_classes: int, in_channels: int, growth: int = 16, layers_per_block: int = 4):
        super().__init__()
        # The stem halves the resolution: dense blocks at full CIFAR size cost 10x a ResNet on a CPU.
        self.stem = nn.Sequential(Normalize(in_channels), nn.Conv2d(in_channels, 2 * growth, 3, padding=1, bias=False), nn.AvgPool2d(2))
        blocks, c = [], 2 * growth
        for b in range(3):
            dense = nn.ModuleList()
            for _ in range(layers_per_block):
                dense.append(nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(inplace=True), nn.Conv2d(c, growth, 3, padding=1, bias=False)))
                c += growth
            blocks.append(dense)
            if b < 2:
                blocks.append(nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(inplace=True), nn.Conv2d(c, c // 2, 1, bias=False), nn.AvgPool2d(2)))
                c //= 2
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(inplace=True))
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            if isinstance(block, nn.ModuleList):
                for layer in block:
                    x = torch.cat([x, layer(x)], 1)
            else:
                x = block(x)
        return self.classifier(F.adaptive_avg_pool2d(self.head(x), 1).flatten(1))


class MixerBlock(nn.Module):
    def __init__(self, tokens: int, dim: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.token_mlp = nn.Sequential(nn.Linear(tokens, tokens * 2), nn.GELU(), nn.Linear(tokens * 2, tokens))
        self.channel_mlp = nn.Sequential(nn.Linear(dim, dim * 2), nn.GELU(), nn.Linear(dim * 2, dim))

    def forward(self, x):
        x = x + self.token_mlp(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channel_mlp(self.norm2(x))


class MLPMixer(nn.Module):
    """MLP-Mixer: no convolution past the patch embedding. Any input size is pooled to a
    fixed ``grid x grid`` token layout, so the token-mixing MLPs keep their shape."""

    def __init__(self, num_classes: int, in_channels: int, dim: int = 128, depth: int = 4, patch: int = 4, grid: int = 8):
        super().__init__()
        self.grid = grid
        self.embed = nn.Sequential(Normalize(in_channels), nn.Conv2d(in_channels, dim, patch, patch))
        self.blocks = nn.Sequential(*[MixerBlock(grid * grid, dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = F.adaptive_avg_pool2d(self.embed(x), self.grid).flatten(2).transpose(1, 2)
        return self.classifier(self.norm(self.blocks(x)).mean(1))


class ViT(nn.Module):
    """A small Vision Transformer with learned position embeddings on a pooled token grid."""

    def __init__(self, num_classes: int, in_channels: int, dim: int = 128, depth: int = 4, heads: int = 4, patch: int = 4, grid: int = 8):
        super().__init__()
        self.grid = grid
        self.embed = nn.Sequential(Normalize(in_channels), nn.Conv2d(in_channels, dim, patch, patch))
        self.pos = nn.Parameter(torch.randn(1, grid * grid, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, dim * 2, dropout=0.0, activation="gelu", batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = F.adaptive_avg_pool2d(self.embed(x), self.grid).flatten(2).transpose(1, 2) + self.pos
        return self.classifier(self.norm(self.encoder(x)).mean(1))


register_model("convnet")(lambda num_classes, in_channels: ConvNet(num_classes, in_channels))
register_model("resnet18")(lambda num_classes, in_channels: ResNet(num_classes, in_channels, (2, 2, 2, 2), (64, 128, 256, 512)))
register_model("resnet-small")(lambda num_classes, in_channels: ResNet(num_classes, in_channels, (1, 1, 1), (32, 64, 128)))
register_model("vgg-small")(lambda num_classes, in_channels: VGG(num_classes, in_channels, (32, "M", 64, "M", 128, 128, "M", 256)))
register_model("mobilenet-small")(lambda num_classes, in_channels: MobileNetV2(num_classes, in_channels))
register_model("densenet-small")(lambda num_classes, in_channels: DenseNet(num_classes, in_channels))
register_model("mixer-small")(lambda num_classes, in_channels: MLPMixer(num_classes, in_channels))
register_model("vit-tiny")(lambda num_classes, in_channels: ViT(num_classes, in_channels))
# Full-size hackers for paper-scale runs on a GPU (bench/paper_scale.py), in their CIFAR forms.
register_model("vgg16")(lambda num_classes, in_channels: VGG(num_classes, in_channels, (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)))
register_model("mobilenetv2")(lambda num_classes, in_channels: MobileNetV2(num_classes, in_channels, (
    (1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)), head=1280))
# DenseNet-40 (k = 12, three blocks of 12 layers; Huang et al. 2017), with this class's stem
# (2x downsampling) and halving transitions.
register_model("densenet40")(lambda num_classes, in_channels: DenseNet(num_classes, in_channels, growth=12, layers_per_block=12))
# Surrogates for the common feature space: families that differ from the key and from the
# default hacker panel, so the benchmark measures transfer to architectures never seen.
register_model("resnet-tiny")(lambda num_classes, in_channels: ResNet(num_classes, in_channels, (1, 1), (32, 64)))
register_model("vgg-tiny")(lambda num_classes, in_channels: VGG(num_classes, in_channels, (32, "M", 64, "M", 128)))
register_model("mixer-tiny")(lambda num_classes, in_channels: MLPMixer(num_classes, in_channels, dim=64, depth=2))
register_model("vit-micro")(lambda num_classes, in_channels: ViT(num_classes, in_channels, dim=64, depth=2, heads=2))
register_model("densenet-tiny")(lambda num_classes, in_channels: DenseNet(num_classes, in_channels, growth=12, layers_per_block=2))

DEFAULT_HACKERS = ("resnet-small", "vgg-small", "mobilenet-small", "densenet-small", "mixer-small")
DEFAULT_SURROGATES = ("resnet-tiny", "vgg-tiny", "mixer-tiny")
