"""One process group for a whole pipeline run: every rank runs the same orchestration.

    python -m pipelines lottery_ticket --devices 2 --strategy ddp        (starts the 2 ranks itself)
    torchrun --nproc_per_node 2 -m pipelines lottery_ticket --devices 2 --strategy ddp
    srun --ntasks-per-node 4 python -m pipelines lottery_ticket --devices 4 --num_nodes 2 --strategy ddp
    NODE_RANK=1 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 python -m pipelines ... --num_nodes 2 --devices 4 --strategy ddp

`start()` joins (or, started plainly, first launches) the ranks once per pipeline run; every
training's Trainer then finds the process group in place and reuses it (Lightning skips its own
set-up when one exists). Every rank runs the same sweeps and loops. What is not the same on every
rank (what MLflow or the Optuna storage holds, a claim on a trial) is read by global rank 0 and
broadcast: `on_rank_zero(fn)`, `broadcast(value)`. Only rank 0 talks to MLflow and to Optuna.
"""
from __future__ import annotations

import datetime
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import torch.distributed as dist

_objects = None  # the group objects are broadcast in (gloo, also when the trainings use nccl)
RENDEZVOUS = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK")  # how our ranks find each other


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_rank_zero() -> bool:
    return rank() == 0


def broadcast(value):
    """Rank 0's `value` on every rank (the value itself in one process)."""
    if world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, group=_objects)
    return box[0]


class RankZeroError(RuntimeError):
    """What another rank raises when `on_rank_zero`'s function failed on rank 0 (which raises the original)."""


def on_rank_zero(fn, *args, **kwargs):
    """`fn(*args, **kwargs)` run by rank 0 only; its result on every rank. An exception on rank 0 is raised
    there as it is and as a `RankZeroError` (or the same `UsageError`) on the other ranks."""
    from pipelines.params import UsageError

    if world_size() == 1:
        return fn(*args, **kwargs)
    outcome, error = None, None
    if is_rank_zero():
        try:
            outcome = fn(*args, **kwargs)
        except BaseException as exc:
            error = exc
    failure = broadcast(None if error is None else (type(error).__name__, str(error), getattr(error, "flag", None)))
    if error is not None:
        raise error
    if failure is not None:
        kind, message, flag = failure
        if flag is not None:
            raise UsageError(flag, message.split(": ", 1)[-1])
        raise RankZeroError(f"rank 0 failed: {kind}: {message}")
    return broadcast(outcome)


def env_rank(devices: int) -> int:
    """This process's global rank as its launcher set it, before the group exists (torchrun, srun, ours)."""
    if "RANK" in os.environ:
        return int(os.environ["RANK"])
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return int(os.environ.get("SLURM_PROCID", "0"))
    return int(os.environ.get("NODE_RANK", "0")) * devices + int(os.environ.get("LOCAL_RANK", "0"))


@dataclass
class Launch:
    """The ranks this process started (it is their node's local rank 0), watched until `stop()`."""

    ranks: dict = field(default_factory=dict)  # global rank -> its process
    failed: dict = field(default_factory=dict)  # global rank -> exit code, for ranks that ended badly
    stopping: bool = False
    environ: dict = field(default_factory=dict)  # what `start` changed in os.environ, as it was (restored by `stop`)

    def watch(self) -> None:
        while not self.stopping:
            self.failed.update({r: p.returncode for r, p in self.ranks.items() if p.poll()})
            time.sleep(0.2)

    def failure(self, wait_s: float = 5) -> str | None:
        """One line naming the ranks that failed (to say after an error on this rank, which may come first:
        a collective breaks as soon as the other rank's connection closes), or None."""
        deadline = time.time() + wait_s
        while time.time() < deadline and any(p.poll() is None for p in self.ranks.values()):
            time.sleep(0.1)
        self.failed.update({r: p.returncode for r, p in self.ranks.items() if p.poll()})
        return "; ".join(f"rank {r} exited with code {code}" for r, code in sorted(self.failed.items())) or None


def _cluster(hardware) -> tuple[int, int, int, str, int] | None:
    """(global rank, world size, local rank, main address, main port) when an outside launcher (torchrun, srun)
    started this process, else None."""
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    for environment in (TorchElasticEnvironment, SLURMEnvironment):
        if environment.detect() and (environment is not SLURMEnvironment or int(os.environ.get("SLURM_NTASKS", "1")) > 1):
            env = environment()
            return env.global_rank(), env.world_size(), env.local_rank(), env.main_address, env.main_port
    return None


def start(hardware, argv: list[str]) -> Launch:
    """Joins this process to the pipeline's process group, launching this node's other ranks first when
    nothing else did (`python -m pipelines <argv>` again, with LOCAL_RANK set). One process: nothing."""
    global _objects
    launch = Launch()
    if hardware.world_size == 1 or dist.is_initialized():
        return launch
    cluster = _cluster(hardware)
    if cluster:
        global_rank, size, local_rank, address, port = cluster
    else:
        from lightning.fabric.plugins.environments.lightning import find_free_network_port

        if hardware.num_nodes > 1 and not ("MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ):
            from pipelines.params import UsageError

            raise UsageError("num_nodes", "several nodes need MASTER_ADDR and MASTER_PORT (node 0's address and a "
                                          "free port) and NODE_RANK in the environment of every node")
        launch.environ = {k: os.environ.get(k) for k in RENDEZVOUS}
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(find_free_network_port()))
        os.environ.setdefault("NODE_RANK", "0")
        if "LOCAL_RANK" not in os.environ:  # started plainly: this is local rank 0; start the others
            os.environ["LOCAL_RANK"] = "0"
            command = [sys.executable, "-m", "pipelines", *argv]
            first = int(os.environ["NODE_RANK"]) * hardware.devices
            launch.ranks = {first + local: subprocess.Popen(command, env={**os.environ, "LOCAL_RANK": str(local)})
                            for local in range(1, hardware.devices)}
            threading.Thread(target=launch.watch, daemon=True).start()
        local_rank = int(os.environ["LOCAL_RANK"])
        global_rank = env_rank(hardware.devices)
        size, address, port = hardware.world_size, os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    gpu = _uses_gpu(hardware)
    if gpu:
        import torch

        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if gpu else "gloo", init_method=f"tcp://{address}:{port}", rank=global_rank,
                            world_size=size, timeout=datetime.timedelta(minutes=30))
    _objects = dist.new_group(backend="gloo") if gpu else None
    return launch


def _uses_gpu(hardware) -> bool:
    from pipelines.params import resolved_accelerator

    return resolved_accelerator(hardware.accelerator) == "gpu"


def stop(launch: Launch, ok: bool) -> None:
    """Leaves the group together (a rank that exits while gloo still serves another can abort it) and waits
    for the ranks this process started. After an error on this rank they are stopped first: closing the
    group under them would make each print a broken-connection traceback after this rank's one line."""
    global _objects
    launch.stopping = True
    for process in launch.ranks.values():
        if not ok and process.poll() is None:
            process.kill()
    if dist.is_initialized():
        if ok:
            dist.barrier()
        dist.destroy_process_group()
        _objects = None
    for key, value in launch.environ.items():  # a later pipeline in this process starts afresh
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    for process in launch.ranks.values():
        process.wait()
    launch.failed.update({r: p.returncode for r, p in launch.ranks.items() if p.returncode and ok})
    if ok and launch.failed:
        raise RuntimeError(launch.failure())
