"""The defaults on models no default was chosen on: every optimizer with only `lr` set, on six small models whose
layers, losses and normalizations differ from the robustness matrix's (bench/studies/robustness.py), a fixed budget
of steps, the final training loss over the whole training set.

    python bench/studies/model_zoo.py --out out/model-zoo
    python bench/studies/model_zoo.py --models lstm,autoencoder --optimizers frog,kfrog --lrs 0.1,1.0

Models (sklearn's digits, 8 x 8, standardized; the regression task is synthetic):
  - mobilenet: conv -> BN -> ReLU6, a depthwise 3x3 conv (groups = channels), a pointwise conv, global pooling
  - autoencoder: two strided convs, two ConvTranspose2d (not preconditioned by any optimizer here), MSE on the image
  - lstm: an LSTM reading the image's 8 rows (not preconditioned) and a Linear head
  - groupnorm: two convs with GroupNorm and SiLU, a Linear head on 2048 features
  - deep-tanh: a 10-layer tanh MLP of width 64
  - regression: a GELU MLP fitting y = 3 sin(0.3 x W) + 5 on 16 inputs, MSE (a loss far from 1 at the start)
  - bert: transformers' BertForSequenceClassification from a tiny config (2 layers of width 64, random weights) on a
    synthetic order task: 16 tokens, is token 5 before token 7 (left out when transformers does not import)
  - llama, t5, hf-vit, distilbert (added 2026-12-04, after the defaults were set): transformers' Llama (RMSNorm, SwiGLU,
    rotary, grouped key/value heads, tied lm_head) on gpt2's bytes; T5 (encoder-decoder, relative position bias)
    copying 12 random tokens through its decoder; ViT on the digits; DistilBERT on bert's order task
  - gpt2: transformers' GPT2LMHeadModel from a tiny config (2 layers of width 64, random weights, its Conv1D
    projections, lm_head tied to the token embedding), next-byte prediction on the source text of Python's own
    `textwrap` module (616 windows of 32 bytes; left out when transformers does not import)

Each cell is one constant-lr run (no warm-up, no schedule) of --steps steps at batch --batch, the model initialized
from --seed (0), with the optimizer built from the library's defaults: fop's optimizers get the model and `lr` only
(and K-FAC/FOP the intervals with --interval); SGD momentum 0.9 (as fop-train builds it); AdamW torch's defaults.
A cell shows the final training loss, and "peak" the largest batch
loss after the first third of the run (a late spike shows there, and a non-finite loss ends the run as "diverged").
Writes `model_zoo.md` and `model_zoo.json` to --out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
import warnings

import fop
import torch
from fop_train.data import load_digits
from torch import nn
from torch.nn import functional as F

OPTIMIZERS = {  # name: (builder, default lrs)
    "sgd": (lambda model, lr: torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9), "0.01,0.1"),
    "adamw": (lambda model, lr: torch.optim.AdamW(model.parameters(), lr=lr), "0.001,0.01"),
    "kfac": (lambda model, lr, **curvature: fop.KFAC(model, lr=lr, **curvature), "0.01,0.1,1.0"),
    "fop": (lambda model, lr, **curvature: fop.FOP(model, lr=lr, **curvature), "0.01,0.1,1.0"),
    "adafisher": (lambda model, lr: fop.AdaFisher(model, lr=lr), "0.01,0.1,1.0"),
    "frog": (lambda model, lr: fop.FROG(model, lr=lr), "0.01,0.1,1.0"),
    "kfrog": (lambda model, lr: fop.KFROG(model, lr=lr), "0.01,0.1,1.0"),
}


class MobileNetBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU6(),
            nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.ReLU6(),
            nn.Conv2d(16, 32, 1), nn.BatchNorm2d(32), nn.ReLU6(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(32, 10))

    def forward(self, x):
        return self.body(x)


class ConvAutoencoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.encode = nn.Sequential(nn.Conv2d(1, 16, 3, stride=2, padding=1), nn.ReLU(),
                                    nn.Conv2d(16, 8, 3, stride=2, padding=1))
        self.decode = nn.Sequential(nn.ConvTranspose2d(8, 16, 2, stride=2), nn.ReLU(),
                                    nn.ConvTranspose2d(16, 1, 2, stride=2))

    def forward(self, x):
        return self.decode(self.encode(x))


class RowLSTM(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(8, 32, batch_first=True)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        h, _ = self.lstm(x.squeeze(1))
        return self.head(h[:, -1])


def groupnorm_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.GroupNorm(4, 32), nn.SiLU(),
                         nn.Conv2d(32, 32, 3, padding=1), nn.GroupNorm(4, 32), nn.SiLU(), nn.Flatten(),
                         nn.Linear(32 * 64, 10))


def deep_tanh_mlp() -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten(), nn.Linear(64, 64), nn.Tanh()]
    for _ in range(8):
        layers += [nn.Linear(64, 64), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(64, 10))


def regression_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 4))


class TinyBert(nn.Module):
    """transformers' BERT classifier (2 layers, width 64, 2 heads, random weights) returning the logits."""

    def __init__(self, vocab: int):
        super().__init__()
        from transformers import BertConfig, BertForSequenceClassification

        config = BertConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=128, max_position_embeddings=32, num_labels=2, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0)
        self.bert = BertForSequenceClassification(config)

    def forward(self, ids):
        return self.bert(input_ids=ids).logits


class TinyGPT2(nn.Module):
    """transformers' GPT-2 language model (2 layers, width 64, 2 heads, byte vocabulary, random weights) returning
    the logits."""

    def __init__(self, length: int = 32):
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(vocab_size=256, n_positions=length, n_embd=64, n_layer=2, n_head=2, resid_pdrop=0.0,
                            embd_pdrop=0.0, attn_pdrop=0.0)
        self.gpt = GPT2LMHeadModel(config)

    def forward(self, ids):
        return self.gpt(input_ids=ids).logits


class TinyLlama(nn.Module):
    """transformers' Llama language model (2 layers, width 64, 4 heads over 2 key/value heads, RMSNorm, SwiGLU MLP,
    rotary positions, bias-free projections, lm_head tied to the token embedding, random weights): the logits."""

    def __init__(self):
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                             tie_word_embeddings=True)
        self.llama = LlamaForCausalLM(config)

    def forward(self, ids):
        return self.llama(input_ids=ids).logits


class TinyT5(nn.Module):
    """transformers' T5 encoder-decoder (2 + 2 layers, width 64, 4 heads, relative position buckets, RMS layer norms,
    random weights, dropout off), the decoder fed the targets shifted right: the logits (a copy task)."""

    def __init__(self):
        super().__init__()
        from transformers import T5Config, T5ForConditionalGeneration

        config = T5Config(vocab_size=32, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, dropout_rate=0.0,
                          decoder_start_token_id=0)
        self.t5 = T5ForConditionalGeneration(config)

    def forward(self, ids):
        return self.t5(input_ids=ids, decoder_input_ids=self.t5._shift_right(ids)).logits


class TinyHFViT(nn.Module):
    """transformers' ViT classifier on the 8 x 8 digits (2 x 2 patches, 2 layers, width 64, 4 heads, a class token,
    random weights): the logits."""

    def __init__(self):
        super().__init__()
        from transformers import ViTConfig, ViTForImageClassification

        config = ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=64, num_hidden_layers=2,
                           num_attention_heads=4, intermediate_size=128, num_labels=10)
        self.vit = ViTForImageClassification(config)

    def forward(self, x):
        return self.vit(pixel_values=x).logits


class TinyDistilBert(nn.Module):
    """transformers' DistilBERT classifier (2 layers, width 64, 4 heads, random weights, dropout off): the logits."""

    def __init__(self, vocab: int):
        super().__init__()
        from transformers import DistilBertConfig, DistilBertForSequenceClassification

        config = DistilBertConfig(vocab_size=vocab, dim=64, hidden_dim=128, n_layers=2, n_heads=4, num_labels=2,
                                  max_position_embeddings=32, dropout=0.0, attention_dropout=0.0,
                                  seq_classif_dropout=0.0)
        self.bert = DistilBertForSequenceClassification(config)

    def forward(self, ids):
        return self.bert(input_ids=ids).logits


def byte_windows(length: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Consecutive windows of the bytes of textwrap's source (Python's standard library, so every install has it)
    and the same windows shifted by one byte: next-byte targets."""
    import inspect
    import textwrap

    data = torch.tensor(list(inspect.getsource(textwrap).encode()), dtype=torch.long)
    n = (len(data) - 1) // length
    return data[: n * length].reshape(n, length), data[1: n * length + 1].reshape(n, length)


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The mean cross entropy over every token of N x T x V logits."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def order_task(n: int = 1536, length: int = 16, vocab: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Token sequences over ids 8..vocab-1 with one 5 and one 7 at random places; label 1 when the 5 comes first."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(8, vocab, (n, length), generator=gen)
    places = torch.rand(n, length, generator=gen).argsort(dim=1)[:, :2]
    rows = torch.arange(n)
    ids[rows, places[:, 0]], ids[rows, places[:, 1]] = 5, 7
    return ids, (places[:, 0] < places[:, 1]).long()


def tasks() -> dict:
    """name: (model constructor, inputs, targets, loss); "bert" only where transformers imports."""
    digits = load_digits()
    x = digits.train_x.float()
    x = (x - x.mean()) / x.std()
    y = digits.train_y
    gen = torch.Generator().manual_seed(0)
    xr = torch.randn(2048, 16, generator=gen)
    yr = 3 * torch.sin(0.3 * xr @ torch.randn(16, 4, generator=gen)) + 5
    copies = torch.randint(1, 32, (1536, 12), generator=gen)
    return {
        "mobilenet": (MobileNetBlock, x, y, F.cross_entropy),
        "autoencoder": (ConvAutoencoder, x, x, F.mse_loss),
        "lstm": (RowLSTM, x, y, F.cross_entropy),
        "groupnorm": (groupnorm_cnn, x, y, F.cross_entropy),
        "deep-tanh": (deep_tanh_mlp, x, y, F.cross_entropy),
        "regression": (regression_mlp, xr, yr, F.mse_loss),
        **({"bert": (lambda: TinyBert(32), *order_task(), F.cross_entropy),
            "gpt2": (TinyGPT2, *byte_windows(), token_cross_entropy),
            "llama": (TinyLlama, *byte_windows(), token_cross_entropy),
            "t5": (TinyT5, copies, copies, token_cross_entropy),
            "hf-vit": (TinyHFViT, x, y, F.cross_entropy),
            "distilbert": (lambda: TinyDistilBert(32), *order_task(), F.cross_entropy)} if _has_transformers() else {}),
    }


def _has_transformers() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def run_cell(task, optimizer: str, lr: float, steps: int, batch: int, seed: int = 0,
             interval: int | None = None) -> dict:
    """One run: the model initialized from `seed` (the batches are the same for every seed); `interval`: K-FAC's and
    FOP's factor_interval = inverse_interval (None: the library's)."""
    make_model, x, y, loss_fn = task
    torch.manual_seed(seed)
    model = make_model()
    curvature = {} if interval is None or optimizer not in ("kfac", "fop") else dict(
        factor_interval=interval, inverse_interval=interval)
    with warnings.catch_warnings():  # "preconditions only x% of the parameters": expected for the LSTM and decoder
        warnings.simplefilter("ignore", UserWarning)
        opt = OPTIMIZERS[optimizer][0](model, lr, **curvature)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        start = float(loss_fn(model(x), y))
    peak, t0 = 0.0, time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=gen)
        opt.zero_grad()
        loss = loss_fn(model(x[idx]), y[idx])
        loss.backward()
        value = float(loss.detach())
        if not math.isfinite(value):
            return {"start": start, "final": None, "peak": None, "diverged_step": step}
        if step >= steps // 3:
            peak = max(peak, value)
        try:
            opt.step()
        except FloatingPointError:
            return {"start": start, "final": None, "peak": None, "diverged_step": step}
    with torch.no_grad():
        final = float(loss_fn(model(x), y))
    return {"start": start, "final": final, "peak": peak, "diverged_step": None,
            "seconds": time.perf_counter() - t0}


def cell_text(record: dict) -> str:
    if record["diverged_step"] is not None:
        return f"diverged@{record['diverged_step']}"
    return f"{record['final']:.3g} (peak {record['peak']:.2g})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=None, help="comma-separated (default: every task that can run here)")
    p.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    p.add_argument("--lrs", default=None, help="one grid for every optimizer (default: each its own)")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0, help="the models' initialization (the batches stay the same)")
    p.add_argument("--interval", type=int, default=None,
                   help="K-FAC's and FOP's factor_interval = inverse_interval (default: the library's)")
    p.add_argument("--out", default="out/model-zoo")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    all_tasks = tasks()
    models = list(all_tasks) if args.models is None else args.models.split(",")
    optimizers = args.optimizers.split(",")
    unknown = [m for m in models if m not in all_tasks] + [o for o in optimizers if o not in OPTIMIZERS]
    if unknown:
        p.error(f"unknown models/optimizers {unknown}; models: {list(all_tasks)}, optimizers: {list(OPTIMIZERS)}")
    records = []
    for model in models:
        for optimizer in optimizers:
            for lr in map(float, (args.lrs or OPTIMIZERS[optimizer][1]).split(",")):
                record = {"model": model, "optimizer": optimizer, "lr": lr,
                          **run_cell(all_tasks[model], optimizer, lr, args.steps, args.batch, args.seed,
                                     args.interval)}
                records.append(record)
                print(f"{model:12s} {optimizer:10s} lr {lr:<6g} start {record['start']:.3g}: {cell_text(record)}",
                      flush=True)
    os.makedirs(args.out, exist_ok=True)
    meta = {"steps": args.steps, "batch": args.batch, "seed": args.seed, "interval": args.interval,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    with open(os.path.join(args.out, "model_zoo.json"), "w") as f:
        json.dump({"meta": meta, "records": records}, f, indent=1)
    lines = [f"Final training loss after {args.steps} steps at batch {args.batch} (peak: the largest batch loss after "
             f"step {args.steps // 3}); only lr set. {meta['date']}, torch {meta['torch']}.", ""]
    for model in models:
        rows = [r for r in records if r["model"] == model]
        lines += [f"**{model}** (loss at the start {rows[0]['start']:.3g})", "", "| optimizer | lr | final (peak) |",
                  "| --- | --- | --- |"]
        lines += [f"| {r['optimizer']} | {r['lr']:g} | {cell_text(r)} |" for r in rows]
        lines.append("")
    with open(os.path.join(args.out, "model_zoo.md"), "w") as f:
        f.write("\n".join(lines))


if __name__ == "__main__":
    main()
