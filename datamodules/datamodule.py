"""One LightningDataModule for every pipeline: source + corruption + split + fast batching.

Datasets that fit in memory live as tensors on the training device and are served as ready
batches (`TensorBatches`), which skips the per-example collation of a DataLoader. Under DDP each
rank takes its own shard of every epoch's permutation; the permutation is drawn from
(seed, epoch), so it is the same on every rank and the same every run. With `steps_per_call` > 1
the training loader hands Lightning lists of that many consecutive mini-batches (the same
mini-batches in the same order; `pipelines.training` decides when that is safe).
"""
from __future__ import annotations

import lightning as L
import torch

from datamodules import corruption as corruption_lib
from datamodules.corruption import Corruption
from datamodules.sources import Arrays, load


class TensorBatches:
    """An iterable of (x, y) mini-batches cut from tensors; reshuffled every pass from (seed, pass count).

    One iteration makes `passes` passes over the tensors (a tiny training set's "epoch" can then hold
    enough steps that Lightning's per-epoch cost does not dominate). With `group` > 1 it yields lists
    of up to `group` consecutive mini-batches (the last list of an iteration may be shorter).
    """

    def __init__(self, x, y, batch_size: int, shuffle: bool, seed: int = 0, augment: bool = False,
                 rank: int = 0, world_size: int = 1, passes: int = 1, group: int = 1):
        self.x, self.y, self.batch_size, self.shuffle, self.seed = x, y, batch_size, shuffle, seed
        self.augment, self.rank, self.world_size, self.passes = augment, rank, world_size, passes
        self.group, self.epoch = group, 0

    def _indices(self) -> torch.Tensor:
        n = len(self.y)
        if not self.shuffle:
            order = torch.arange(n)
        else:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch))
        # Under DDP every rank must take as many batches as the others (else the gradient all-reduce
        # hangs): pad with the first examples to a multiple of the world size, as DistributedSampler does.
        order = torch.cat([order, order[torch.arange((-n) % self.world_size) % max(n, 1)]])
        return order[self.rank::self.world_size].to(self.x.device)

    def __len__(self) -> int:
        per_rank = -(-len(self.y) // self.world_size)
        return -(-self.passes * -(-per_rank // self.batch_size) // self.group)

    def __iter__(self):
        if self.group == 1:
            yield from self._batches()
            return
        group = []
        for batch in self._batches():
            group.append(batch)
            if len(group) == self.group:
                yield group
                group = []
        if group:
            yield group

    def _batches(self):
        for _ in range(self.passes):
            indices = self._indices()
            self.epoch += 1
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start:start + self.batch_size]
                x = self.x[batch]
                yield (random_crop(x, 4, self.seed + self.epoch * 7919 + start) if self.augment else x), self.y[batch]


def random_crop(x: torch.Tensor, padding: int, seed: int) -> torch.Tensor:
    """The paper's augmentation: pad by `padding` and crop back at a random offset per image."""
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (padding,) * 4)
    g = torch.Generator().manual_seed(seed)
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=g).to(x.device)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=g).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    return padded[torch.arange(n, device=x.device)[:, None, None, None],
                  torch.arange(x.shape[1], device=x.device)[None, :, None, None], rows, cols]


class ArrayDataModule(L.LightningDataModule):
    """Loads a registered source, standardizes it, carves a validation split, applies a corruption.

    Only the description is pickled (a DDP worker reloads the tensors deterministically from it).
    Attributes after `setup()`: `splits` {name: (x, y)}, `corrupted` (mask of the training examples that
    are noise: input corrupted or label changed; `datamodules.corruption` says which splits each corruption touches),
    `num_classes`, `input_shape`, `input_mean` and `input_std` (the standardization, in [0, 1] units;
    0 and 1 with `standardize=False`, which keeps the source's inputs as they are).
    `eval_splits` lists the splits evaluated every epoch; an epoch is `epoch_passes` passes over the training set.
    `steps_per_call`: mini-batches per training-loader item (set by `pipelines.training`, else 1).
    """

    def __init__(self, dataset: str = "mnist5k", data_dir: str = "data", download: bool = False,
                 batch_size: int = 128, seed: int = 0, val_fraction: float = 0.0,
                 corruption: Corruption = Corruption(), augment: bool = False, train_subset: int = 0,
                 eval_splits: tuple[str, ...] | None = None, standardize: bool = True, epoch_passes: int = 1):
        super().__init__()
        self.dataset, self.data_dir, self.download = dataset, data_dir, download
        self.batch_size, self.seed, self.val_fraction = batch_size, seed, val_fraction
        self.corruption, self.augment, self.train_subset = corruption, augment, train_subset
        self._eval_splits, self.standardize, self.epoch_passes = eval_splits, standardize, epoch_passes
        self.splits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.steps_per_call = 1

    def __getstate__(self):
        state = dict(self.__dict__)
        state["splits"] = {}
        state["trainer"] = None
        return state

    @property
    def eval_splits(self) -> tuple[str, ...]:
        # From the description, not the loaded tensors: a DDP worker asks before its setup().
        return self._eval_splits if self._eval_splits is not None else ("val", "test") if self.val_fraction else ("test",)

    def prepare_arrays(self) -> Arrays:
        return load(self.dataset, self.data_dir, self.download, self.seed)

    def setup(self, stage: str | None = None) -> None:
        if not self.splits:
            self._build()
        device = self.trainer.strategy.root_device if self.trainer is not None else None
        if device is not None:
            self.splits = {k: (x.to(device), y.to(device)) for k, (x, y) in self.splits.items()}

    def _build(self) -> None:
        arrays = self.prepare_arrays()
        self.num_classes, self.input_shape = arrays.num_classes, arrays.input_shape
        x, y = arrays.x_train, arrays.y_train
        generator = torch.Generator().manual_seed(self.seed)
        order = torch.randperm(len(y), generator=generator)
        if self.train_subset:
            order = order[: self.train_subset]
        n_val = int(round(self.val_fraction * len(order)))
        splits = {"train": (x[order[n_val:]], y[order[n_val:]]), "test": (arrays.x_test, arrays.y_test)}
        if n_val:
            splits["val"] = (x[order[:n_val]], y[order[:n_val]])
        splits, self.corrupted = corruption_lib.apply(self.corruption, splits, self.num_classes, self.seed)
        # One global mean and std from the training inputs: per-pixel statistics blow up the
        # near-constant border pixels of MNIST-like images.
        mean, std = splits["train"][0].mean(), splits["train"][0].std()
        if not self.standardize:  # inputs whose values are the problem itself (the XOR's +-1) stay as they are
            mean, std = torch.zeros(()), torch.ones(())
        self.input_mean, self.input_std = mean.item(), std.item()  # to express [0, 1]-scale distances
        self.splits = {k: ((xs - mean) / std, ys) for k, (xs, ys) in splits.items()}

    def _rank(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def loader(self, split: str, shuffle: bool = False, batch_size: int | None = None, passes: int = 1,
               group: int = 1) -> TensorBatches:
        rank, world = self._rank()
        x, y = self.splits[split]
        per_rank = max(1, (batch_size or self.batch_size) // world)
        return TensorBatches(x, y, per_rank, shuffle, self.seed, self.augment and shuffle, rank, world, passes, group)

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        return batch  # cut from tensors that setup() already put on the training device

    def train_dataloader(self):
        return self.loader("train", shuffle=True, passes=self.epoch_passes, group=self.steps_per_call)

    def val_dataloader(self):
        return [self.loader(split, batch_size=1024) for split in self.eval_splits]
