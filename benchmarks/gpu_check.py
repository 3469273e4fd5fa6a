"""On a CUDA GPU: the Fastfood transform, the subspace step and one short pipeline training, timed.

Run from the repository root on a machine with a GPU (elsewhere it says so in one line and exits 1):

    python benchmarks/gpu_check.py
    python benchmarks/gpu_check.py --pipeline "lottery_ticket --rounds 1 --max_epochs 2" --precision bf16-mixed

1. Fastfood on CUDA computes the CPU's theta and gradient (float64 on both sides, so the
   difference is rounding only): `fastfood_cuda_max_abs_diff=`.
2. The fast Walsh-Hadamard transform of 2^18 floats on CUDA per largest factor size
   (FWHT_MAX_FACTOR_LOG2 = 4 was tuned on 2 CPU cores; a GPU may prefer fewer, larger GEMMs):
   `fwht_ms[max_factor=2^k]=`.
3. `benchmarks/subspace_step.py --device cuda`: subspace step / direct step per projection at d = 750.
4. `python -m pipelines <--pipeline>` with `--accelerator gpu` (and `--precision`), then the same with
   `--accelerator cpu` at 32-true, each in a fresh temporary folder and MLflow store:
   `pipeline_gpu_wall_s=`, `pipeline_cpu_wall_s=`, `pipeline_cpu_over_gpu=` and each run's headline.
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

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from modules.projections import FastfoodProjection, fwht  # noqa: E402


def fastfood_matches_cpu(d: int = 750, D: int = 199_210) -> float:
    """Largest |difference| of theta and of the gradient of a fixed function, CUDA against CPU (float64)."""
    weights = torch.randn(D, dtype=torch.float64)
    results = []
    for device in ("cpu", "cuda"):
        projection = FastfoodProjection(d, D, seed=0).to(device, torch.float64)
        theta_d = torch.linspace(-1, 1, d, dtype=torch.float64, device=device, requires_grad=True)
        theta = projection(theta_d)
        (theta * weights.to(device)).sum().backward()
        results.append((theta.detach().cpu(), theta_d.grad.cpu()))
    return max((cpu - cuda).abs().max().item() for cpu, cuda in zip(*results))


def fwht_ms(max_factor_log2: int, n: int = 2**18, repeats: int = 200) -> float:
    x = torch.randn(n, device="cuda")
    for _ in range(10):
        fwht(x, max_factor_log2)
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fwht(x, max_factor_log2)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def run_pipeline(command: str, accelerator: str, precision: str) -> tuple[float, str]:
    """(wall seconds, the parent run's headline) of one pipeline run in a fresh folder with its own MLflow store."""
    from mlflow.tracking import MlflowClient

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as folder:
        uri = f"sqlite:///{folder}/mlflow.db"
        argv = [sys.executable, "-m", "pipelines", *shlex.split(command), "--accelerator", accelerator,
                "--precision", precision, "--tracking_uri", uri]
        start = time.perf_counter()
        done = subprocess.run(argv, cwd=folder, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - start
        if done.returncode:
            sys.exit(f"gpu_check: `{shlex.join(argv[1:])}` failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
        client = MlflowClient(uri)
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        notes = [r.data.tags.get("mlflow.note.content", "") for r in runs if "mlflow.parentRunId" not in r.data.tags]
    return wall, notes[0].splitlines()[0].strip("*") if notes and notes[0] else ""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", default="intrinsic_dim --mode sweep --ds 300,1000 --seeds 1 --max_epochs 3",
                        help="the pipeline and its flags (run on the GPU, then on the CPU)")
    parser.add_argument("--precision", default="32-true", help="Lightning precision of the GPU run (the CPU run: 32-true)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA GPU here (torch.cuda.is_available() is False): run it on a machine with one")
    print(f"device={torch.cuda.get_device_name()} torch={torch.__version__}")

    print(f"fastfood_cuda_max_abs_diff={fastfood_matches_cpu():.3g} (float64, d=750, D=199,210)")
    print(" ".join(f"fwht_ms[max_factor=2^{k}]={fwht_ms(k):.3f}" for k in (4, 6, 9)))
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "subspace_step.py"), "--device", "cuda"], check=True)

    gpu_wall, gpu_line = run_pipeline(args.pipeline, "gpu", args.precision)
    cpu_wall, cpu_line = run_pipeline(args.pipeline, "cpu", "32-true")
    print(f"pipeline={args.pipeline!r} precision={args.precision} pipeline_gpu_wall_s={gpu_wall:.1f} "
          f"pipeline_cpu_wall_s={cpu_wall:.1f} pipeline_cpu_over_gpu={cpu_wall / gpu_wall:.2f}")
    print(f"gpu: {gpu_line}\ncpu: {cpu_line}")


if __name__ == "__main__":
    main()
