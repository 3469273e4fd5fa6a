"""One way to run a training, for every pipeline: build the Trainer, fit, hand back the result.

A pipeline describes each training as a `Recipe` (data, net, loss, optimizer, callbacks, budget;
`recipe(params, data, net)` fills in the common flags) and runs it with `train(recipe, run)`, which
seeds, builds the `ClassifierModule`, logs the dataset to the child run and returns a `Trained`
(module, history, callbacks by type). Underneath, a `TrainJob` bundles a LightningModule, its datamodule,
its callbacks and the hardware flags.
Where nothing can tell, Lightning is handed 8 consecutive mini-batches per training step (the same
optimizer steps, a fraction of Lightning's per-step cost: `steps_per_call`).

Every training leaves its state (weights, the module's and callbacks' plain attributes, the random
generators) as the child run's artifact `trained/<k>.pt`: a resumed run's reused child loads it
instead of training again. Under DDP every rank of the pipeline's process group
(`pipelines.distributed`) trains together, and then holds rank 0's state (callbacks that probe on
rank 0 only included), so the orchestration goes on the same on every rank.
"""
from __future__ import annotations

import logging
import random
import signal
import sys
import threading
import warnings
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable

import lightning as L
import numpy as np
import torch
from torch import nn

from datamodules.datamodule import ArrayDataModule
from modules.classifier import ClassifierModule
from pipelines.distributed import broadcast, on_rank_zero, world_size

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
    """Seeds, builds the net and its `ClassifierModule`, trains; metrics and the dataset go to `run`, and the
    trained state to its artifact trained/<k>.pt. A `reused` run (resume) hands that state back untrained."""
    data = recipe.data
    if not data.splits:
        data.setup()
    L.seed_everything(recipe.seed, verbose=False)
    net = recipe.net if isinstance(recipe.net, nn.Module) else recipe.net()
    module = ClassifierModule(net, recipe.loss, recipe.optimizer, recipe.lr, recipe.momentum, recipe.weight_decay,
                              recipe.lr_decay, eval_splits=recipe.eval_splits or data.eval_splits, fused=recipe.fused)
    callbacks = list(recipe.callbacks)
    index = run.trainings if run is not None else 0
    if run is not None:
        run.trainings += 1
    if run is not None and run.reused:
        _restore(module, callbacks, on_rank_zero(run.load_trained, index))
        return Trained(module, data, callbacks)
    if run is not None:
        run.log_dataset(data)
    fit(TrainJob(module, data, recipe.hardware, recipe.max_epochs, recipe.seed, callbacks,
                 run.id if run is not None else None, run.tracking_uri if run is not None else "",
                 recipe.max_steps, recipe.check_val_every_n_epoch, recipe.val_check_interval))
    module.to("cpu")  # the pipelines evaluate on the CPU, and a reused training is loaded there
    state = _state_of(module, callbacks)
    if world_size() > 1:  # rank 0's callbacks' state (some probe on rank 0 only) on every rank
        state = broadcast(state)
        _restore(module, callbacks, state)
    if run is not None:
        run.save_trained(index, state)
    return Trained(module, data, callbacks)


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


class _KeepSigterm(L.Callback):
    """Puts this process's SIGTERM handler back once Lightning has put its own first (at fit's start).
    Under DDP Lightning's broadcasts from inside the handler, which the other ranks, inside a gradient
    all-reduce, never answer: the run hung. The pipeline's ends this rank's runs KILLED at once, and
    its launcher (ours, torchrun, srun) stops the other ranks."""

    def __init__(self):
        self.handler = signal.getsignal(signal.SIGTERM)

    def on_train_start(self, trainer, pl_module) -> None:
        if callable(self.handler) and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self.handler)


def make_trainer(job: TrainJob) -> L.Trainer:
    from pipelines.storage import RunLogger

    job.datamodule.steps_per_call = steps_per_call(job)
    # not Lightning's MLFlowLogger: ours keeps what a tracking server that went away cannot take, and leaves
    # ending the run to the pipeline
    logger = RunLogger(job.tracking_uri, job.run_id) if job.run_id else False
    hw = job.hardware
    return L.Trainer(
        accelerator=hw.accelerator, devices=hw.devices, strategy=hw.strategy, num_nodes=hw.num_nodes,
        precision=hw.precision, max_epochs=job.max_epochs, max_steps=job.max_steps, logger=logger,
        callbacks=[*job.callbacks, _KeepSigterm()], deterministic="warn", enable_checkpointing=False, enable_model_summary=False,
        enable_progress_bar=sys.stderr.isatty(), num_sanity_val_steps=0, use_distributed_sampler=False,
        check_val_every_n_epoch=job.check_val_every_n_epoch, val_check_interval=job.val_check_interval,
        limit_val_batches=None if getattr(job.datamodule, "eval_splits", True) else 0)


def fit(job: TrainJob) -> TrainJob:
    """Trains `job.module` in this process (under DDP, with the other ranks of the pipeline's process group)."""
    if job.hardware.world_size != world_size():
        raise RuntimeError(f"{job.hardware.world_size} processes asked for, {world_size()} in the process group: "
                           f"a DDP training runs inside a pipeline launched with its --devices "
                           f"(`python -m pipelines NAME --devices N --strategy ddp`, torchrun or srun)")
    L.seed_everything(job.seed, verbose=False)
    trainer = make_trainer(job)
    trainer.fit(job.module, datamodule=job.datamodule)
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


def _attributes(obj, public_only: bool = False) -> dict:
    """The plain-data attributes of a callback (or the public ones of a module, whose private ones are
    torch's bookkeeping): what a training changes in them besides the weights."""
    values = {k: _plain(v) for k, v in vars(obj).items() if not (public_only and k.startswith("_"))}
    return {k: v for k, v in values.items() if v is not _NOT_PLAIN}


def _state_of(module: ClassifierModule, callbacks: list) -> dict:
    """What a training leaves, as plain data: weights, attributes, and the random generators' state (so a
    pipeline that goes on drawing after a reused training draws what it would have after a real one)."""
    numpy_state = np.random.get_state()
    return {"weights": module.state_dict(), "module": _attributes(module, public_only=True),
            "callbacks": [_attributes(callback) for callback in callbacks],
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                    "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]]}}


def _restore(module: ClassifierModule, callbacks: list, state: dict) -> None:
    module.load_state_dict(state["weights"])
    for obj, values in ((module, state["module"]), *zip(callbacks, state["callbacks"])):
        for name, value in values.items():
            current = getattr(obj, name, None)  # an enum came as its value: back to its member
            setattr(obj, name, type(current)(value) if isinstance(current, Enum) else value)
    rng = state["rng"]
    torch.set_rng_state(rng["torch"])
    random.setstate((rng["python"][0], tuple(rng["python"][1]), rng["python"][2]))
    kind, keys, *rest = rng["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))


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
