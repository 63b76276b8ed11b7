"""Seven small models no default was tuned on, each fitting one fixed synthetic batch for 60 full-batch steps with
only lr set: does an optimizer crash, and does the loss fall? Loss at step 0 -> the last step, per optimizer.

Models: a GRU tagger (embedding + GRU + Linear), a conv autoencoder with a ConvTranspose2d decoder and GroupNorm
(MSE), dilated and grouped Conv1d with BatchNorm1d, a MobileNet-like block (depthwise conv, squeeze-excitation), a
seq-first nn.TransformerEncoder with a head tied to the embedding, transformers' GPT-2 from a tiny config (skipped
when transformers is absent), an MLP-mixer-like net (token- and channel-mixing Linears).

    .venv/bin/python bench/studies/fixed_batch_models.py --optimizers kfac,kfac-bf16,fop,fop-bf16
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings

import torch
import torch.nn.functional as F
from fop import FOP, FROG, KFAC, KFROG, AdaFisher, AdaFisherW
from torch import nn


class GRUTagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.gru, self.head = nn.Embedding(50, 32), nn.GRU(32, 32, batch_first=True), nn.Linear(32, 5)

    def forward(self, x):
        return self.head(self.gru(self.emb(x))[0][:, -1])


class TransposedAutoencoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc, self.norm = nn.Conv2d(1, 16, 3, 2, 1), nn.GroupNorm(4, 16)
        self.dec = nn.ConvTranspose2d(16, 1, 4, 2, 1)

    def forward(self, x):
        return self.dec(F.relu(self.norm(self.enc(x))))


class DilatedGrouped1d(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(3, 16, 5, dilation=2, padding=4)
        self.c2 = nn.Conv1d(16, 16, 3, groups=4, padding=1, bias=False)
        self.bn, self.fc = nn.BatchNorm1d(16), nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(F.gelu(self.bn(self.c2(F.gelu(self.c1(x))))).mean(-1))


class MobileLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.Hardswish())
        self.block = nn.Sequential(nn.Conv2d(16, 16, 3, 1, 1, groups=16, bias=False), nn.BatchNorm2d(16), nn.ReLU6(),
                                   nn.Conv2d(16, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6())
        self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(32, 8, 1), nn.ReLU(), nn.Conv2d(8, 32, 1),
                                nn.Sigmoid())
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        h = self.block(self.stem(x))
        return self.head((h * self.se(h)).mean((2, 3)))


class SeqFirstTransformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.pos = nn.Embedding(40, 32), nn.Parameter(torch.zeros(12, 32))
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=False, norm_first=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # nested-tensor fast path note for norm_first
            self.enc = nn.TransformerEncoder(layer, 2)
        self.head = nn.Linear(32, 40)
        self.head.weight = self.emb.weight

    def forward(self, x):
        return self.head(self.enc((self.emb(x) + self.pos).transpose(0, 1)).transpose(0, 1))


class MixerLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.patch, self.tokens = nn.Linear(48, 32), nn.Linear(16, 16)
        self.channels = nn.Sequential(nn.LayerNorm(32), nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        h = self.patch(x)
        h = h + self.tokens(h.transpose(1, 2)).transpose(1, 2)
        return self.head((h + self.channels(h)).mean(1))


class TinyGPT2(nn.Module):
    def __init__(self):
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        self.lm = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=4,
                                             resid_pdrop=0, embd_pdrop=0, attn_pdrop=0))

    def forward(self, x):
        return self.lm(x).logits


def _tokens(g):
    x = torch.randint(0, 40, (32, 12), generator=g)
    return x, torch.roll(x, 1, 1), "lm"


def _digit_sums(g):
    x = torch.randn(64, 3, 32, generator=g)
    return x, (x[:, 0, :8].sum(1) > 0).long() + 2 * (x[:, 1, :8].sum(1) > 0).long(), "ce"


def _brightness(g):
    x = torch.randn(64, 3, 16, 16, generator=g)
    return x, (x[:, 0].mean((1, 2)) * 8).long().clamp(-5, 4) + 5, "ce"


def _mixer_data(g):
    x = torch.randn(64, 16, 48, generator=g)
    return x, (x[:, :, 0].sum(1) > 0).long() * 3 + (x[:, 0, :4].sum(1) > 0).long(), "ce"


def _images(g):
    x = torch.rand(64, 1, 16, 16, generator=g)
    return x, x, "mse"


def _first_token(g):
    x = torch.randint(0, 50, (64, 10), generator=g)
    return x, x[:, 0] % 5, "ce"


MODELS = {"gru": (GRUTagger, _first_token), "conv-transpose": (TransposedAutoencoder, _images),
          "dilated-1d": (DilatedGrouped1d, _digit_sums), "mobile": (MobileLike, _brightness),
          "seq-first-transformer": (SeqFirstTransformer, _tokens), "gpt2": (TinyGPT2, _tokens),
          "mixer": (MixerLike, _mixer_data)}
BF16 = dict(product_dtype=torch.bfloat16)
OPTIMIZERS = {"sgd": lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9),
              "adamw": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3),
              "kfac": lambda m: KFAC(m, lr=0.1), "fop": lambda m: FOP(m, lr=0.1),
              "kfac-bf16": lambda m: KFAC(m, lr=0.1, **BF16), "fop-bf16": lambda m: FOP(m, lr=0.1, **BF16),
              "frog": lambda m: FROG(m, lr=0.1), "kfrog": lambda m: KFROG(m, lr=0.1),
              "adafisher": lambda m: AdaFisher(m, lr=1e-3), "adafisherw": lambda m: AdaFisherW(m, lr=1e-3)}


def loss_of(out, y, kind: str) -> torch.Tensor:
    if kind == "mse":
        return F.mse_loss(out, y)
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def losses(model_name: str, opt_name: str, steps: int) -> list[float]:
    """The full-batch loss at every step of `opt_name` fitting `model_name`'s fixed batch."""
    build, data = MODELS[model_name]
    torch.manual_seed(1)
    model = build()
    x, y, kind = data(torch.Generator().manual_seed(2))
    opt = OPTIMIZERS[opt_name](model)
    out = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_of(model(x), y, kind)
        loss.backward()
        opt.step()
        out.append(loss.item())
    return out


def trained(curve: list[float]) -> bool:
    """Finite at the end and, at its best over the last five steps, below half the start (a transient spike in the
    last steps passes: K-FROG's on the autoencoder at constant lr 0.1, bench/RESULTS.md "K-FROG")."""
    return math.isfinite(curve[-1]) and min(curve[-5:]) < 0.5 * curve[0]


def cell(model_name: str, opt_name: str, steps: int) -> str:
    """'first -> last' (a trailing '!' when not `trained`), or the error."""
    try:
        curve = losses(model_name, opt_name, steps)
    except Exception as err:  # noqa: BLE001 - the study reports every failure as a cell
        return f"error {type(err).__name__}: {str(err)[:80]}"
    return f"{curve[0]:.3g} -> {curve[-1]:.3g}{'' if trained(curve) else ' !'}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--optimizers", default="sgd,adamw,kfac,fop,frog,kfrog,adafisher,adafisherw")
    p.add_argument("--steps", type=int, default=60)
    args = p.parse_args(argv)
    models, opts = args.models.split(","), args.optimizers.split(",")
    unknown = [m for m in models if m not in MODELS] + [o for o in opts if o not in OPTIMIZERS]
    if unknown:
        p.error(f"unknown {unknown}; models: {', '.join(MODELS)}; optimizers: {', '.join(OPTIMIZERS)}")
    print("| model | " + " | ".join(opts) + " |\n| --- |" + " --- |" * len(opts))
    for m in models:
        if m == "gpt2":
            try:
                import transformers  # noqa: F401
            except ImportError:
                print(f"| {m} | " + " | ".join("transformers not installed" for _ in opts) + " |")
                continue
        print(f"| {m} | " + " | ".join(cell(m, o, args.steps) for o in opts) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
