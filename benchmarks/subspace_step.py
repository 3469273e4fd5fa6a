"""Cost of a subspace training step against a direct step, per projection.

Run from the repository root:

    python benchmarks/subspace_step.py                      # dense, sparse, fastfood at d=750
    python benchmarks/subspace_step.py --projections fastfood,sparse --d 1000 --steps 300 --threads 1
    python benchmarks/subspace_step.py --device cuda        (benchmarks/gpu_check.py runs this)

Builds FC 784-200-200-10 (D = 199,210), a batch of 128 random MNIST-shaped inputs, and Adam
(lr 1e-3) for the direct net and for SubspaceNet with each projection. After a warm-up, steps of
all models are interleaved (so machine load hits them alike) and each line reports the ratio of
median step times to the direct step, the memory the projection's buffers hold (dense at d=750:
600 MB) and the ratio of minimum times, which is only telling on an otherwise idle machine. On
cores shared with other busy processes, `--threads 1` gives steadier ratios: with two threads
every parallel op waits for the slower thread. On CUDA each step is timed to its end (synchronized).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modules.nets import build_net  # noqa: E402
from modules.projections import PROJECTIONS  # noqa: E402
from modules.subspace import SubspaceNet  # noqa: E402


def make_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor):
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    synchronize = torch.cuda.synchronize if x.is_cuda else lambda: None  # CUDA runs asynchronously

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        synchronize()
    return step


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--projections", default=",".join(PROJECTIONS),
                        help=f"comma-separated subset of {', '.join(PROJECTIONS)}")
    parser.add_argument("--d", type=int, default=750, help="subspace dimension")
    parser.add_argument("--steps", type=int, default=200, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps per model first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args(argv)
    names = [name.strip() for name in args.projections.split(",") if name.strip()]
    unknown = [name for name in names if name not in PROJECTIONS]
    if unknown:
        parser.error(f"unknown projection(s) {', '.join(unknown)}; choose from {', '.join(PROJECTIONS)}")

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    x, y = torch.randn(128, 1, 28, 28, device=args.device), torch.randint(10, (128,), device=args.device)
    models = {"direct": build_net("fc", (1, 28, 28), 10).to(args.device)}
    for name in names:
        models[name] = SubspaceNet(build_net("fc", (1, 28, 28), 10), args.d, name, seed=args.seed).to(args.device)
    steps = {name: make_step(model, x, y) for name, model in models.items()}
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    times = {name: [] for name in steps}
    for _ in range(args.steps):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)

    direct_median, direct_min = statistics.median(times["direct"]), min(times["direct"])
    print(f"direct D={sum(p.numel() for p in models['direct'].parameters())} "
          f"step_ms={direct_median * 1e3:.3f} (min {direct_min * 1e3:.3f}), "
          f"{torch.get_num_threads()} threads, {args.steps} interleaved steps, {args.device}")
    for name in names:
        memory_mb = models[name].projection.memory_bytes() / 2**20
        print(f"{name} d={args.d} step_ratio={statistics.median(times[name]) / direct_median:.2f} "
              f"memory_mb={memory_mb:.1f} step_ms={statistics.median(times[name]) * 1e3:.3f} "
              f"step_ratio_min={min(times[name]) / direct_min:.2f}")


if __name__ == "__main__":
    main()
