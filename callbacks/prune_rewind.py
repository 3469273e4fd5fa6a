"""Iterative magnitude pruning with rewinding: the lottery-ticket procedure of Frankle & Carbin (2019).

    pruner = PruneRewind(PruneRates(conv=0.1, fc=0.2, output=0.1), pruning="layerwise", rewind_step=0)
    trace = EarlyStopTrace()
    for round in range(rounds + 1):   # round 0 trains the dense net
        Trainer(callbacks=[trace, pruner], ...).fit(module)   # ends pruned and rewound: the next ticket

`PruneRewind` records theta_0 (the initialization) and theta_k (the weights after `rewind_step`
iterations; k = 0 is theta_0). At the end of a training it removes, of each layer's surviving weights,
those of smallest magnitude: a fraction that depends on the layer's kind (`PruneRates`: the paper
prunes conv layers at 10% or 15%, fully connected ones at 20%, the output layer at 10%), ranked
layer by layer or globally (across the layers of a kind). Then it rewinds the survivors to theta_k.
Biases and BatchNorm are never pruned.
The controls: `random_masks` (the same per-layer sparsity, positions drawn from a seed) and
`apply(net, masks, theta)` with a fresh initialization (random re-initialization).

The masks are torch.nn.utils.prune's re-parametrization: a prunable layer's parameter is
`weight_orig`, its buffer `weight_mask`, and `weight = weight_orig * weight_mask` is recomputed
before every forward. So a pruned weight is exactly zero in every forward; the gradient of its
`weight_orig` entry is exactly zero; `apply` zeroes that entry too, so SGD/Adam state (fed only zero
gradients) and weight decay never revive it. Optimizer state from before a pruning (a resumed
checkpoint) is masked too, at the start and end of every training (`hold_masks`). Masks are buffers, hence in every state_dict and
checkpoint. Such a state_dict loads into a fresh net once `prepare(net)` has installed all-ones
masks; the callback does that in `setup`, before Lightning restores a checkpoint, so
`fit(ckpt_path=...)` resumes with the masks (ECOSYSTEM.md: plain prune checkpoints do not load).

Under DDP the weights agree on every rank, so magnitude masks agree; the masks are still broadcast
from rank 0 after pruning, and random masks come from a seeded generator, the same in any process.
`rank_digests` records, at the start and end of every training, one mask digest per rank (gathered:
every rank holds all of them). So every rank holds the same masks, theta_0, theta_k and digests,
under a plain `Trainer(strategy="ddp")` too (examples/prune_rewind.py); `EarlyStopTrace` as well
(its metrics are reduced over the ranks, and every rank measures the whole test split).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.nn.utils import prune

PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
PRUNINGS = ("layerwise", "global")


def prunable_layers(net: nn.Module) -> dict[str, nn.Module]:
    """The layers whose weights may be pruned, in forward order (nets.py registers them so): the last is the output."""
    return {name: m for name, m in net.named_modules() if isinstance(m, PRUNABLE)}


def prepare(net: nn.Module) -> nn.Module:
    """Installs all-ones masks on every prunable layer that has none (idempotent); returns `net`."""
    for layer in prunable_layers(net).values():
        if not prune.is_pruned(layer):
            prune.identity(layer, "weight")
    return net


def masks(net: nn.Module) -> dict[str, torch.Tensor]:
    """{layer name: its weight mask} (the live buffers; clone to keep)."""
    return {name: layer.weight_mask for name, layer in prunable_layers(net).items()}


def theta(net: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every parameter and buffer except the masks: what rewinding restores."""
    return {k: v.detach().clone() for k, v in net.state_dict().items() if not k.endswith("_mask")}


@torch.no_grad()
def apply(net: nn.Module, new_masks: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]) -> None:
    """Installs `new_masks` and sets the net to `weights` under them: survivors take their values, pruned entries 0."""
    net.load_state_dict({**net.state_dict(), **weights})
    for name, layer in prunable_layers(net).items():
        layer.weight_mask.copy_(new_masks[name])
    hold_masks(net)


@torch.no_grad()
def hold_masks(net: nn.Module, optimizers=()) -> None:
    """Zeroes the pruned entries of `weight_orig` and of the optimizers' state tensors shaped like it (Adam's
    moments, SGD's momentum): state left from before a pruning (a checkpoint, say) would otherwise revive them."""
    for layer in prunable_layers(net).values():
        layer.weight_orig.mul_(layer.weight_mask)
        layer.weight = layer.weight_orig * layer.weight_mask  # what the next forward computes anyway
        for optimizer in optimizers:
            for value in optimizer.state.get(layer.weight_orig, {}).values():
                if torch.is_tensor(value) and value.shape == layer.weight_mask.shape:
                    value.mul_(layer.weight_mask)


@dataclass(frozen=True)
class PruneRates:
    """The fraction of its surviving weights a layer loses per round, by kind: conv, fully connected (fc), or the
    output layer (the last). The defaults are Frankle & Carbin's for LeNet-300-100 (fc 20%, output 10%), with
    conv layers at the fc rate; their Conv-2/4 prune conv layers at 10%, Conv-6 at 15%."""

    conv: float = 0.2
    fc: float = 0.2
    output: float = 0.1

    def __post_init__(self):
        for kind, rate in asdict(self).items():
            if not 0 < rate < 1:
                raise ValueError(f"{kind} rate {rate} is outside (0, 1)")


def layer_kinds(net: nn.Module) -> dict[str, str]:
    """{prunable layer: "conv", "fc" or "output"}; the output layer is the last one, whatever its type."""
    layers = prunable_layers(net)
    output = list(layers)[-1]
    return {name: "output" if name == output else "fc" if isinstance(layer, nn.Linear) else "conv"
            for name, layer in layers.items()}


def layer_rates(net: nn.Module, rates: PruneRates) -> dict[str, float]:
    """{prunable layer: the fraction of its surviving weights one round removes}."""
    return {name: getattr(rates, kind) for name, kind in layer_kinds(net).items()}


def pruning_groups(kinds: dict[str, str], rates: PruneRates, pruning: str) -> list[tuple[list[str], float]]:
    """[(layers ranked together, their rate)]: each layer alone (layerwise), or the layers of each kind together
    (global), so that every kind loses exactly its rate."""
    if pruning == "layerwise":
        return [([name], getattr(rates, kind)) for name, kind in kinds.items()]
    groups: dict[str, list[str]] = {}
    for name, kind in kinds.items():
        groups.setdefault(kind, []).append(name)
    return [(names, getattr(rates, kind)) for kind, names in groups.items()]


def pruned_count(surviving: int, rate: float) -> int:
    """How many of `surviving` weights one round removes."""
    return round(rate * surviving)


@torch.no_grad()
def magnitude_masks(net: nn.Module, rates: PruneRates | float, pruning: str = "layerwise") -> dict[str, torch.Tensor]:
    """New masks that remove its rate of each group's surviving weights, those of smallest |w| (a float
    `rates`: every layer, the output too, at that rate)."""
    if not isinstance(rates, PruneRates):
        rates = PruneRates(rates, rates, rates)
    layers = prunable_layers(net)
    out = {}
    for names, group_rate in pruning_groups(layer_kinds(net), rates, pruning):
        old = [layers[n].weight_mask for n in names]
        scores = torch.cat([torch.where(m.bool(), layers[n].weight_orig.abs(), -1.0).flatten()
                            for n, m in zip(names, old)])  # pruned entries rank below every survivor
        surviving = int(sum(m.sum().item() for m in old))
        keep = torch.zeros_like(scores)
        keep[torch.topk(scores, surviving - pruned_count(surviving, group_rate)).indices] = 1
        for n, m, part in zip(names, old, keep.split([m.numel() for m in old])):
            out[n] = part.view_as(m)
    return out


def random_masks(like: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Masks with the per-layer number of survivors of `like` at positions drawn from `seed` (the same in any process)."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name, m in like.items():
        keep = torch.zeros(m.numel(), dtype=m.dtype)
        keep[torch.randperm(m.numel(), generator=generator)[: int(m.sum().item())]] = 1
        out[name] = keep.view_as(m).to(m.device)
    return out


def sparsity_report(net: nn.Module, rates: PruneRates | None = None) -> dict[str, dict]:
    """{layer: {"weights", "remaining", "percent_remaining"}} plus "total" over all prunable weights; with
    `rates`, each layer also says its "kind" and its "prune_rate" per round."""
    rows = {name: (m.numel(), int(m.sum().item())) for name, m in masks(net).items()}
    rows["total"] = (sum(n for n, _ in rows.values()), sum(r for _, r in rows.values()))
    report = {name: {"weights": n, "remaining": r, "percent_remaining": 100.0 * r / n} for name, (n, r) in rows.items()}
    if rates is not None:
        for name, kind in layer_kinds(net).items():
            report[name] = {"kind": kind, "prune_rate": getattr(rates, kind), **report[name]}
    return report


def _digest(net: nn.Module) -> torch.Tensor:
    """Per layer: the number of survivors and a position-weighted sum; equal digests = equal masks."""
    rows = []
    for m in masks(net).values():
        flat = m.detach().flatten().double()
        rows += [flat.sum(), (flat * torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=flat.device)).sum()]
    return torch.stack(rows)


class PruneRewind(Callback):
    """Records theta_0 and theta_k; at the end of a training prunes by magnitude and rewinds (when `prune_at_end`)."""

    def __init__(self, rates: PruneRates = PruneRates(), pruning: str = "layerwise", rewind_step: int = 0,
                 prune_at_end: bool = True):
        if pruning not in PRUNINGS:
            raise ValueError(f"unknown pruning {pruning!r}; choose from {', '.join(PRUNINGS)}")
        self.rates, self.pruning = rates, pruning
        self.rewind_step, self.prune_at_end = rewind_step, prune_at_end
        self.theta_0: dict[str, torch.Tensor] | None = None
        self.theta_k: dict[str, torch.Tensor] | None = None
        self.rank_digests: list[list[list[float]]] = []  # per check: one digest per rank

    def setup(self, trainer, pl_module, stage: str) -> None:
        prepare(pl_module.net)  # before Lightning restores a checkpoint, whose state_dict holds masks

    def on_train_start(self, trainer, pl_module) -> None:
        if self.theta_0 is None:
            self.theta_0 = _to_cpu(theta(pl_module.net))
            if self.rewind_step == 0:
                self.theta_k = self.theta_0
        hold_masks(pl_module.net, trainer.optimizers)  # e.g. optimizer state resumed from a checkpoint
        self._record_digests(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.theta_k is None and trainer.global_step == self.rewind_step:
            self.theta_k = _to_cpu(theta(pl_module.net))

    def on_train_end(self, trainer, pl_module) -> None:
        if self.prune_at_end:
            if self.theta_k is None:
                raise RuntimeError(f"training ended at iteration {trainer.global_step}, before rewind_step {self.rewind_step}")
            net = pl_module.net
            new = magnitude_masks(net, self.rates, self.pruning)
            new = trainer.strategy.broadcast(_to_cpu(new))  # rank 0's masks everywhere (the weights agree anyway)
            device = next(net.parameters()).device
            apply(net, {k: v.to(device) for k, v in new.items()},
                  {k: v.to(device) for k, v in self.theta_k.items()})
            hold_masks(net, trainer.optimizers)  # a checkpoint saved now carries clean optimizer state
        self._record_digests(trainer, pl_module)

    def _record_digests(self, trainer, pl_module) -> None:
        gathered = trainer.strategy.all_gather(_digest(pl_module.net))
        self.rank_digests.append(gathered.reshape(trainer.world_size, -1).tolist())

    def state_dict(self) -> dict:
        return {"theta_0": self.theta_0, "theta_k": self.theta_k}

    def load_state_dict(self, state_dict: dict) -> None:
        self.theta_0, self.theta_k = state_dict["theta_0"], state_dict["theta_k"]


def _to_cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.cpu() for k, v in state.items()}


class EarlyStopTrace(Callback):
    """The paper's early-stopping criterion, without stopping: the iteration of minimum validation loss.

    At every validation it records (iteration, val_loss, test_acc) from the module's logged metrics;
    at the end of training it measures the final test accuracy (before a `PruneRewind` listed after
    it prunes). The test set is only read, never used to choose.
    """

    def __init__(self):
        self.points: list[dict[str, float]] = []
        self.final_test_acc: float | None = None

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        self.points.append({"iteration": trainer.global_step, "val_loss": float(metrics["val_loss"]),
                            "test_acc": round(float(metrics["test_acc"]), 6)})  # a float32 ratio

    def on_train_end(self, trainer, pl_module) -> None:
        x, y = trainer.datamodule.splits["test"]
        self.final_test_acc = pl_module.evaluate(x, y)[1]

    def result(self) -> dict[str, float]:
        """{"early_stop_iter", "val_loss_at_early_stop", "test_acc_at_early_stop", "final_test_acc"}."""
        best = min(self.points, key=lambda p: p["val_loss"])
        return {"early_stop_iter": best["iteration"], "val_loss_at_early_stop": best["val_loss"],
                "test_acc_at_early_stop": best["test_acc"], "final_test_acc": self.final_test_acc}
