"""SubspaceNet: train any network in a random d-dimensional subspace of its parameters.

Li et al. 2018, "Measuring the intrinsic dimension of objective landscapes": theta = theta0 +
P theta_d, with theta0 the network's own initialisation (frozen, a buffer), P a fixed random
projection (`modules.projections`) and theta_d, starting at zero, the only trained tensor.

The wrapped network's parameters are unregistered (set to None, the way `bias=False` layers
hold theirs), so `parameters()` yields theta_d alone: optimizers and DDP gradient sync see one
tensor; call the SubspaceNet, not `.net`, whose parameters are now None. Each forward computes
theta once, splits it into views shaped like the original parameters and runs the network with
`torch.func.functional_call`. Buffers such as BatchNorm running statistics stay ordinary
buffers of the network and keep updating in train mode.

Under DDP the projection's buffers agree across ranks by construction (same seed), and theta0
is copied from rank 0 when DDP wraps the model; DDP's default `broadcast_buffers=True` then
re-sends every buffer before every forward, 600 MB for the dense projection at d=750 on
FC 784-200-200-10.
"""
from __future__ import annotations

import torch
from torch import nn

from modules.projections import build_projection


class SubspaceNet(nn.Module):
    def __init__(self, net: nn.Module, d: int, projection: str = "fastfood", seed: int = 0):
        super().__init__()
        # remove_duplicate=False lists every name of a tied (shared) parameter; all of them get
        # the same slice of theta.
        named = list(net.named_parameters(remove_duplicate=False))
        unique = list({id(p): p for _, p in named}.values())
        if not unique:
            raise ValueError("the network has no parameters to train in a subspace")
        D = sum(p.numel() for p in unique)
        if not 1 <= d <= D:
            raise ValueError(f"d={d} must be between 1 and D={D}")
        self.d, self.D = d, D
        self.projection_name = projection
        # Per distinct parameter, its size and the (names, shape) that receive its part of theta.
        self._sizes = [p.numel() for p in unique]
        self._targets = [([name for name, q in named if q is p], p.shape) for p in unique]
        self.register_buffer("theta0", torch.cat([p.detach().reshape(-1) for p in unique]))
        for name, _ in named:
            module_name, _, attr = name.rpartition(".")
            net.get_submodule(module_name)._parameters[attr] = None
        self.net = net
        self.projection = build_projection(projection, d, D, seed, layer_sizes=self._sizes)
        self.theta_d = nn.Parameter(torch.zeros(d))

    def theta(self) -> torch.Tensor:
        """The full parameter vector theta0 + P theta_d (differentiable in theta_d), in theta_d's precision."""
        # theta is the parameters, not an activation: under mixed precision (autocast) the projection's
        # products would otherwise run in 16 bits (Fastfood's Hadamard GEMMs, dense/sparse mv on CUDA).
        with torch.autocast(self.theta_d.device.type, enabled=False):
            return self.theta0 + self.projection(self.theta_d)

    def parameters_dict(self) -> dict[str, torch.Tensor]:
        """The wrapped network's parameters at the current theta_d, as views of one theta."""
        # One split (its backward is a single concatenation), not a slice per parameter (each
        # slice's backward would write a zero-padded D-vector).
        params = {}
        for part, (names, shape) in zip(self.theta().split(self._sizes), self._targets):
            params.update(dict.fromkeys(names, part.view(shape)))
        return params

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(self.net, self.parameters_dict(), (x,), tie_weights=False)

    def extra_repr(self) -> str:
        return f"d={self.d}, D={self.D}, projection={self.projection_name!r}"
