"""Loss-landscape smoothness and internal covariate shift, probed during training (Santurkar et al. 2018).

    probe = SmoothnessProbe(every=10, etas=(0.025, 0.05, 0.1, 0.2), ics_layers=(1, 3), activation_layer=2)
    fit(TrainJob(module, datamodule, ..., callbacks=[probe]))
    probe.records   # one dict per probed step

Every `every` optimizer steps, on the batch the step is about to train on, at the current weights
theta with g = grad L(theta) (the paper's Figure 4):
- landscape: for each eta, theta' = theta - eta * g: the loss L(theta') (its range over the etas,
  theta included, is (a)), the gradient change ||g - g'|| (b), and the effective beta-smoothness
  (c) = max over eta of ||g - g'|| / ||theta - theta'|| = max ||g - g'|| / (eta ||g||);
- internal covariate shift (Definition 2.1): for each chosen layer i, G = grad_{W_i} L at theta_t
  and G' = the same gradient after the step updated every layer before i (layer i and those after it
  keep theta_t), on the same batch: ||G - G'|| and cos(G, G');
- the distribution of one activation over the batch (its percentiles): the input of the
  nonlinearity after weight layer `activation_layer`, i.e. the output of its (noisy) BatchNorm.
"Weight layers" are the Conv2d/Linear modules in forward order (modules/nets.py registers them so).

Probing never changes training: the net is evaluated functionally (torch.func.functional_call) on
copies of its parameters and buffers, so neither the weights, the BatchNorm running statistics nor
any .grad is touched, and each evaluation restarts from the torch RNG state the training step itself
uses (noisy BatchNorm then draws the step's own noise at every probe point); the RNG state is put
back afterwards. Under DDP only rank 0 probes, on its shard of the batch, with `pl_module.net` (the
unwrapped net: autograd.grad on it starts no gradient all-reduce) and no collectives; so only rank 0
holds `records` (empty on the other ranks, unless `pipelines.training.train` gave them rank 0's).
"""
from __future__ import annotations

import math

import lightning as L
import torch
from torch import nn
from torch.func import functional_call

from modules.classifier import loss_fn
from modules.nets import NoisyBatchNorm

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)

Tensors = dict[str, torch.Tensor]


def weight_layers(net: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of the Conv2d/Linear layers, in forward order."""
    return [(name, m) for name, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def activation_module(net: nn.Module, layer: int) -> nn.Module:
    """The module whose output feeds the nonlinearity after weight layer `layer`: its normalization, if any."""
    modules = list(net.modules())
    weight = weight_layers(net)[layer][1]
    after = modules.index(weight) + 1
    following = modules[after] if after < len(modules) else None
    return following if isinstance(following, (NoisyBatchNorm, nn.BatchNorm1d, nn.BatchNorm2d)) else weight


def _norm(tensors: Tensors) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors.values()))


def _difference(a: Tensors, b: Tensors) -> Tensors:
    return {k: a[k] - b[k] for k in a}


def _cosine(a: Tensors, b: Tensors) -> float:
    dot = sum(float((a[k].double() * b[k].double()).sum()) for k in a)
    norms = _norm(a) * _norm(b)
    return dot / norms if norms > 0 else math.nan


def _unit_quantiles(activations: torch.Tensor) -> list[float]:
    """QUANTILES over the batch of one activation: channel 0 at the centre position."""
    unit = activations[:, 0]
    while unit.ndim > 1:
        unit = unit[:, unit.shape[1] // 2]
    return torch.quantile(unit.float(), torch.tensor(QUANTILES, device=unit.device)).tolist()


class RngState:
    """The torch RNG state of the CPU (and of the CUDA device, if the net lives there)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


class LossProbe:
    """L and grad L of a net at given parameters on one batch, without touching the net or the RNG state.

    Each call runs in train mode (BatchNorm uses the batch statistics, as in the training step), on
    copies of the buffers, from the RNG state `rng` (the same noise draws at every point).
    """

    def __init__(self, net: nn.Module, loss: str, x: torch.Tensor, y: torch.Tensor, rng: RngState):
        self.net, self.loss, self.x, self.y, self.rng = net, loss, x, y, rng
        self.buffers = {k: b.detach().clone() for k, b in net.named_buffers()}

    def __call__(self, params: Tensors, wrt: tuple[str, ...] | None = None, hook: nn.Module | None = None):
        """(loss, {name: gradient} for the parameters in `wrt` (all by default), output of `hook`)."""
        wrt = tuple(params) if wrt is None else wrt
        leaves = {k: v.detach().requires_grad_(k in wrt) for k, v in params.items()}
        buffers = {k: b.clone() for k, b in self.buffers.items()}  # BN running statistics update copies
        seen = []
        handle = hook.register_forward_hook(lambda m, i, o: seen.append(o.detach())) if hook is not None else None
        self.rng.restore()
        try:
            loss = loss_fn(self.loss, functional_call(self.net, {**leaves, **buffers}, (self.x,)), self.y)
            grads = torch.autograd.grad(loss, [leaves[k] for k in wrt])
        finally:
            if handle is not None:
                handle.remove()
        return loss.detach().item(), dict(zip(wrt, (g.detach() for g in grads))), (seen[0] if seen else None)


def landscape(probe: LossProbe, theta: Tensors, etas: tuple[float, ...], hook: nn.Module | None = None) -> dict:
    """Loss range, gradient change and effective beta-smoothness along -grad L(theta) (the paper's Figure 4)."""
    loss, g, activations = probe(theta, hook=hook)
    g_norm = _norm(g)
    losses, changes, betas = [loss], [], []
    for eta in etas:
        moved = {k: theta[k] - eta * g[k] if k in g else theta[k] for k in theta}
        loss_eta, g_eta, _ = probe(moved)
        change = _norm(_difference(g, g_eta))
        losses.append(loss_eta)
        changes.append(change)
        betas.append(change / (eta * g_norm) if g_norm > 0 else math.nan)
    return {"loss": loss, "losses": losses, "loss_min": min(losses), "loss_max": max(losses),
            "loss_range": max(losses) - min(losses), "grad_norm": g_norm, "grad_changes": changes,
            "grad_change_min": min(changes), "grad_change_max": max(changes),
            "beta": max(betas) if not any(math.isnan(b) for b in betas) else math.nan,
            "gradient": g, "activations": activations}


def internal_covariate_shift(probe: LossProbe, before: Tensors, after: Tensors, gradient: Tensors,
                             net: nn.Module, layers: tuple[int, ...]) -> dict[int, tuple[float, float]]:
    """Definition 2.1: {layer: (||G - G'||, cos(G, G'))}, G' with the layers before `layer` at `after`."""
    order = list(before)
    named = weight_layers(net)
    shifts = {}
    for layer in layers:
        prefix = named[layer][0]
        own = tuple(k for k in order if k.rsplit(".", 1)[0] == prefix)
        first = order.index(own[0])
        mixed = {k: (after[k] if i < first else before[k]) for i, k in enumerate(order)}
        _, g_shifted, _ = probe(mixed, wrt=own)
        g_own = {k: gradient[k] for k in own}
        shifts[layer] = (_norm(_difference(g_own, g_shifted)), _cosine(g_own, g_shifted))
    return shifts


class SmoothnessProbe(L.Callback):
    """Every `every` steps: landscape along -g at absolute step sizes `etas`, ICS of `ics_layers`, one activation.

    `records` holds, per probed step: step, loss, loss_min, loss_max, loss_range, grad_norm,
    grad_change_min, grad_change_max, beta, ics {layer: (l2, cos)} and activation_quantiles
    (QUANTILES of the activation of channel 0 at the centre position over the batch).
    """

    def __init__(self, every: int, etas: tuple[float, ...], ics_layers: tuple[int, ...] = (),
                 activation_layer: int | None = None):
        if every < 1 or not etas or min(etas) <= 0:
            raise ValueError("every must be >= 1 and etas positive")
        self.every, self.etas, self.ics_layers = every, tuple(etas), tuple(ics_layers)
        self.activation_layer = activation_layer
        self.records: list[dict] = []
        self._pending = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_rank != 0 or trainer.global_step % self.every != 0:
            return
        net = pl_module.net
        x, y = batch
        rng = RngState(x.device)  # the state the training step is about to draw its noise from
        probe = LossProbe(net, pl_module.loss_name, x, y, rng)
        theta = {k: p.detach().clone() for k, p in net.named_parameters() if p.requires_grad}
        hook = None if self.activation_layer is None else activation_module(net, self.activation_layer)
        try:
            result = landscape(probe, theta, self.etas, hook)
        finally:
            rng.restore()
        activations = result.pop("activations")
        record = {"step": trainer.global_step, **{k: v for k, v in result.items() if k != "gradient"}}
        if activations is not None:
            record["activation_quantiles"] = _unit_quantiles(activations)
        self.records.append(record)
        if self.ics_layers:
            self._pending = (probe, theta, result["gradient"], record)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._pending is None:
            return
        probe, before, gradient, record = self._pending
        self._pending = None
        net = pl_module.net
        after = {k: p.detach().clone() for k, p in net.named_parameters() if k in before}
        after_rng = RngState(probe.x.device)
        try:
            record["ics"] = internal_covariate_shift(probe, before, after, gradient, net, self.ics_layers)
        finally:
            after_rng.restore()
