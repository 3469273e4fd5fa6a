"""Model zoo: a registry of small, readable classifiers that adapt to the input shape.

`build_net(name, input_shape, num_classes, **options)` builds a fresh net with PyTorch's default
initialization (nothing is re-initialized, so `torch.manual_seed` fixes the initial weights).
FC nets flatten any input, e.g. (1, 28, 28), (3, 32, 32) or 1-D features (40,); conv nets need a
(C, H, W) input and raise ValueError otherwise.

Modules are registered in forward order, so `net.modules()` visits the parameterized layers in the
order the forward pass uses them (a ResNet block's shortcut comes after its second conv, which is
where its output is added). Parameter counts (trainable) on the usual inputs, pinned by tests:

    fc 784-200-200-10          199,210    lenet 1x28x28             44,426
    fc 3072-200-200-10         656,810    lenet 3x32x32             62,006
    fc 784-400x5-10            959,610    lenet_300_100 (MNIST)    266,610 (266,200 weights)
    mlp_1x512 3x28x28        1,209,866    mlp_3x512 3x28x28      1,735,178
    conv2 3x32x32            4,301,642    conv4 3x32x32          2,425,930
    conv6 3x32x32            2,262,602    vgg11 3x32x32 (no BN)  9,225,610
    resnet18 3x32x32        11,173,962    deep_linear 1x28x28      311,810 (25 layers, width 100)
    xor_net (2d,)                   4k (2k filters of 2 weights; output weights fixed)

Conv-2/4/6 follow Frankle & Carbin (2019, Figure 2), whose table rounds Conv-6 to 1.7M; the
exact count of the architecture described there is 2,262,602.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

NORMS = ("none", "bn", "noisy_bn", "shifted_bn")


class NoisyBatchNorm(nn.Module):
    """BatchNorm followed by Santurkar et al.'s (2018) "noisy BatchNorm": distributional instability on purpose.

    In training, every forward pass (one step) draws, independently for each activation j (a channel
    at a position), the parameters of a noise distribution: a mean mu_j ~ U(-scale, scale) and a
    standard deviation sigma_j ~ U(scale/2, 3 scale/2). Each example i then gets its own noise,
    i.i.d. from that distribution: y_ij = BN(x)_ij + mu_j + sigma_j * e_ij, e_ij ~ N(0, 1). So the
    noise has a non-zero mean and a non-unit variance, both redrawn at every step, and each
    activation's distribution over the batch moves (mean + mu_j, variance + sigma_j^2) from step to
    step: internal covariate shift, made large. mu averages out (E[mu] = 0), so eval mode is plain
    BN, as dropout's eval is the expected training net.
    """

    def __init__(self, batchnorm: nn.Module, scale: float = 1.0):
        super().__init__()
        self.batchnorm, self.scale = batchnorm, scale

    def forward(self, x):
        y = self.batchnorm(x)
        return self.perturb(y) if self.training and self.scale != 0 else y

    def perturb(self, y: torch.Tensor) -> torch.Tensor:
        like = dict(device=y.device, dtype=y.dtype)
        mean = (2 * torch.rand(y.shape[1:], **like) - 1) * self.scale  # this step's distribution, per activation
        std = (0.5 + torch.rand(y.shape[1:], **like)) * self.scale
        return y + mean + std * torch.randn(y.shape, **like)  # one draw per example and activation


class ShiftedBatchNorm(NoisyBatchNorm):
    """A control for noisy BatchNorm: the same step-to-step instability of each activation's distribution, no per-example noise.

    Every step draws, per activation, a shift m ~ U(-scale, scale) and a spread s ~ U(1 - scale/2,
    1 + scale/2) shared by all examples, and returns s * BN(x) + m: each activation's distribution
    over the batch gets a new non-zero mean and non-unit variance at every step (internal covariate
    shift alone), while the examples keep their exact order within it. Noisy BN does both; comparing
    the two tells whether a cost of noisy BN comes from the shift or from the per-example noise.
    Needs scale < 2 (a positive spread).
    """

    def perturb(self, y: torch.Tensor) -> torch.Tensor:
        like = dict(device=y.device, dtype=y.dtype)
        shift = (2 * torch.rand(y.shape[1:], **like) - 1) * self.scale
        spread = 1 + (torch.rand(y.shape[1:], **like) - 0.5) * self.scale
        return spread * y + shift


def norm_layer(norm: str, channels: int, dims: int = 2) -> nn.Module | None:
    """The normalization after a conv (dims=2) or linear layer (dims=1), or None; the one place to add variants."""
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose from {', '.join(NORMS)}")
    if norm == "none":
        return None
    batchnorm = nn.BatchNorm2d(channels) if dims == 2 else nn.BatchNorm1d(channels)
    wrappers = {"noisy_bn": NoisyBatchNorm, "shifted_bn": ShiftedBatchNorm}
    return wrappers[norm](batchnorm) if norm in wrappers else batchnorm


def _image_shape(input_shape: tuple[int, ...], name: str) -> tuple[int, int, int]:
    if len(input_shape) != 3 or min(input_shape) < 1:
        raise ValueError(f"{name} needs a (C, H, W) input shape, got {tuple(input_shape)}")
    return tuple(input_shape)


def _mlp(in_features: int, widths: tuple[int, ...], num_classes: int, dropout: float = 0.0) -> list[nn.Module]:
    """Linear-ReLU(-Dropout) hidden layers, then a linear output layer."""
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Linear(in_features, width), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        in_features = width
    return layers + [nn.Linear(in_features, num_classes)]


def fc(input_shape, num_classes, widths: tuple[int, ...] = (200, 200), dropout: float = 0.0) -> nn.Module:
    return nn.Sequential(nn.Flatten(), *_mlp(math.prod(input_shape), tuple(widths), num_classes, dropout))


def lenet(input_shape, num_classes) -> nn.Module:
    """LeNet-5: two unpadded 5x5 convs (6, 16), each followed by ReLU and 2x2 max-pool, FC 120-84."""
    c, h, w = _image_shape(input_shape, "lenet")
    for _ in range(2):  # a 5x5 valid conv removes 4 pixels, then the pool halves
        h, w = (h - 4) // 2, (w - 4) // 2
    if h < 1 or w < 1:
        raise ValueError(f"lenet needs inputs of at least 12x12, got {tuple(input_shape)}")
    features = [nn.Conv2d(c, 6, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2)]
    return nn.Sequential(*features, nn.Flatten(), *_mlp(16 * h * w, (120, 84), num_classes))


def _vgg(input_shape, num_classes, cfg: tuple, hidden: tuple[int, ...], norm: str = "none", name: str = "vgg"):
    """3x3 convs (padding 1) per `cfg` entry, 'M' = 2x2 max-pool, then an MLP with `hidden` widths.

    A pool that would shrink the feature map below 1x1 is skipped, so deep VGGs also run on small
    inputs (VGG-11 on 28x28: 28-14-7-3-1, and the fifth pool is dropped).
    """
    channels, h, w = _image_shape(input_shape, name)
    layers: list[nn.Module] = []
    for v in cfg:
        if v == "M":
            if h >= 2 and w >= 2:
                layers.append(nn.MaxPool2d(2))
                h, w = h // 2, w // 2
            continue
        layers.append(nn.Conv2d(channels, v, 3, padding=1))
        if (norm_module := norm_layer(norm, v)) is not None:
            layers.append(norm_module)
        layers.append(nn.ReLU())
        channels = v
    classifier = nn.Sequential(nn.Flatten(), *_mlp(channels * h * w, hidden, num_classes))
    return nn.Sequential(nn.Sequential(*layers), classifier)


def conv2(input_shape, num_classes) -> nn.Module:
    return _vgg(input_shape, num_classes, (64, 64, "M"), (256, 256), name="conv2")


def conv4(input_shape, num_classes) -> nn.Module:
    return _vgg(input_shape, num_classes, (64, 64, "M", 128, 128, "M"), (256, 256), name="conv4")


def conv6(input_shape, num_classes) -> nn.Module:
    cfg = (64, 64, "M", 128, 128, "M", 256, 256, "M")
    return _vgg(input_shape, num_classes, cfg, (256, 256), name="conv6")


def vgg11(input_shape, num_classes, norm: str = "none") -> nn.Module:
    """CIFAR VGG-11: a single Linear(512 * spatial, num_classes) classifier (spatial 1x1 on 32x32)."""
    cfg = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")
    return _vgg(input_shape, num_classes, cfg, (), norm, name="vgg11")


def small_vgg(input_shape, num_classes, norm: str = "none") -> nn.Module:
    return _vgg(input_shape, num_classes, (32, 32, "M", 64, 64, "M"), (256,), norm, name="small_vgg")


def deep_linear(input_shape, num_classes, depth: int = 25, width: int = 100, norm: str = "none") -> nn.Module:
    """Santurkar et al.'s deep linear network: `depth` Linear layers (hidden `width`), no nonlinearity,
    each hidden layer optionally followed by a normalization (`norm`)."""
    layers: list[nn.Module] = [nn.Flatten()]
    in_features = math.prod(input_shape)
    for _ in range(depth - 1):
        layers.append(nn.Linear(in_features, width))
        if (norm_module := norm_layer(norm, width, dims=1)) is not None:
            layers.append(norm_module)
        in_features = width
    return nn.Sequential(*layers, nn.Linear(in_features, num_classes))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus a shortcut (1x1 conv-BN when the shape changes)."""

    def __init__(self, in_channels: int, channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()
        self.shortcut = nn.Sequential()  # identity; registered last since it is used last
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride, bias=False),
                                          nn.BatchNorm2d(channels))

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR ResNet-18: 3x3 stem (no max-pool), [2, 2, 2, 2] BasicBlocks, global average pool, FC."""

    def __init__(self, input_shape, num_classes: int):
        super().__init__()
        channels = _image_shape(input_shape, "resnet18")[0]
        self.conv1 = nn.Conv2d(channels, 64, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        in_channels = 64
        for i, (width, stride) in enumerate([(64, 1), (128, 2), (256, 2), (512, 2)], start=1):
            blocks = [BasicBlock(in_channels, width, stride), BasicBlock(width, width, 1)]
            setattr(self, f"layer{i}", nn.Sequential(*blocks))  # names like layer1.0.conv1
            in_channels = width
        self.pool = nn.AdaptiveAvgPool2d(1)  # global pool: any spatial size works
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.pool(x).flatten(1))


class XorNet(nn.Module):
    """Brutzkus & Globerson's (2019) XOR detector: 2k width-2 stride-2 filters (no bias), ReLU, max-pool
    over the d positions, then fixed output weights, +1 for the first k filters and -1 for the rest.

    One output f(x) for two classes (its sign is the label; train with the hinge loss). Only the 4k
    filter weights are parameters; the output weights are a buffer. `init_std` draws the filters from
    the paper's small Gaussian N(0, init_std^2) (None keeps PyTorch's default initialization).
    """

    def __init__(self, input_shape, num_classes: int = 2, k: int = 2, init_std: float | None = None):
        super().__init__()
        if num_classes != 2 or len(input_shape) != 1 or input_shape[0] % 2:
            raise ValueError(f"xor_net classifies (2d,) inputs into 2 classes, got {tuple(input_shape)} and {num_classes}")
        self.filters = nn.Linear(2, 2 * k, bias=False)  # rows: w_1..w_k (output +1), u_1..u_k (output -1)
        if init_std is not None:
            nn.init.normal_(self.filters.weight, std=init_std)
        self.register_buffer("output_weights", torch.cat([torch.ones(k), -torch.ones(k)]))

    def forward(self, x):
        positions = x.reshape(len(x), -1, 2)  # the d stride-2 windows
        pooled = torch.relu(self.filters(positions)).amax(dim=1)
        return (pooled @ self.output_weights).unsqueeze(1)


NETS: dict[str, Callable[..., nn.Module]] = {
    "fc": fc,
    "lenet": lenet,
    "lenet_300_100": lambda input_shape, num_classes, dropout=0.0: fc(input_shape, num_classes, (300, 100), dropout),
    "mlp_1x512": lambda input_shape, num_classes, dropout=0.0: fc(input_shape, num_classes, (512,), dropout),
    "mlp_3x512": lambda input_shape, num_classes, dropout=0.0: fc(input_shape, num_classes, (512,) * 3, dropout),
    "conv2": conv2,
    "conv4": conv4,
    "conv6": conv6,
    "vgg11": vgg11,
    "small_vgg": small_vgg,
    "resnet18": ResNet18,
    "xor_net": XorNet,
    "deep_linear": deep_linear,
}


def build_net(name: str, input_shape: tuple[int, ...], num_classes: int, **options) -> nn.Module:
    """A freshly initialized net from the registry; `options` go to its builder (e.g. widths, norm)."""
    if name not in NETS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(NETS)}")
    return NETS[name](tuple(input_shape), num_classes, **options)


def count_parameters(net: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in net.parameters() if p.requires_grad)
