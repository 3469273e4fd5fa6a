"""Per-example learning and forgetting, and the critical sample ratio (Arpit et al. 2017; Toneva et al. 2019).

    tracker = MemorizationTracker(csr_examples=256)
    fit(TrainJob(module, datamodule, ..., callbacks=[tracker, ...]))
    tracker.statistics()   # learned_epoch, forgetting_events, never_forgotten per training example

After every training epoch the tracker classifies the whole training set once with the net in eval
mode (the one extra pass per epoch) and keeps which examples are correct. From that record:
- learned epoch: the first epoch after which the example is correct at every later epoch
  (epochs count from 1; NOT_LEARNED when it is wrong after the last epoch);
- forgetting events: correct after epoch e-1, wrong after epoch e (Toneva et al.);
- never forgotten: correct at least once and never forgotten.
Arpit's "learned in the first epoch and always correct afterwards" is `learned_epoch == 1`.

Critical sample ratio (CSR): on a fixed random subset of the training set, the share of points x
whose predicted class changes somewhere in the L-infinity box of radius r around x, searched by
Arpit's Langevin adversarial sample search: up to `iterations` steps of
x' <- clip_box(x' + step * sign(grad) + noise * N(0, 1)), the gradient being that of the loss of
the class predicted at x (descending its score). The protocol's step 0.25/255, noise 0.2/255 and
radius 0.3/255 are in [0, 1] pixel units; the datamodule standardizes inputs by one global std,
so they are divided by `datamodule.input_std` before use. Under DDP, only rank 0 evaluates, with
`pl_module.net` (never the DDP wrapper) and no collectives; the others wait at the next step.
The search draws its noise from its own generator, so tracking never changes the training.
"""
from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F

from modules.classifier import predictions

NOT_LEARNED = -1
PROTOCOL = {"step": 0.25 / 255, "noise": 0.2 / 255, "radius": 0.3 / 255, "iterations": 100}  # [0, 1] pixel units


def learned_epoch(correct: torch.Tensor) -> torch.Tensor:
    """correct: (epochs, examples) bool -> the epoch (from 1) after which each example stays correct."""
    epochs = correct.shape[0]
    trailing = correct.flip(0).long().cumprod(0).sum(0)  # how many final epochs it was correct in a row
    return torch.where(trailing > 0, epochs - trailing + 1, NOT_LEARNED)


def forgetting_events(correct: torch.Tensor) -> torch.Tensor:
    """Correct-to-wrong flips between consecutive epochs, per example."""
    return (correct[:-1] & ~correct[1:]).sum(0)


@torch.no_grad()
def _predict(net: torch.nn.Module, x: torch.Tensor, batch_size: int = 2048) -> torch.Tensor:
    return torch.cat([predictions(net(x[i:i + batch_size])) for i in range(0, len(x), batch_size)])


def critical_samples(net: torch.nn.Module, x: torch.Tensor, step: float, noise: float, radius: float,
                     iterations: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mask of the points of `x` whose predicted class flips inside the box (all in x's units).

    One forward pass per iteration serves both the flip test of the previous move and the
    gradient of the next; points that flipped leave the search.
    """
    predicted = _predict(net, x)
    critical = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    active = torch.arange(len(x), device=x.device)
    moved = x.clone()
    for iteration in range(iterations + 1):
        probe = moved[active].requires_grad_(True)
        with torch.enable_grad():
            outputs = net(probe)
            if iteration > 0:
                flipped = predictions(outputs.detach()) != predicted[active]
                critical[active[flipped]] = True
            loss = F.cross_entropy(outputs, predicted[active], reduction="sum")
            (grad,) = torch.autograd.grad(loss, probe)
        if iteration > 0:
            keep = ~flipped
            active, grad, probe = active[keep], grad[keep], probe[keep]
        if iteration == iterations or len(active) == 0:
            break
        kick = torch.randn(probe.shape, generator=generator, device="cpu").to(x.device)
        proposal = probe.detach() + step * grad.sign() + noise * kick
        moved[active] = x[active] + (proposal - x[active]).clamp(-radius, radius)
    return critical


class MemorizationTracker(L.Callback):
    """Per-example correctness after every epoch, and the CSR of a fixed subset every `csr_every` epochs.

    Results are plain attributes: `correct` (epochs x examples, bool), `csr` [(epoch, ratio)]; under DDP
    on global rank 0 only (empty on the other ranks, unless `pipelines.training.train` gave them rank 0's).
    """

    def __init__(self, csr_examples: int = 256, csr_every: int = 1, seed: int = 0, step: float = PROTOCOL["step"],
                 noise: float = PROTOCOL["noise"], radius: float = PROTOCOL["radius"],
                 iterations: int = PROTOCOL["iterations"]):
        self.csr_examples, self.csr_every, self.seed = csr_examples, csr_every, seed
        self.step, self.noise, self.radius, self.iterations = step, noise, radius, iterations
        self._correct: list[torch.Tensor] = []
        self.csr: list[tuple[int, float]] = []

    @property
    def correct(self) -> torch.Tensor:
        return torch.stack(self._correct) if self._correct else torch.zeros(0, 0, dtype=torch.bool)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_rank != 0:
            return
        epoch = trainer.current_epoch + 1
        datamodule = trainer.datamodule
        x, y = datamodule.splits["train"]
        net = pl_module.net
        was_training = net.training
        net.eval()
        self._correct.append((_predict(net, x) == y).cpu())
        if self.csr_examples and epoch % self.csr_every == 0:
            self.csr.append((epoch, self.critical_sample_ratio(net, x, datamodule.input_std)))
        net.train(was_training)

    def subset(self, n: int) -> torch.Tensor:
        """The fixed training examples the CSR is measured on."""
        generator = torch.Generator().manual_seed(self.seed)
        return torch.randperm(n, generator=generator)[: self.csr_examples]

    def critical_sample_ratio(self, net: torch.nn.Module, x: torch.Tensor, input_std: float) -> float:
        generator = torch.Generator().manual_seed(self.seed * 7919 + len(self.csr))
        points = x[self.subset(len(x)).to(x.device)]
        scale = 1.0 / input_std  # [0, 1] pixel units -> standardized units
        critical = critical_samples(net, points, self.step * scale, self.noise * scale, self.radius * scale,
                                    self.iterations, generator)
        return critical.float().mean().item()

    def statistics(self) -> dict[str, torch.Tensor]:
        """Per training example: learned_epoch, forgetting_events, never_forgotten."""
        correct = self.correct
        forgotten = forgetting_events(correct)
        return {"learned_epoch": learned_epoch(correct), "forgetting_events": forgotten,
                "never_forgotten": correct.any(0) & (forgotten == 0)}
