"""Wall time of one pipeline under DDP against one process: what its distributed launch costs.

Run from the repository root:

    python benchmarks/ddp_overhead.py        # lottery_ticket --rounds 3 --max_epochs 2 --dataset digits --val_every 20
    python benchmarks/ddp_overhead.py --repeats 5 --variants single,ddp --pipeline "xor --max_epochs 5"

The pipeline (made of many short trainings: the lottery ticket's 4 rounds and 3 controls are 7) runs
as one process (`single`), with `--devices 2 --strategy ddp --accelerator cpu` (`ddp`: the pipeline
starts its ranks) and under `torchrun --standalone --nproc_per_node 2` with the same flags
(`torchrun`: started from outside), interleaved (single, ddp, torchrun, single, ...) so that machine
load hits all alike, each run in a fresh folder with its own MLflow store. Prints every run's wall
time, then `ddp_wall_ratio=<median ddp / median single>` and `torchrun_wall_ratio=`. A variant that
fails prints its exit code and the end of its stderr, its ratio reads `failed`, and the script exits 1
(at once if the single-process run fails).
Goal (issue 13): ddp_wall_ratio <= 1.5 on the 2-core machine.
"""
from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("single", "ddp", "torchrun")


def command(variant: str, pipeline: list[str], devices: int) -> list[str]:
    ddp = ["--devices", str(devices), "--strategy", "ddp", "--accelerator", "cpu"]
    if variant == "single":
        return [sys.executable, "-m", "pipelines", *pipeline, "--accelerator", "cpu"]
    if variant == "ddp":
        return [sys.executable, "-m", "pipelines", *pipeline, *ddp]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(devices),
            "-m", "pipelines", *pipeline, *ddp]


def timed_run(argv: list[str]) -> tuple[float, int, str]:
    """(wall seconds, exit code, end of stderr) of one run in a fresh folder with its own MLflow store."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryDirectory(prefix="ddp-overhead-") as folder:
        start = time.perf_counter()
        done = subprocess.run([*argv, "--tracking_uri", f"sqlite:///{folder}/mlflow.db"], cwd=folder, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        return time.perf_counter() - start, done.returncode, done.stderr[-2000:]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", default="lottery_ticket --rounds 3 --max_epochs 2 --dataset digits --val_every 20",
                        help="the pipeline and its flags")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {', '.join(VARIANTS)}")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each variant, interleaved")
    parser.add_argument("--devices", type=int, default=2, help="ranks of the DDP variants")
    args = parser.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if "single" not in variants or any(v not in VARIANTS for v in variants):
        parser.error(f"--variants: a subset of {', '.join(VARIANTS)} that includes single")

    walls: dict[str, list[float]] = {v: [] for v in variants}
    failed: dict[str, int] = {}
    for repeat in range(args.repeats):
        for variant in variants:
            if variant in failed:
                continue
            argv = command(variant, shlex.split(args.pipeline), args.devices)
            wall, code, stderr = timed_run(argv)
            print(f"{variant} run {repeat + 1}: wall_s={wall:.1f} exit={code}", flush=True)
            if code:
                print(f"{variant} failed (exit {code}): {shlex.join(argv[1:])}\nits stderr ends:\n{stderr}", flush=True)
                if variant == "single":
                    sys.exit("ddp_overhead: the single-process run failed: nothing to compare with")
                failed[variant] = code
            else:
                walls[variant].append(wall)

    single = statistics.median(walls["single"])
    print(f"pipeline={args.pipeline!r} single_wall_s={single:.1f} ({args.repeats} interleaved runs per variant)")
    for variant in (v for v in variants if v != "single"):
        ratio = "failed" if variant in failed else f"{statistics.median(walls[variant]) / single:.2f}"
        print(f"{variant}_wall_ratio={ratio}")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
