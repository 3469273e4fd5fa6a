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
(BatchNorm) belongs to the layer just before it: its scale and shift were learned for that layer's
outputs, so the pair is rewound and re-randomized together.

BatchNorm statistics (`bn_stats`): a BatchNorm's running mean and variance are no weights but a
summary of the inputs it sees, and changing one layer changes the inputs of every BatchNorm after
it. With "recompute" (the default), once a layer is rewound or redrawn, every BatchNorm of the
probed net re-estimates its statistics on the training inputs (the first `bn_examples` of them)
before the test error is measured; with "rewind" the statistics stay as loaded: the layer's own
are rewound with it (an epoch-0 BatchNorm holds mean 0 and variance 1, so in eval mode it no longer
normalizes), the later ones keep the trained net's. "rewind" measures stale statistics as much as
the layer's weights. Nets without BatchNorm are probed identically under both.

The probe runs on rank 0 only, on a deep copy of `pl_module.net` (no collectives): the trained net
is never changed. Results stay on the callback as plain numbers (`probes`, `result`, `distance`).
Under DDP only global rank 0 holds them and the kept states; on the other ranks they stay empty
(`result` is None). `pipelines.training.train` gives every rank rank 0's state; a plain
`Trainer(strategy="ddp")` does not (examples/rewind_probe.py reads them on rank 0).
"""
from __future__ import annotations

import copy

import lightning as L
import torch
from torch import nn

from modules.classifier import predictions

LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
BATCHNORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
NORM_TYPES = (*BATCHNORM_TYPES, nn.GroupNorm, nn.LayerNorm)
BN_STATS = ("recompute", "rewind")
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


def batchnorms(net: nn.Module) -> list[nn.Module]:
    """The BatchNorms of `net` that keep running statistics."""
    return [m for m in net.modules() if isinstance(m, BATCHNORM_TYPES) and m.track_running_stats]


@torch.no_grad()
def reestimate_batchnorm(net: nn.Module, x: torch.Tensor, batch_size: int = 2048) -> None:
    """Every BatchNorm of `net` re-estimates its running mean and variance on the inputs `x`.

    Only the BatchNorms run in train mode: each normalizes by its batch's statistics and averages
    them cumulatively (momentum None) over equal-sized batches, then gets its momentum back. Not
    `torch.optim.swa_utils.update_bn`: its whole-net train mode would also switch on dropout and
    noisy BatchNorm's noise, which eval mode (where the test error is measured) does not have.
    """
    norms = batchnorms(net)
    momenta = [m.momentum for m in norms]
    net.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    for batch in torch.tensor_split(x, -(-len(x) // batch_size)):  # near-equal sizes: no tiny last batch
        net(batch)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
        m.eval()


class RewindProbe(L.Callback):
    """Re-initialization / re-randomization robustness of every layer; see the module docstring.

    `probes`: one result per probe, {"epoch", "baseline_error", "reinit": {layer: {epoch: error}},
    "rerandomize": {layer: error}, "bn_stats": "recompute", "rewind" or "none" (no BatchNorm)};
    `result` is the last (end of training). `distance`: {layer: {epoch: ||theta_epoch - theta_0||}}
    and `relative_distance` (divided by ||theta_0||). `bn_examples` caps the training inputs on which
    "recompute" re-estimates the statistics: the whole training set of the embedded datasets, a
    fixed random subset of CIFAR-10's or MNIST's (the training split is already shuffled).
    """

    def __init__(self, checkpoints: tuple[int, ...] = (0, 1, 2, 3, 5, 10), probe_every: int = 0,
                 split: str = "test", seed: int = 0, bn_stats: str = "recompute", bn_examples: int = 10_000):
        if bn_stats not in BN_STATS:
            raise ValueError(f"bn_stats must be one of {', '.join(BN_STATS)}, got {bn_stats!r}")
        self.checkpoint_epochs = tuple(checkpoints)
        self.probe_every, self.split, self.seed = probe_every, split, seed
        self.bn_stats, self.bn_examples = bn_stats, bn_examples
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
            self._probe_in(trainer, pl_module, epoch)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_rank != 0:
            return
        epoch = trainer.current_epoch  # after fit: the number of epochs completed
        self._keep(pl_module.net, epoch)
        self._probe_in(trainer, pl_module, epoch)
        self._distances(pl_module.net)

    def _probe_in(self, trainer, pl_module, epoch: int) -> None:
        """Probes the net in training on the datamodule's split (and its training inputs)."""
        splits = trainer.datamodule.splits
        self.probe(pl_module.net, splits[self.split], epoch, splits["train"][0])

    def probe(self, trained: nn.Module, split: tuple[torch.Tensor, torch.Tensor], epoch: int,
              train_inputs: torch.Tensor | None = None) -> dict:
        """Test errors of `trained` with each layer alone rewound to each kept epoch <= `epoch`, or re-randomized.

        `epoch` is the epochs `trained` has completed (its kept state, if any, is `trained` as it is).
        `train_inputs` are needed when `trained` has BatchNorms and `bn_stats` is "recompute".
        """
        x, y = split
        net = copy.deepcopy(trained)  # the probe changes only this copy; `trained` restores it
        bn_stats = self.bn_stats if batchnorms(net) else "none"
        if bn_stats == "recompute" and train_inputs is None:
            raise ValueError("bn_stats='recompute' re-estimates BatchNorm statistics: pass the training inputs")

        def changed_error() -> float:
            """The test error of the net with one layer changed, then the trained net back."""
            if bn_stats == "recompute":
                reestimate_batchnorm(net, train_inputs[:self.bn_examples])
            error = error_rate(net, x, y)
            net.load_state_dict(trained.state_dict())
            return error

        found = layers(net)
        baseline = error_rate(net, x, y)
        result = {"epoch": epoch, "baseline_error": baseline, "reinit": {}, "rerandomize": {}, "bn_stats": bn_stats}
        taus = sorted(t for t in self.states if t <= epoch)
        for index, (name, modules) in enumerate(found.items()):
            result["reinit"][name] = {}
            for tau in taus:
                if tau == epoch:  # the layer as trained: nothing changes
                    result["reinit"][name][tau] = baseline
                    continue
                load_layer_state(modules, self.states[tau][name])
                result["reinit"][name][tau] = changed_error()
            load_layer_state(modules, rerandomized_state(modules, self.rerandomize_seed(index)))
            result["rerandomize"][name] = changed_error()
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
