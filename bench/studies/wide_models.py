"""Benchmark models at real widths for 32x32 inputs, built from torch layers alone (no timm dependency).

- `resnet18_timm(width=64)`: timm's `resnet18` layout: 7x7 stride-2 stem conv (no bias), BatchNorm, ReLU, 3x3
  stride-2 max pool, BasicBlocks [2, 2, 2, 2] of widths w, 2w, 4w, 8w (the first block of stages 2-4 strided, 1x1
  conv + BN shortcut), convs without bias, global average pool, Linear. At 32x32 the stages see 8x8, 4x4, 2x2 and
  1x1 maps, so layer4's 3x3 convs have 4608-wide input factors (8w * 9) of rank at most batch x 1 position.
- `convnext_atto()`: ConvNeXt-atto-like: 4x4 stride-4 patchify stem + LayerNorm, stages of dims (40, 80, 160, 320)
  and depths (2, 2, 6, 2); block: depthwise 7x7 conv, LayerNorm (channels last), Linear 4x, GELU, Linear, layer
  scale, residual; LayerNorm + 2x2 stride-2 conv between stages; LayerNorm, Linear head.
- `vit_tiny()`: ViT-tiny-like: 4x4 patch conv (64 tokens at 32x32) + class token + positional embedding, 12
  pre-norm blocks of dim 192, 3 heads, MLP 768 (fop_train.models' Linear attention), LayerNorm, Linear head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from fop_train.models import TinyViT, _BasicBlock
from torch import nn


class ResNet18Timm(nn.Module):
    """timm's resnet18 layout (see the module docstring)."""

    def __init__(self, width: int = 64, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        stages, c_in = [], width
        for k, mult in enumerate((1, 2, 4, 8)):
            c_out = mult * width
            stages.append(nn.Sequential(_BasicBlock(c_in, c_out, 1 if k == 0 else 2), _BasicBlock(c_out, c_out, 1)))
            c_in = c_out
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class _ChannelsLastNorm(nn.LayerNorm):
    """LayerNorm over the channels of an (N, C, H, W) map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class _ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.dwconv(x).permute(0, 2, 3, 1))
        y = self.fc2(F.gelu(self.fc1(y))) * self.gamma
        return x + y.permute(0, 3, 1, 2)


class ConvNeXtAtto(nn.Module):
    """ConvNeXt-atto-like (see the module docstring)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, dims=(40, 80, 160, 320), depths=(2, 2, 6, 2)):
        super().__init__()
        layers = [nn.Conv2d(in_channels, dims[0], 4, stride=4), _ChannelsLastNorm(dims[0])]
        for k, (dim, depth) in enumerate(zip(dims, depths)):
            if k > 0:
                layers += [_ChannelsLastNorm(dims[k - 1]), nn.Conv2d(dims[k - 1], dim, 2, stride=2)]
            layers += [_ConvNeXtBlock(dim) for _ in range(depth)]
        self.features = nn.Sequential(*layers)
        self.norm = nn.LayerNorm(dims[-1])
        self.head = nn.Linear(dims[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.features(x).mean(dim=(2, 3))))


def resnet18_timm(width: int = 64, num_classes: int = 10) -> ResNet18Timm:
    return ResNet18Timm(width, num_classes)


def convnext_atto(num_classes: int = 10) -> ConvNeXtAtto:
    return ConvNeXtAtto(num_classes)


def vit_tiny(num_classes: int = 10, image_size: int = 32) -> TinyViT:
    return TinyViT(3, image_size, num_classes, width=192, depth=12, heads=3, patch=4, mlp_ratio=4)


WIDE_MODELS = {"resnet18-timm": resnet18_timm, "convnext-atto": convnext_atto, "vit-tiny": vit_tiny}
