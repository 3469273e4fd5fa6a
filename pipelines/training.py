"""One way to run a training, for every pipeline: build the Trainer, fit, hand back the result.

A pipeline describes each training as a `Recipe` (data, net, loss, optimizer, callbacks, budget;
`recipe(params, data, net)` fills in the common flags) and runs it with `train(recipe, run)`, which
seeds, builds the `ClassifierModule`, logs the dataset to the child run and returns a `Trained`
(module, history, callbacks by type). Underneath, a `TrainJob` bundles a LightningModule, its datamodule,
its callbacks and the hardware flags.
Where nothing can tell, Lightning is handed 8 consecutive mini-batches per training step (the same
optimizer steps, a fraction of Lightning's per-step cost: `steps_per_call`).
`fit(job)` trains in this process on one device. With several devices (DDP), the training runs as
its own process group: `python -m pipelines.training JOB` once per rank of this node, started
together. A pipeline's orchestration
(sweeps, the Optuna loop, pruning rounds) runs once, and only rank 0 logs and writes the trained
job back.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable

import lightning as L
import torch
from torch import nn

from datamodules.datamodule import ArrayDataModule
from modules.classifier import ClassifierModule

# Lightning reports every Trainer's hardware and warns about our ready-made batches and about epochs
# shorter than its per-step logging interval (we log per epoch, never per step): noise here.
logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
warnings.filterwarnings("ignore", message=r".*(does not have many workers|sync_dist|LeafSpec|isinstance\(treespec"
                                          r"|smaller than the logging interval).*")


@dataclass
class Hardware:
    accelerator: str = "cpu"
    devices: int = 1
    strategy: str = "auto"
    num_nodes: int = 1
    precision: str = "32-true"

    @classmethod
    def from_params(cls, params) -> "Hardware":
        return cls(params.accelerator, params.devices, params.strategy, params.num_nodes, params.precision)

    @property
    def world_size(self) -> int:
        return self.devices * self.num_nodes


@dataclass
class TrainJob:
    module: L.LightningModule
    datamodule: L.LightningDataModule
    hardware: Hardware
    max_epochs: int
    seed: int = 0
    callbacks: list = field(default_factory=list)
    run_id: str | None = None  # the MLflow run that the training's metrics go to
    tracking_uri: str = ""
    max_steps: int = -1
    check_val_every_n_epoch: int = 1
    val_check_interval: int | float | None = None
    # Mini-batches one Lightning training step takes where that is safe (`steps_per_call`); ClassifierModule
    # steps the optimizer once per mini-batch, and Lightning's per-call work (fetch, hooks, progress) runs once.
    steps_per_call: int = 8


PER_BATCH_HOOKS = ("on_train_batch_start", "on_train_batch_end", "on_before_zero_grad", "on_before_backward",
                   "on_after_backward", "on_before_optimizer_step")


def datamodule(params, **options) -> ArrayDataModule:
    """The pipeline's data (--dataset, --data_dir, --download, --batch_size, --seed; `options` add to or
    override them), set up."""
    flags = {"dataset": params.dataset, "data_dir": params.data_dir, "download": params.download,
             "batch_size": params.batch_size, "seed": params.seed}
    data = ArrayDataModule(**{**flags, **options})
    data.setup()
    return data


@dataclass
class Recipe:
    """One supervised training as the papers describe it: data, net, loss, optimizer, callbacks, budget."""

    data: ArrayDataModule
    net: nn.Module | Callable[[], nn.Module]  # a builder runs after seeding, so the initialization follows `seed`
    hardware: Hardware
    max_epochs: int
    seed: int = 0
    loss: str = "cross_entropy"
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    lr_decay: float = 1.0
    fused: bool = False
    callbacks: list = field(default_factory=list)
    eval_splits: tuple[str, ...] | None = None  # None: the datamodule's
    max_steps: int = -1
    check_val_every_n_epoch: int | None = 1
    val_check_interval: int | float | None = None


def recipe(params, data: ArrayDataModule, net, **settings) -> Recipe:
    """A `Recipe` with the common flags (hardware, --max_epochs, --seed, --optimizer, --lr) and `settings`."""
    common = {"hardware": Hardware.from_params(params), "max_epochs": params.max_epochs, "seed": params.seed,
              "optimizer": params.optimizer, "lr": params.lr}
    return Recipe(data, net, **{**common, **settings})


@dataclass
class Trained:
    """What a training leaves: the trained module, its data, and its callbacks (the recipe's own objects,
    holding rank 0's state after a DDP training too)."""

    module: ClassifierModule
    data: ArrayDataModule
    callbacks: list

    @property
    def net(self) -> nn.Module:
        return self.module.net

    @property
    def history(self) -> list[dict[str, float]]:
        return self.module.history

    def callback(self, kind: type):
        """The callback of type `kind` (pipelines look callbacks up by what they are, not by position)."""
        return next(cb for cb in self.callbacks if isinstance(cb, kind))


def train(recipe: Recipe, run=None) -> Trained:
    """Seeds, builds the net and its `ClassifierModule`, trains; metrics and the dataset go to `run`."""
    data = recipe.data
    if not data.splits:
        data.setup()
    L.seed_everything(recipe.seed, verbose=False)
    net = recipe.net if isinstance(recipe.net, nn.Module) else recipe.net()
    module = ClassifierModule(net, recipe.loss, recipe.optimizer, recipe.lr, recipe.momentum, recipe.weight_decay,
                              recipe.lr_decay, eval_splits=recipe.eval_splits or data.eval_splits, fused=recipe.fused)
    if run is not None:
        run.log_dataset(data)
    job = fit(TrainJob(module, data, recipe.hardware, recipe.max_epochs, recipe.seed, list(recipe.callbacks),
                       run.id if run is not None else None, run.tracking_uri if run is not None else "",
                       recipe.max_steps, recipe.check_val_every_n_epoch, recipe.val_check_interval))
    return Trained(job.module, data, job.callbacks)


def steps_per_call(job: TrainJob) -> int:
    """`job.steps_per_call` where nothing can tell the groups from single mini-batches, else 1.

    Grouping keeps the mini-batches, their order and every optimizer step, so the numbers are the
    same; what it changes is what Lightning calls a batch. So it stays off on several devices (DDP
    syncs the gradients of one backward per forward), with a step budget or validation inside the
    epoch (Lightning checks both per call), and when any callback or the module hooks into single batches.
    """
    from lightning.pytorch.utilities.model_helpers import is_overridden

    if job.hardware.world_size > 1 or job.max_steps != -1 or job.val_check_interval is not None:
        return 1
    hooked = [job.module, *job.callbacks]
    return 1 if any(is_overridden(hook, obj) for obj in hooked for hook in PER_BATCH_HOOKS) else job.steps_per_call


def make_trainer(job: TrainJob) -> L.Trainer:
    from lightning.pytorch.loggers import MLFlowLogger

    job.datamodule.steps_per_call = steps_per_call(job)
    logger = MLFlowLogger(tracking_uri=job.tracking_uri, run_id=job.run_id) if job.run_id else False
    hw = job.hardware
    return L.Trainer(
        accelerator=hw.accelerator, devices=hw.devices, strategy=hw.strategy, num_nodes=hw.num_nodes,
        precision=hw.precision, max_epochs=job.max_epochs, max_steps=job.max_steps, logger=logger,
        callbacks=job.callbacks, deterministic="warn", enable_checkpointing=False, enable_model_summary=False,
        enable_progress_bar=sys.stderr.isatty(), num_sanity_val_steps=0, use_distributed_sampler=False,
        check_val_every_n_epoch=job.check_val_every_n_epoch, val_check_interval=job.val_check_interval,
        limit_val_batches=None if getattr(job.datamodule, "eval_splits", True) else 0)


def _fit_here(job: TrainJob) -> L.Trainer:
    L.seed_everything(job.seed, verbose=False)
    trainer = make_trainer(job)
    trainer.fit(job.module, datamodule=job.datamodule)
    return trainer


def fit(job: TrainJob) -> TrainJob:
    """Trains `job.module` and returns the job as rank 0 left it (module on the CPU, callbacks' state)."""
    if job.hardware.world_size == 1:
        _fit_here(job)
        return job
    with tempfile.TemporaryDirectory(prefix="train-job-") as folder:  # private (0700): only our ranks read it
        path = os.path.join(folder, "job.pt")
        torch.save(job, path)
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_RUN_ID"}
        command = [sys.executable, "-m", "pipelines.training", path]
        if "LOCAL_RANK" in os.environ:  # an outer launcher (torchrun) started us: Lightning joins its group
            ranks = [subprocess.Popen(command, env=env)]
        else:
            ranks = _launch_ranks(command, env, job.hardware)
        codes = _wait(ranks)
        if any(codes):
            raise RuntimeError(f"the DDP training process failed with exit codes {codes}")
        _restore(job, load_plain(path + ".out"))
        return job


def _plain(value):
    """`value` if it is made of tensors, numbers, strings and containers of them (what loads without
    unpickling code; an enum member goes as its value), else `_NOT_PLAIN`."""
    if isinstance(value, Enum):
        return _plain(value.value)
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return value
    if type(value) in (list, tuple):  # not a namedtuple: it would need its class to load
        items = [_plain(v) for v in value]
        return _NOT_PLAIN if any(v is _NOT_PLAIN for v in items) else type(value)(items)
    if isinstance(value, dict) and all(isinstance(k, (str, int)) for k in value):
        items = {k: _plain(v) for k, v in value.items()}
        return _NOT_PLAIN if any(v is _NOT_PLAIN for v in items.values()) else items
    return _NOT_PLAIN


_NOT_PLAIN = object()


def _state(obj, public_only: bool = False) -> dict:
    """The plain-data attributes of a callback (or the public ones of a module, whose private ones are
    torch's bookkeeping): what a training changes in them besides the weights."""
    values = {k: _plain(v) for k, v in vars(obj).items() if not (public_only and k.startswith("_"))}
    return {k: v for k, v in values.items() if v is not _NOT_PLAIN}


def _restore(job: TrainJob, state: dict) -> None:
    job.module.load_state_dict(state["weights"])
    for obj, values in ((job.module, state["module"]), *zip(job.callbacks, state["callbacks"])):
        for name, value in values.items():
            current = getattr(obj, name, None)  # an enum came as its value: back to its member
            setattr(obj, name, type(current)(value) if isinstance(current, Enum) else value)


class UnsafeFile(Exception):
    """A file that holds more than tensors and plain data: loading it would unpickle, and so run, code."""


def load_plain(path: str):
    """Tensors and plain containers from a `torch.save` file, never unpickled objects.

    Anything else (a pickled class, a function, a `__reduce__` payload) is refused with `UnsafeFile`:
    an artifact store is shared, and unpickling a file from it runs whatever code it holds.
    """
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UnsafeFile(f"{path}: refused: it holds more than tensors and plain data, and loading it would "
                         f"run code ({reason})") from None


def _launch_ranks(command: list[str], env: dict, hardware: Hardware) -> list[subprocess.Popen]:
    """Starts this node's ranks at once, as Lightning's launcher would one after the other.

    Lightning re-executes the script for rank 1.. only once rank 0 has imported everything and
    reached `fit`; starting them together halves the start-up (~10 s of imports) of each training.
    """
    from lightning.fabric.plugins.environments.lightning import find_free_network_port

    shared = {"MASTER_ADDR": env.get("MASTER_ADDR", "127.0.0.1"),
              "MASTER_PORT": env.get("MASTER_PORT", str(find_free_network_port())),
              "NODE_RANK": env.get("NODE_RANK", "0"), "WORLD_SIZE": str(hardware.world_size)}
    return [subprocess.Popen(command, env={**env, **shared, "LOCAL_RANK": str(rank)}) for rank in range(hardware.devices)]


def _wait(ranks: list[subprocess.Popen]) -> list[int]:
    """Exit codes of every rank; a rank that fails stops the others, which would wait for it forever, and
    an interrupted launcher stops them all."""
    try:
        while any(rank.poll() is None for rank in ranks):
            if any(rank.returncode for rank in ranks):
                break
            time.sleep(0.1)
    finally:
        for rank in ranks:
            if rank.poll() is None:
                rank.kill()
                rank.wait()
    return [rank.returncode for rank in ranks]


def _worker(path: str) -> None:
    job: TrainJob = torch.load(path, weights_only=False)
    trainer = _fit_here(job)
    if trainer.global_rank == 0:  # rank 0 hands back plain data only: the parent never unpickles it
        job.module.to("cpu")
        torch.save({"weights": job.module.state_dict(), "module": _state(job.module, public_only=True),
                    "callbacks": [_state(callback) for callback in job.callbacks]}, path + ".out")
    # Leave together and close the group: a rank that exits while gloo's threads still serve the other
    # one can abort ("terminate called without an active exception"), which a loaded machine made happen.
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    _worker(sys.argv[1])
