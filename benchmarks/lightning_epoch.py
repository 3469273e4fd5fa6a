"""Cost of a Lightning epoch against a plain PyTorch loop over the same in-memory batches.

    python benchmarks/lightning_epoch.py [--epochs 20] [--dataloader]

FC 784-200-200-10 on mnist5k at batch 128, SGD with momentum, CPU. Both sides see the same
ready-made batches (datamodules.TensorBatches); the Lightning side goes through our Trainer
(pipelines.training.make_trainer) and ClassifierModule with its per-epoch metrics. A callback
runs one plain epoch at the start of every Lightning epoch (so that a busy or drifting machine
slows both sides alike); a Lightning epoch is timed from there to the start of the next one, so
it includes the epoch's end (metrics reduced and logged, learning-rate schedule) and the loader's
restart. The first (warm-up) epoch of each side is dropped and the medians compared. Prints
`lightning_epoch_ratio=<Lightning epoch / plain epoch>` as the pipelines train (8 mini-batches per
Lightning training step, see pipelines.training.steps_per_call), then
`lightning_epoch_ratio_one_batch_per_step=` for one mini-batch per Lightning step (as under DDP or
with a callback that hooks into single batches); with `--dataloader` also the ratio of a plain
loop fed by a TensorDataset + DataLoader, the usual way.
"""
from __future__ import annotations

import argparse
import statistics
import time

import lightning as L
import torch
import torch.nn.functional as F

from datamodules.datamodule import ArrayDataModule
from modules.classifier import ClassifierModule
from modules.nets import build_net
from pipelines.training import Hardware, TrainJob, make_trainer


def plain_epoch(net, optimizer, batches) -> float:
    start = time.perf_counter()
    for x, y in batches:
        optimizer.zero_grad()
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start


class Interleaved(L.Callback):
    """At each Lightning epoch's start, one plain epoch of a twin net: machine drift hits both sides alike."""

    def __init__(self, plain_net, batches):
        self.plain_net, self.batches = plain_net, batches
        self.optimizer = torch.optim.SGD(plain_net.parameters(), lr=0.01, momentum=0.9)
        self.plain: list[float] = []
        self.lightning: list[float] = []
        self._start: float | None = None

    def on_train_epoch_start(self, trainer, pl_module):
        if self._start is not None:  # the previous Lightning epoch, from its start to here
            self.lightning.append(time.perf_counter() - self._start)
        self.plain.append(plain_epoch(self.plain_net, self.optimizer, self.batches))
        self._start = time.perf_counter()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--dataloader", action="store_true", help="also time a TensorDataset + DataLoader loop")
    args = parser.parse_args()

    datamodule = ArrayDataModule("mnist5k", batch_size=128, eval_splits=())
    datamodule.setup()
    net = lambda: build_net("fc", datamodule.input_shape, datamodule.num_classes, widths=(200, 200))
    for name, steps_per_call in (("lightning_epoch_ratio", TrainJob.steps_per_call),
                                 ("lightning_epoch_ratio_one_batch_per_step", 1)):
        torch.manual_seed(0)
        timer = Interleaved(net(), datamodule.loader("train", shuffle=True))
        torch.manual_seed(0)
        module = ClassifierModule(net(), lr=0.01, eval_splits=())
        job = TrainJob(module, datamodule, Hardware(), args.epochs, callbacks=[timer], steps_per_call=steps_per_call)
        make_trainer(job).fit(module, datamodule=datamodule)
        plain = statistics.median(timer.plain[1:])
        lightning = statistics.median(timer.lightning[1:])
        print(f"plain_epoch_ms={plain * 1e3:.1f} lightning_epoch_ms={lightning * 1e3:.1f} "
              f"steps_per_call={datamodule.steps_per_call} threads={torch.get_num_threads()}")
        print(f"{name}={lightning / plain:.2f}")
    if args.dataloader:
        dataset = torch.utils.data.TensorDataset(*datamodule.splits["train"])
        loader = torch.utils.data.DataLoader(dataset, batch_size=128, shuffle=True)
        torch.manual_seed(0)
        plain_net = net()
        optimizer = torch.optim.SGD(plain_net.parameters(), lr=0.01, momentum=0.9)
        dataloader = statistics.median([plain_epoch(plain_net, optimizer, loader) for _ in range(args.epochs)][1:])
        print(f"dataloader_epoch_ratio={dataloader / plain:.2f}")


if __name__ == "__main__":
    main()
