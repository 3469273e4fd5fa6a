"""ClassifierModule: supervised training of any nn.Module, the one LightningModule of the project.

Losses: cross-entropy, squared loss against one-hot targets, hinge (multi-class margin; for a
single output, labels 0/1 become -1/+1). Optimizers: SGD with momentum, Adam; weight decay and an
optional per-epoch exponential learning-rate decay (Zhang et al.'s 0.95). `fused=True` selects torch's
one-kernel update (on the CPU, Adam's foreach update takes the slow path of sqrt on the exact zeros
that pruned weights leave in its state: 1.4x a dense step for LeNet-300-100 at 20% of the weights).

The training step is written out (Lightning's manual optimization): zero the gradients, forward,
backward, one optimizer step, for the (x, y) mini-batch it is given or for each mini-batch of a
list of them (`pipelines.training` groups consecutive mini-batches where nothing can tell).
Lightning's automatic-optimization closure around the same four lines made an epoch of
FC 784-200-200-10 at batch 128 on 2 CPU cores 1.5-1.7x a plain PyTorch loop instead of
1.4x (`benchmarks/lightning_epoch.py`, one mini-batch per step). `trainer.global_step`
still counts optimizer steps, and the per-epoch learning-rate decay is stepped here at each epoch's end.

Per epoch it logs `train_loss`, `train_acc` (running over the epoch) and, for each evaluation
split the datamodule names, `<split>_loss` and `<split>_acc`. Each step only keeps its loss and
number correct as tensors on the device; they are summed and reduced across DDP ranks once per
epoch, so the hot path does no logging and no synchronization. `history` keeps the same numbers
per epoch for the pipelines (identical on every rank).
"""
from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

LOSSES = ("cross_entropy", "squared", "hinge")


def loss_fn(name: str, outputs: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    if name == "cross_entropy":
        return F.cross_entropy(outputs, y, reduction=reduction)
    if name == "squared":
        target = F.one_hot(y, outputs.shape[1]).to(outputs.dtype)
        per_example = ((outputs - target) ** 2).sum(dim=1)
        return per_example.mean() if reduction == "mean" else per_example.sum() if reduction == "sum" else per_example
    if name == "hinge":
        if outputs.shape[1] == 1:
            per_example = torch.clamp(1 - (2 * y.to(outputs.dtype) - 1) * outputs[:, 0], min=0)
            return per_example.mean() if reduction == "mean" else per_example.sum() if reduction == "sum" else per_example
        return F.multi_margin_loss(outputs, y, reduction=reduction)
    raise ValueError(f"unknown loss {name!r}")


def predictions(outputs: torch.Tensor) -> torch.Tensor:
    """Predicted class; a single output predicts 1 when positive (f(x) = 0 counts as wrong for both)."""
    if outputs.shape[1] == 1:
        return torch.where(outputs[:, 0] > 0, 1, torch.where(outputs[:, 0] < 0, 0, -1))
    return outputs.argmax(dim=1)


class ClassifierModule(L.LightningModule):
    def __init__(self, net: nn.Module, loss: str = "cross_entropy", optimizer: str = "sgd", lr: float = 0.01,
                 momentum: float = 0.9, weight_decay: float = 0.0, lr_decay: float = 1.0,
                 eval_splits: tuple[str, ...] = ("val", "test"), fused: bool = False):
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; choose from {', '.join(LOSSES)}")
        self.net = net
        self.loss_name, self.optimizer_name, self.lr, self.momentum = loss, optimizer, lr, momentum
        self.weight_decay, self.lr_decay, self.eval_splits = weight_decay, lr_decay, tuple(eval_splits)
        self.fused = fused  # one-kernel optimizer update (torch's `fused=True`); off keeps torch's default
        self.automatic_optimization = False  # see the module docstring
        self.history: list[dict[str, float]] = []
        self._steps: dict[str, list[tuple[torch.Tensor, torch.Tensor, int]]] = {}  # split -> (mean loss, correct, n)

    def __setattr__(self, name: str, value) -> None:
        # Lightning names the running hook here around every hook call (a dozen times per optimizer
        # step); nn.Module's __setattr__ (the parameter/buffer/submodule bookkeeping) is not needed for a string.
        if name == "_current_fx_name":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        fused = True if self.fused else None
        if self.optimizer_name == "adam":
            optimizer = torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay, fused=fused)
        else:
            optimizer = torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay,
                                        fused=fused)
        if self.lr_decay == 1.0:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.ExponentialLR(optimizer, self.lr_decay)}

    def _accumulate(self, split: str, outputs: torch.Tensor, y: torch.Tensor, loss: torch.Tensor) -> None:
        correct = (predictions(outputs.detach()) == y).sum()
        self._steps.setdefault(split, []).append((loss.detach(), correct, len(y)))

    def training_step(self, batch, batch_idx):
        # One (x, y) mini-batch, or a list of consecutive ones: an optimizer step each.
        optimizer = self.optimizers()
        for x, y in batch if isinstance(batch, list) else [batch]:
            optimizer.zero_grad()
            outputs = self(x)
            loss = loss_fn(self.loss_name, outputs, y)
            self.manual_backward(loss)
            optimizer.step()
            self._accumulate("train", outputs, y, loss)
        return loss

    def validation_step(self, batch, batch_idx, dataloader_idx: int = 0):
        x, y = batch
        outputs = self(x)
        self._accumulate(self.eval_splits[dataloader_idx], outputs, y, loss_fn(self.loss_name, outputs, y))

    def _flush(self, splits) -> None:
        metrics = {}
        for split in splits:
            if split not in self._steps:
                continue
            losses, correct, counts = zip(*self._steps.pop(split))
            n = torch.tensor(counts, device=losses[0].device)
            sums = torch.stack([(torch.stack(losses).float() * n).sum(), torch.stack(correct).sum().float(),
                                n.sum().float()])
            loss_sum, correct_sum, count = self.trainer.strategy.reduce(sums, reduce_op="sum").tolist()
            metrics[f"{split}_loss"], metrics[f"{split}_acc"] = loss_sum / count, correct_sum / count
        if not metrics:
            return
        self.log_dict(metrics, on_epoch=True, sync_dist=False)
        if self.history and self.history[-1]["epoch"] == self.current_epoch:
            self.history[-1].update(metrics)
        else:
            self.history.append({"epoch": self.current_epoch, "step": self.global_step, **metrics})

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self._flush(self.eval_splits)
        self._steps = {k: v for k, v in self._steps.items() if k == "train"}

    def on_train_epoch_end(self) -> None:
        self._flush(("train",))
        if self.lr_decay != 1.0:
            self.lr_schedulers().step()

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor, batch_size: int = 2048) -> tuple[float, float]:
        """(mean loss, accuracy) of the net in eval mode on tensors, outside any Trainer."""
        was_training = self.training
        self.eval()
        loss, correct = 0.0, 0
        device = next(self.parameters()).device
        for start in range(0, len(y), batch_size):
            xb, yb = x[start:start + batch_size].to(device), y[start:start + batch_size].to(device)
            outputs = self(xb)
            loss += loss_fn(self.loss_name, outputs, yb, "sum").item()
            correct += (predictions(outputs) == yb).sum().item()
        self.train(was_training)
        return loss / len(y), correct / len(y)
