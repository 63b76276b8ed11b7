"""Small image classifiers for `fop-train`, built from layers the Fisher optimizers precondition.

Every weight matrix is an `nn.Linear` or `nn.Conv2d` (attention uses explicit Linear projections, not
`nn.MultiheadAttention`, whose packed weight no hook sees), so K-FAC/FOP precondition all of them;
norm layers, the positional embedding and the class token take the plain update.

- `cnn`: conv(3x3)-ReLU-pool, conv(3x3)-ReLU-pool, Linear-ReLU-Linear.
- `mlp`: flatten, two hidden Linear-ReLU layers, Linear.
- `resnet`: a conv stem and three BasicBlocks (conv-BN-ReLU-conv-BN plus the shortcut), widths w, 2w, 4w,
  global average pooling, Linear.
- `transformer`: a ViT: Conv2d patch embedding, class token, learned positional embedding, pre-norm blocks
  (LayerNorm, multi-head self-attention, LayerNorm, GELU MLP), LayerNorm, Linear head.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MLP", "MODELS", "ResNet", "ResNetSmall", "SmallCNN", "TinyViT", "build_model", "resnet18"]


class SmallCNN(nn.Module):
    """conv(C->w)-ReLU-maxpool2, conv(w->2w)-ReLU-maxpool2, Linear(2w*(H/4)*(W/4) -> hidden)-ReLU-Linear."""

    def __init__(self, in_channels: int, image_size: int, num_classes: int, width: int = 16, hidden: int = 64):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        side = image_size // 4
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(2 * width * side * side, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class MLP(nn.Module):
    """Flatten, Linear-ReLU (hidden), Linear-ReLU (hidden/2), Linear."""

    def __init__(self, in_channels: int, image_size: int, num_classes: int, width: int = 256):
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_channels * image_size * image_size, width),
            nn.ReLU(),
            nn.Linear(width, width // 2),
            nn.ReLU(),
            nn.Linear(width // 2, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class _BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """Stem conv-BN-ReLU; per stage `(width multiple, blocks)` BasicBlocks, the first block of every stage after
    the first with stride 2; global average pooling, Linear."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 16,
                 stages: tuple[tuple[int, int], ...] = ((1, 1), (2, 1), (4, 1))):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU())
        blocks, c_in = [], width
        for stage, (mult, count) in enumerate(stages):
            for block in range(count):
                blocks.append(_BasicBlock(c_in, mult * width, 2 if (block == 0 and stage > 0) else 1))
                c_in = mult * width
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class ResNetSmall(ResNet):
    """Stem conv-BN-ReLU, BasicBlocks of widths w (stride 1), 2w (stride 2), 4w (stride 2), avgpool, Linear."""

    def __init__(self, in_channels: int, image_size: int, num_classes: int, width: int = 16):
        super().__init__(in_channels, num_classes, width, stages=((1, 1), (2, 1), (4, 1)))


def resnet18(width: int = 64, num_classes: int = 10, in_channels: int = 3) -> ResNet:
    """CIFAR ResNet-18: BasicBlocks [2, 2, 2, 2] of widths w, 2w, 4w, 8w (w = 64: the standard 11.2M parameters)."""
    return ResNet(in_channels, num_classes, width, stages=((1, 2), (2, 2), (4, 2), (8, 2)))


class _Attention(nn.Module):
    """Multi-head self-attention softmax(Q K^T / sqrt(d_head)) V with explicit Linear q/k/v and output projections
    (`causal`: each position attends to itself and earlier ones)."""

    def __init__(self, dim: int, heads: int, causal: bool = False):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.heads = heads
        self.causal = causal
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int, causal: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _Attention(dim, heads, causal)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """Patch embedding (Conv2d, kernel = stride = patch), class token + positional embedding, `depth`
    pre-norm transformer blocks, LayerNorm, Linear head on the class token."""

    def __init__(self, in_channels: int, image_size: int, num_classes: int, width: int = 64, depth: int = 2,
                 heads: int = 4, patch: int | None = None, mlp_ratio: int = 2):
        super().__init__()
        if patch is None:
            patch = max(1, image_size // 4)  # a 4x4 grid of patches: 8x8 digits -> 2x2, 28x28 MNIST -> 7x7
        if image_size % patch:
            raise ValueError(f"image size {image_size} is not divisible by the patch size {patch}")
        tokens = (image_size // patch) ** 2
        self.patch_embed = nn.Conv2d(in_channels, width, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens + 1, width) / math.sqrt(width))
        self.blocks = nn.Sequential(*[_Block(width, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


class EncoderViT(nn.Module):
    """A ViT on torch's own nn.TransformerEncoder (its nn.MultiheadAttention): patch Conv2d, a zero-initialized
    position embedding, `depth` post-norm encoder layers, LayerNorm, mean over tokens, Linear head."""

    def __init__(self, in_channels: int, image_size: int, num_classes: int, width: int = 16, depth: int = 2,
                 heads: int = 2, patch: int = 4, ffn: int = 32):
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image size {image_size} is not divisible by the patch size {patch}")
        self.patch = nn.Conv2d(in_channels, width, patch, stride=patch)
        self.pos = nn.Parameter(torch.zeros(1, (image_size // patch) ** 2, width))
        block = nn.TransformerEncoderLayer(width, heads, dim_feedforward=ffn, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(block, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.norm(self.encoder(t)).mean(1))


class TinyGPT(nn.Module):
    """A decoder-only language model: token embedding + learned positional embedding, `depth` pre-norm causal
    transformer blocks, LayerNorm, a Linear head (untied from the embedding) giving (N, T, vocab) logits."""

    def __init__(self, context: int, vocab: int, width: int = 64, depth: int = 2, heads: int = 4, mlp_ratio: int = 4):
        super().__init__()
        self.tok_embed = nn.Embedding(vocab, width)
        self.pos_embed = nn.Parameter(torch.randn(1, context, width) / math.sqrt(width))
        self.blocks = nn.Sequential(*[_Block(width, heads, mlp_ratio, causal=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.tok_embed(tokens) + self.pos_embed[:, : tokens.shape[1]]
        return self.head(self.norm(self.blocks(x)))


MODELS = {"cnn": SmallCNN, "mlp": MLP, "resnet": ResNetSmall, "transformer": TinyViT, "encoder": EncoderViT,
          "gpt": TinyGPT}
SEQUENCE_MODELS = ("gpt",)  # models of token windows (N, T): the `text` dataset


def build_model(name: str, image_shape: tuple[int, ...], num_classes: int, width: int | None = None) -> nn.Module:
    """Build model `name` for images of shape (C, H, W) with H == W (or, for a sequence model, windows of shape
    (T,) over `num_classes` tokens); `width` overrides its default width."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(MODELS)}")
    kwargs = {} if width is None else {"width": width}
    if (name in SEQUENCE_MODELS) != (len(image_shape) == 1):
        raise ValueError(f"model {name!r} does not fit inputs of shape {tuple(image_shape)}: "
                         f"{', '.join(SEQUENCE_MODELS)} take the 'text' dataset, the others images")
    if name in SEQUENCE_MODELS:
        return MODELS[name](image_shape[0], num_classes, **kwargs)
    c, h, w = image_shape
    if h != w:
        raise ValueError(f"models expect square images, got {h}x{w}")
    kwargs = {} if width is None else {"width": width}
    return MODELS[name](c, h, num_classes, **kwargs)
