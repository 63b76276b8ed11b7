"""K-FAC-expand against K-FAC-reduce (`linear_tokens`) on two tiny transformers, side by side in one run.

    python bench/studies/linear_tokens.py --steps 20 --seeds 0,1,2 --threads 1

K-FAC and FOP at their defaults with `lr` set (and `factor_interval = inverse_interval = 1`, so that the factors
are fresh every step and the token treatment acts on each), overfitting a fixed batch: transformers' GPT-2
(2 layers, 16 wide, vocab 50, next-token loss on 16 x 12 random tokens) and a ViT on torch's nn.TransformerEncoder
(2 layers, 16 wide, 4 patches of 8 x 8 images, batch 32). Prints the loss at steps 0, 10 and the last per seed, the
mean of the last, and the wall time of each configuration (a ratio only: the machine may be shared). Needs
transformers (a test dependency). The table in docs/layers.md comes from this script.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
import warnings

import torch
import torch.nn.functional as F
from fop import FOP, KFAC
from fop_train.models import EncoderViT


def gpt2(seed: int):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=50, n_positions=16, bos_token_id=0,
                                  eos_token_id=0, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(cfg)
    ids = torch.randint(0, 50, (16, 12), generator=torch.Generator().manual_seed(seed))
    return model, lambda: model(input_ids=ids, labels=ids).loss


def vit(seed: int):
    torch.manual_seed(seed)
    model = EncoderViT(1, 8, 5)
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(32, 1, 8, 8, generator=g), torch.randint(0, 5, (32,), generator=g)
    return model, lambda: F.cross_entropy(model(x), y)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: tiny models, no oversubscription)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    warnings.filterwarnings("ignore")
    logging.getLogger("fop").setLevel(logging.ERROR)
    print("| model | optimizer | tokens | loss at 0 / 10 / last per seed | mean last | wall s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, make in (("gpt2", gpt2), ("vit", vit)):
        for cls in (KFAC, FOP):
            for tokens in ("expand", "reduce"):
                cells, last, wall = [], [], 0.0
                for seed in seeds:
                    model, loss_of = make(seed)
                    opt = cls(model, lr=args.lr, linear_tokens=tokens, factor_interval=1, inverse_interval=1)
                    losses = []
                    start = time.perf_counter()
                    for _ in range(args.steps):
                        opt.zero_grad()
                        loss = loss_of()
                        loss.backward()
                        losses.append(float(loss.detach()))
                        opt.step()
                    wall += time.perf_counter() - start
                    cells.append(f"{losses[0]:.3f} / {losses[min(10, args.steps - 1)]:.3f} / {losses[-1]:.4f}")
                    last.append(losses[-1])
                print(f"| {name} | {cls.__name__} | {tokens} | {' ; '.join(cells)} | {statistics.mean(last):.4f} "
                      f"| {wall:.2f} |", flush=True)


if __name__ == "__main__":
    main()
