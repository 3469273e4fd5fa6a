"""Cost of a Lightning epoch against a plain PyTorch loop over the same in-memory batches.

    python benchmarks/lightning_epoch.py [--epochs 12] [--dataloader]

FC 784-200-200-10 on mnist5k at batch 128, SGD with momentum, CPU. Both sides see the same
ready-made batches (datamodules.TensorBatches); the Lightning side goes through our Trainer
(pipelines.training.make_trainer) and ClassifierModule with its per-epoch metrics. Epochs are
timed by a callback that runs one plain epoch before every Lightning epoch (so that a busy or
drifting machine slows both sides alike); the first (warm-up) epoch of each side is dropped and
the medians compared. Prints
`lightning_epoch_ratio=<Lightning epoch / plain epoch>`; with `--dataloader` also the ratio of a
plain loop fed by a TensorDataset + DataLoader, the usual way.
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
    """Before each Lightning epoch, one plain epoch of a twin net: machine drift hits both sides alike."""

    def __init__(self, plain_net, batches):
        self.plain_net, self.batches = plain_net, batches
        self.optimizer = torch.optim.SGD(plain_net.parameters(), lr=0.01, momentum=0.9)
        self.plain: list[float] = []
        self.lightning: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module):
        self.plain.append(plain_epoch(self.plain_net, self.optimizer, self.batches))
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        self.lightning.append(time.perf_counter() - self._start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--dataloader", action="store_true", help="also time a TensorDataset + DataLoader loop")
    args = parser.parse_args()

    datamodule = ArrayDataModule("mnist5k", batch_size=128, eval_splits=())
    datamodule.setup()
    net = lambda: build_net("fc", datamodule.input_shape, datamodule.num_classes, widths=(200, 200))
    torch.manual_seed(0)
    timer = Interleaved(net(), datamodule.loader("train", shuffle=True))
    torch.manual_seed(0)
    module = ClassifierModule(net(), lr=0.01, eval_splits=())
    make_trainer(TrainJob(module, datamodule, Hardware(), args.epochs, callbacks=[timer])).fit(module, datamodule=datamodule)
    plain, lightning = statistics.median(timer.plain[1:]), statistics.median(timer.lightning[1:])
    print(f"plain_epoch_ms={plain * 1e3:.1f} lightning_epoch_ms={lightning * 1e3:.1f} "
          f"threads={torch.get_num_threads()}")
    print(f"lightning_epoch_ratio={lightning / plain:.2f}")
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
