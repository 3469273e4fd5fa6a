"""Corruptions of Zhang et al. (2017) and Arpit et al. (2017), drawn once from a seed.

    splits, noisy = apply(Corruption("gaussian", 0.4), {"train": (x, y), "test": (x_test, y_test)}, 10, seed=0)

What each corruption does to each split in `apply` (a validation split carved from the training set
is an evaluation split like test):
- `label_noise` p: each training label is redrawn with probability p as a uniformly random class
  (which may equal the true one); p = 1 is `random_labels`. Validation and test labels stay clean.
- `shuffled_pixels`: one permutation of the pixels, the same for every image of every split (train
  and test, as in Zhang's protocol: the test images are the same shuffled task).
- `random_pixels`: an independent permutation per image of every split, fixed once (the same every epoch).
- `gaussian`: the inputs of every split replaced by Gaussian noise with the training inputs' mean and
  variance.
For the input corruptions `fraction` (default 1) is the share of images corrupted. Below 1 it is
Arpit's randX: only that share of the training images is corrupted, and validation and test stay
clean, so their accuracy measures generalization to real data.
The mask `apply` returns marks the training examples that are noise: an input that was corrupted, or
a label that differs from the true one (a redraw that picked the true class is not noise).
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
    """Returns (new labels, mask of the examples whose label changed).

    Zhang's p: each label is redrawn with probability p, uniformly over the classes; a redraw that picks
    the true class (1 in `num_classes`) leaves a correct label, so it is not in the mask.
    """
    redrawn = torch.rand(len(y), generator=generator) < p
    random_classes = torch.randint(num_classes, (len(y),), generator=generator)
    new = torch.where(redrawn, random_classes, y)
    return new, new != y


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
    """Corrupt `splits` ({name: (x, y)}) as the module docstring says, split by split.

    Labels change in `train_split` only; inputs in every split, or in `train_split` only when
    `fraction` < 1 (Arpit's randX). Returns (new splits, mask of the noisy training examples).
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
    # Arpit's randX (fraction < 1) makes part of the training set noise: evaluation stays real data.
    names = list(splits) if corruption.fraction == 1 else [train_split]
    out = dict(splits)
    for name in names:
        x, y = splits[name]
        x_new, chosen = corrupt_inputs(x, corruption, generator, permutation, mean, std)
        out[name] = (x_new, y)
        if name == train_split:
            mask = chosen
    return out, mask
