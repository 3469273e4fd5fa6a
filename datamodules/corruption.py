"""Corruptions of Zhang et al. (2017) and Arpit et al. (2017), drawn once from a seed.

- `label_noise` p: each training label is replaced with probability p by a uniformly random class
  (which may equal the true one); p = 1 is `random_labels`. Evaluation labels stay clean.
- `shuffled_pixels`: one permutation of the pixels, the same for every image of every split.
- `random_pixels`: an independent permutation per image, fixed once (the same every epoch).
- `gaussian`: inputs replaced by Gaussian noise with the training inputs' mean and variance.
For the input corruptions `fraction` (default 1) is the share of images replaced (Arpit's randX).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

KINDS = ("none", "label_noise", "random_labels", "shuffled_pixels", "random_pixels", "gaussian")


@dataclass(frozen=True)
class Corruption:
    kind: str = "none"
    fraction: float = 1.0  # p for label_noise; share of images for the input corruptions

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown corruption {self.kind!r}; choose from {', '.join(KINDS)}")
        if not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"corruption fraction {self.fraction} is outside [0, 1]")

    @property
    def corrupts_labels(self) -> bool:
        return self.kind in ("label_noise", "random_labels")


def corrupt_labels(y: torch.Tensor, p: float, num_classes: int, generator: torch.Generator):
    """Returns (new labels, mask of the examples whose label was redrawn)."""
    redrawn = torch.rand(len(y), generator=generator) < p
    random_classes = torch.randint(num_classes, (len(y),), generator=generator)
    return torch.where(redrawn, random_classes, y), redrawn


def _choose(n: int, fraction: float, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=generator) < fraction if fraction < 1 else torch.ones(n, dtype=torch.bool)


def corrupt_inputs(x: torch.Tensor, corruption: Corruption, generator: torch.Generator,
                   pixel_permutation: torch.Tensor | None = None, mean: float = 0.0, std: float = 1.0):
    """Returns (new inputs, mask of corrupted images). Pixels are permuted within each channel."""
    chosen = _choose(len(x), corruption.fraction, generator)
    flat = x.reshape(len(x), x.shape[1] if x.ndim > 2 else 1, -1).clone()
    if corruption.kind == "shuffled_pixels":
        flat[chosen] = flat[chosen][:, :, pixel_permutation]
    elif corruption.kind == "random_pixels":
        index = torch.argsort(torch.rand(int(chosen.sum()), flat.shape[-1], generator=generator), dim=1)
        flat[chosen] = torch.gather(flat[chosen], 2, index.unsqueeze(1).expand(-1, flat.shape[1], -1))
    elif corruption.kind == "gaussian":
        noise = torch.randn(int(chosen.sum()), *flat.shape[1:], generator=generator)
        flat[chosen] = mean + std * noise
    return flat.reshape(x.shape), chosen


def apply(corruption: Corruption, splits: dict[str, tuple[torch.Tensor, torch.Tensor]], num_classes: int,
          seed: int, train_split: str = "train"):
    """Corrupt `splits` ({name: (x, y)}). Labels change in `train_split` only; inputs in every split.

    Returns (new splits, mask of the corrupted training examples).
    """
    generator = torch.Generator().manual_seed(10_007 * seed + 1)
    x_train, y_train = splits[train_split]
    mask = torch.zeros(len(y_train), dtype=torch.bool)
    if corruption.kind == "none":
        return dict(splits), mask
    if corruption.corrupts_labels:
        p = 1.0 if corruption.kind == "random_labels" else corruption.fraction
        y_new, mask = corrupt_labels(y_train, p, num_classes, generator)
        return {**splits, train_split: (x_train, y_new)}, mask
    pixels = x_train[0].numel() // (x_train.shape[1] if x_train.ndim > 2 else 1)
    permutation = torch.randperm(pixels, generator=generator)
    mean, std = x_train.mean().item(), x_train.std().item()
    out = {}
    for name, (x, y) in splits.items():
        x_new, chosen = corrupt_inputs(x, corruption, generator, permutation, mean, std)
        out[name] = (x_new, y)
        if name == train_split:
            mask = chosen
    return out, mask
