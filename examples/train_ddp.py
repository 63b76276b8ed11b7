"""Train a small CNN with FOP (or K-FAC, FROG, K-FROG, AdaFisher, SGD) across ranks with DistributedDataParallel.

    torchrun --nproc_per_node=2 examples/train_ddp.py                     # CPU: gloo, sklearn's digits
    torchrun --nproc_per_node=4 examples/train_ddp.py --data-dir DIR      # GPUs: NCCL, MNIST IDX files in DIR

torchrun sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT. The backend is NCCL when CUDA is
available (one GPU per process, cuda:LOCAL_RANK), gloo otherwise. Each rank trains on its own shard of every
epoch (DistributedSampler); DDP averages the gradients and the optimizer, built on the DDP model, synchronizes its
curvature (fop.distributed; FROG, K-FROG and AdaFisher: fop.distributed_rows): FOP's first sub-batch is the first
half of every rank's batch; FROG's samples are drawn out of the global batch. Rank 0 prints the test
accuracy after every epoch, the optimizer's bytes per step against DDP's, and saves a checkpoint that restores on
any number of ranks (`--resume`).
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from fop import FOP, FROG, KFAC, KFROG, AdaFisher
from fop.distributed import DistributedOptions
from fop_train.data import load_digits, load_mnist
from fop_train.models import SmallCNN
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--optimizer", choices=("fop", "kfac", "frog", "kfrog", "adafisher", "sgd"), default="fop")
    p.add_argument("--data-dir", default=None, help="MNIST IDX files; default: sklearn's bundled digits")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch", type=int, default=128, help="samples per rank and step")
    p.add_argument("--lr", type=float, default=None,
                   help="default: 0.05 (FOP, K-FAC, SGD), 0.01 (FROG), 0.1 (K-FROG), 1e-3 (AdaFisher)")
    p.add_argument("--split", choices=("halves", "ranks"), default="halves",
                   help="FOP's sub-batches: first halves of every rank's batch, or even vs odd ranks")
    p.add_argument("--checkpoint", default=None, help="save model and optimizer here after every epoch (rank 0)")
    p.add_argument("--resume", default=None, help="a checkpoint saved by --checkpoint, on any number of ranks")
    args = p.parse_args()

    use_cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if not use_cuda:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))

    data = load_mnist(args.data_dir) if args.data_dir else load_digits()
    train = TensorDataset(data.train_x, data.train_y)
    sampler = DistributedSampler(train, num_replicas=world, rank=rank, shuffle=True, seed=0, drop_last=True)
    loader = DataLoader(train, batch_size=args.batch, sampler=sampler, drop_last=True)

    torch.manual_seed(0)  # the same initial weights everywhere (DDP also broadcasts rank 0's)
    channels, side, _ = data.image_shape
    model = SmallCNN(channels, side, data.num_classes).to(device)
    ddp = DDP(model, device_ids=[local_rank] if use_cuda else None)
    lr = args.lr if args.lr is not None else {"frog": 0.01, "kfrog": 0.1, "adafisher": 1e-3}.get(args.optimizer, 0.05)
    if args.optimizer == "sgd":
        opt = torch.optim.SGD(ddp.parameters(), lr=lr, momentum=0.9)
    elif args.optimizer == "frog":
        opt = FROG(ddp, lr=lr, momentum=0.9, seed=0)
    elif args.optimizer == "kfrog":
        opt = KFROG(ddp, lr=lr, seed=0)
    elif args.optimizer == "adafisher":
        opt = AdaFisher(ddp, lr=lr, factor_interval=10)
    else:
        kwargs = dict(lr=lr)  # every other hyperparameter at its default
        if args.optimizer == "fop":
            opt = FOP(ddp, distributed=DistributedOptions(split=args.split), **kwargs)
        else:
            opt = KFAC(ddp, **kwargs)
    first_epoch = 0
    if args.resume:
        state = torch.load(args.resume, map_location=device)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        first_epoch = state["epoch"] + 1

    for epoch in range(first_epoch, first_epoch + args.epochs):
        sampler.set_epoch(epoch)
        ddp.train()
        start, steps = time.perf_counter(), 0
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            opt.zero_grad()
            F.cross_entropy(ddp(x), y).backward()
            opt.step()
            steps += 1
        elapsed = time.perf_counter() - start
        ddp.eval()
        with torch.no_grad():
            correct = (model(data.test_x.to(device)).argmax(1) == data.test_y.to(device)).sum().item()
        if rank == 0:
            grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
            comm = ""
            if hasattr(opt, "comm"):
                mean = opt.comm.stats()["mean_per_step"].get("total", 0) if opt.comm.active else 0
                comm = f", optimizer {mean / 1e3:.1f} kB/step vs DDP {grad_bytes / 1e3:.1f} kB/step"
            print(f"epoch {epoch}: test accuracy {100 * correct / len(data.test_y):.2f}% on {world} rank(s), "
                  f"{1e3 * elapsed / max(steps, 1):.1f} ms/step{comm}", flush=True)
            if args.checkpoint:
                torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch},
                           args.checkpoint)
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
