"""Layer robustness probe of Zhang, Bengio & Singer, "Are all layers created equal?".

    probe = RewindProbe(checkpoints=(0, 1, 2, 3, 5, 10))   # then trainer.fit(...); probe.result

During training it keeps every layer's state at the epochs in `checkpoints` (0 = before any
update) and at the final epoch. At the end of training (and every `probe_every` epochs) it
measures the test error of the trained net with one layer alone changed, for every layer:
- re-initialization to checkpoint tau: the layer takes its values at epoch tau, the others stay;
- re-randomization: the layer is drawn afresh from its own initializer, the module's
  `reset_parameters()` (PyTorch's default init, which is how `modules.nets` builds every net),
  under a fixed seed per layer, never a stand-in such as uniform [0, 1) or randn.

Layers are the parameterized modules (Linear, Conv) in forward order; a ResNet's stem, each conv
of each block, its shortcut convs and the classifier are each a layer. A normalization module
(BatchNorm) belongs to the layer just before it: its scale and statistics were learned for that
layer's outputs, so the pair is rewound and re-randomized together (statistics included).

The probe runs on rank 0 only, on a deep copy of `pl_module.net` (no collectives): the trained net
is never changed. Results stay on the callback as plain numbers (`probes`, `result`, `distance`),
so they survive the DDP round trip of `pipelines.training`.
"""
from __future__ import annotations

import copy

import lightning as L
import torch
from torch import nn

from modules.classifier import predictions

LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.LayerNorm)
KIND = {nn.Linear: "fc"}  # anything else in LAYER_TYPES is a conv
RERANDOMIZE_SALT = 1_234_567_891


def layers(net: nn.Module) -> dict[str, list[nn.Module]]:
    """{layer name: [module, its normalization if any]} in forward order.

    A layer is named by its path in the net when the net names its modules (ResNet: `conv1`,
    `layer1.0.conv1`, ..., `fc`), else by kind and position (`fc1`..`fc4`; VGG: `conv1`.., `fc1`).
    """
    found: dict[str, list[nn.Module]] = {}
    counts: dict[str, int] = {}
    last = None
    for path, module in net.named_modules():
        if isinstance(module, LAYER_TYPES):
            kind = KIND.get(type(module), "conv")
            counts[kind] = counts.get(kind, 0) + 1
            last = path if any(c.isalpha() for c in path) else f"{kind}{counts[kind]}"
            found[last] = [module]
        elif isinstance(module, NORM_TYPES) and last is not None:
            found[last].append(module)
    return found


def layer_state(modules: list[nn.Module]) -> list[dict[str, torch.Tensor]]:
    """A CPU copy of the layer's parameters and buffers (one state dict per module)."""
    return [{k: v.detach().to("cpu", copy=True) for k, v in m.state_dict().items()} for m in modules]


def load_layer_state(modules: list[nn.Module], state: list[dict[str, torch.Tensor]]) -> None:
    for module, values in zip(modules, state):
        module.load_state_dict(values)


def rerandomized_state(modules: list[nn.Module], seed: int) -> list[dict[str, torch.Tensor]]:
    """The layer drawn afresh from its own initializer (`reset_parameters`), reproducibly from `seed`.

    Drawn on a CPU copy inside a forked RNG, so the training's random stream is left untouched.
    """
    fresh = [copy.deepcopy(m).to("cpu") for m in modules]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in fresh:
            module.reset_parameters()
    return layer_state(fresh)


def _parameters(state: list[dict[str, torch.Tensor]], modules: list[nn.Module]) -> torch.Tensor:
    """The layer's trainable values (not the normalization statistics) as one flat vector."""
    names = [{n for n, _ in m.named_parameters()} for m in modules]
    return torch.cat([v.flatten().float() for s, keep in zip(state, names) for k, v in s.items() if k in keep])


@torch.no_grad()
def error_rate(net: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 2048) -> float:
    """Share of misclassified examples, with `net` in eval mode."""
    net.eval()
    wrong = sum((predictions(net(x[i:i + batch_size])) != y[i:i + batch_size]).sum().item()
                for i in range(0, len(y), batch_size))
    return wrong / len(y)


class RewindProbe(L.Callback):
    """Re-initialization / re-randomization robustness of every layer; see the module docstring.

    `probes`: one result per probe, {"epoch", "baseline_error", "reinit": {layer: {epoch: error}},
    "rerandomize": {layer: error}}; `result` is the last (end of training). `distance`:
    {layer: {epoch: ||theta_epoch - theta_0||}} and `relative_distance` (divided by ||theta_0||).
    """

    def __init__(self, checkpoints: tuple[int, ...] = (0, 1, 2, 3, 5, 10), probe_every: int = 0,
                 split: str = "test", seed: int = 0):
        self.checkpoint_epochs = tuple(checkpoints)
        self.probe_every, self.split, self.seed = probe_every, split, seed
        self.states: dict[int, dict[str, list]] = {}  # epoch -> layer -> state (rank 0 only)
        self.probes: list[dict] = []
        self.distance: dict[str, dict[int, float]] = {}
        self.relative_distance: dict[str, dict[int, float]] = {}
        self.layer_names: list[str] = []

    @property
    def result(self) -> dict | None:
        return self.probes[-1] if self.probes else None

    def rerandomize_seed(self, index: int) -> int:
        # Far from the small seeds that drew the initial weights (re-drawing with the training seed
        # hands the first layer back exactly its epoch-0 values); the CPU generator keeps 32 bits.
        return (RERANDOMIZE_SALT + 1009 * self.seed + index) % 2**31

    def _keep(self, net: nn.Module, epoch: int) -> None:
        self.states[epoch] = {name: layer_state(modules) for name, modules in layers(net).items()}

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.global_rank == 0:
            self.layer_names = list(layers(pl_module.net))
            self._keep(pl_module.net, 0)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.global_rank != 0:
            return
        epoch = trainer.current_epoch + 1  # epochs completed
        if epoch in self.checkpoint_epochs:
            self._keep(pl_module.net, epoch)
        if self.probe_every and epoch % self.probe_every == 0 and epoch < trainer.max_epochs:
            self.probe(pl_module.net, trainer.datamodule.splits[self.split], epoch)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_rank != 0:
            return
        epoch = trainer.current_epoch  # after fit: the number of epochs completed
        self._keep(pl_module.net, epoch)
        self.probe(pl_module.net, trainer.datamodule.splits[self.split], epoch)
        self._distances(pl_module.net)

    def probe(self, trained: nn.Module, split: tuple[torch.Tensor, torch.Tensor], epoch: int) -> dict:
        """Test errors of `trained` with each layer alone rewound to each kept epoch <= `epoch`, or re-randomized."""
        x, y = split
        net = copy.deepcopy(trained)  # the probe changes only this copy
        found = layers(net)
        result = {"epoch": epoch, "baseline_error": error_rate(net, x, y), "reinit": {}, "rerandomize": {}}
        taus = sorted(t for t in self.states if t <= epoch)
        for index, (name, modules) in enumerate(found.items()):
            trained_state = layer_state(modules)
            result["reinit"][name] = {}
            for tau in taus:
                load_layer_state(modules, self.states[tau][name])
                result["reinit"][name][tau] = error_rate(net, x, y)
            load_layer_state(modules, rerandomized_state(modules, self.rerandomize_seed(index)))
            result["rerandomize"][name] = error_rate(net, x, y)
            load_layer_state(modules, trained_state)
        self.probes.append(result)
        return result

    def _distances(self, net: nn.Module) -> None:
        for name, modules in layers(net).items():
            start = _parameters(self.states[0][name], modules)
            self.distance[name], self.relative_distance[name] = {}, {}
            for tau in sorted(self.states):
                gap = (_parameters(self.states[tau][name], modules) - start).norm().item()
                self.distance[name][tau] = gap
                self.relative_distance[name][tau] = gap / max(start.norm().item(), 1e-12)
