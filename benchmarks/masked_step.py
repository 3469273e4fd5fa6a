"""Cost of the lottery-ticket masks: a masked training step against an unmasked one (goal <= 1.15).

    python benchmarks/masked_step.py [--model lenet_300_100] [--batch_size 60] [--steps 400] [--remaining 0.2]

Two copies of the same net train on the same mnist5k batches with the paper's Adam: one plain, one
carrying torch.nn.utils.prune masks (callbacks/prune_rewind.py) at --remaining of its weights, so
every step pays the mask multiply in the forward and in the backward. Steps alternate between the
two (in alternating order), so machine load hits both alike; after a warm-up, the ratio of the
median step times is printed as `masked_step_ratio=<masked / unmasked>`.
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
    start = time.perf_counter()
    optimizer.zero_grad()
    F.cross_entropy(net(x), y).backward()
    optimizer.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="lenet_300_100", choices=tuple(NETS))
    parser.add_argument("--dataset", default="mnist5k")
    parser.add_argument("--batch_size", type=int, default=60)
    parser.add_argument("--steps", type=int, default=400, help="timed steps of each net")
    parser.add_argument("--remaining", type=float, default=0.2, help="fraction of the weights the masks keep")
    args = parser.parse_args()

    datamodule = ArrayDataModule(args.dataset, batch_size=args.batch_size)
    datamodule.setup()
    torch.manual_seed(0)
    plain = build_net(args.model, datamodule.input_shape, datamodule.num_classes)
    masked = prepare(copy.deepcopy(plain))
    apply(masked, magnitude_masks(masked, 1 - args.remaining, output_rate_half=False), theta(masked))
    nets = {"unmasked": plain, "masked": masked}
    optimizers = {name: torch.optim.Adam(net.parameters(), lr=1.2e-3) for name, net in nets.items()}
    batches = list(datamodule.loader("train", shuffle=True))
    warmup = 20
    times = {name: [] for name in nets}
    for i in range(warmup + args.steps):
        x, y = batches[i % len(batches)]
        for name in (("unmasked", "masked") if i % 2 else ("masked", "unmasked")):
            elapsed = step(nets[name], optimizers[name], x, y)
            if i >= warmup:
                times[name].append(elapsed)
    medians = {name: statistics.median(t) for name, t in times.items()}
    print(f"{args.model}, batch {args.batch_size}, {args.remaining:.0%} of weights kept, {torch.get_num_threads()} threads: "
          f"median step unmasked {medians['unmasked'] * 1e3:.3f} ms, masked {medians['masked'] * 1e3:.3f} ms")
    print(f"masked_step_ratio={medians['masked'] / medians['unmasked']:.3f}")


if __name__ == "__main__":
    main()
