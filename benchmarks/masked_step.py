"""Cost of the lottery-ticket masks: a masked training step against an unmasked one (goal <= 1.15).

    python benchmarks/masked_step.py [--model lenet_300_100] [--batch_size 60] [--steps 400] [--remaining 0.2]

Copies of the same net train on the same mnist5k batches with the paper's Adam (lr 1.2e-3): plain,
or carrying torch.nn.utils.prune masks (callbacks/prune_rewind.py) at --remaining of the weights,
so that every step pays the mask multiply in the forward and in the backward. The optimizer is
torch's fused Adam, as the pipeline trains (`ClassifierModule(fused=True)`); torch's default
(foreach) Adam is timed too: on the CPU its sqrt takes a slow path on the exact zeros that pruned
weights leave in Adam's state. Steps of all variants are interleaved (in rotating order), so that
machine load hits them alike; they are timed in CPU time of this thread (run with
OMP_NUM_THREADS=1 so that all work is on it), robust to a shared machine. After a warm-up the ratio
of median step times is printed as `masked_step_ratio=<masked / unmasked>`.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

from callbacks.prune_rewind import apply, magnitude_masks, prepare, theta
from datamodules.datamodule import ArrayDataModule
from modules.nets import NETS, build_net


def step(net, optimizer, x, y) -> float:
    start = time.thread_time()
    optimizer.zero_grad()
    F.cross_entropy(net(x), y).backward()
    optimizer.step()
    return time.thread_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="lenet_300_100", choices=tuple(NETS))
    parser.add_argument("--dataset", default="mnist5k")
    parser.add_argument("--batch_size", type=int, default=60)
    parser.add_argument("--steps", type=int, default=400, help="timed steps of each variant")
    parser.add_argument("--remaining", type=float, default=0.2, help="fraction of the weights the masks keep")
    args = parser.parse_args()

    datamodule = ArrayDataModule(args.dataset, batch_size=args.batch_size)
    datamodule.setup()
    torch.manual_seed(0)
    dense = build_net(args.model, datamodule.input_shape, datamodule.num_classes)
    ticket = prepare(copy.deepcopy(dense))
    apply(ticket, magnitude_masks(ticket, 1 - args.remaining), theta(ticket))
    variants = {}
    for adam, fused in (("fused Adam", True), ("default Adam", None)):
        for kind, net in (("unmasked", dense), ("masked", ticket)):
            net = copy.deepcopy(net)
            variants[(adam, kind)] = (net, torch.optim.Adam(net.parameters(), lr=1.2e-3, fused=fused))
    batches = list(datamodule.loader("train", shuffle=True))
    warmup, order = 20, list(variants)
    times = {key: [] for key in variants}
    for i in range(warmup + args.steps):
        x, y = batches[i % len(batches)]
        for key in order[i % len(order):] + order[:i % len(order)]:
            elapsed = step(*variants[key], x, y)
            if i >= warmup:
                times[key].append(elapsed)
    median = {key: statistics.median(t) for key, t in times.items()}
    print(f"{args.model}, batch {args.batch_size}, {args.remaining:.0%} of the weights kept, "
          f"{torch.get_num_threads()} thread(s), median CPU time per step:")
    for adam in ("fused Adam", "default Adam"):
        masked, unmasked = median[(adam, "masked")], median[(adam, "unmasked")]
        print(f"  {adam:12s} unmasked {unmasked * 1e3:.3f} ms, masked {masked * 1e3:.3f} ms, ratio {masked / unmasked:.3f}")
    print(f"masked_step_ratio={median[('fused Adam', 'masked')] / median[('fused Adam', 'unmasked')]:.3f}")


if __name__ == "__main__":
    main()
