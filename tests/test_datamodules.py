"""Corruption semantics (Zhang et al. 2017) and the in-memory datamodule."""
import pytest
import torch

from datamodules import corruption as corruption_lib
from datamodules.corruption import Corruption
from datamodules.datamodule import ArrayDataModule, TensorBatches
from datamodules.sources import load


def _images(n=64, shape=(1, 6, 6), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, *shape, generator=g), torch.randint(10, (n,), generator=g)


def _apply(kind, fraction=1.0, seed=0, n=64, shape=(1, 6, 6)):
    splits = {"train": _images(n, shape, 1), "test": _images(n // 2, shape, 2)}
    out, mask = corruption_lib.apply(Corruption(kind, fraction), splits, 10, seed)
    return splits, out, mask


def test_shuffled_pixels_is_one_permutation_for_every_image_of_train_and_test():
    before, after, _ = _apply("shuffled_pixels")
    x_train, x_test = before["train"][0].flatten(1), before["test"][0].flatten(1)
    # Recover the permutation from one image, then check it explains every image of both splits.
    order = torch.argsort(x_train[0])
    permutation = order[torch.argsort(torch.argsort(after["train"][0].flatten(1)[0]))]
    assert not torch.equal(permutation, torch.arange(36))
    assert torch.equal(after["train"][0].flatten(1), x_train[:, permutation])
    assert torch.equal(after["test"][0].flatten(1), x_test[:, permutation])
    assert torch.equal(after["train"][1], before["train"][1])  # labels untouched


def test_random_pixels_permutes_each_image_differently_and_is_fixed_once():
    before, after, mask = _apply("random_pixels")
    a, b = after["train"][0].flatten(1), before["train"][0].flatten(1)
    assert torch.equal(a.sort(dim=1).values, b.sort(dim=1).values)  # each image is a permutation of itself
    perms = {tuple(torch.argsort(torch.argsort(b[i]))[torch.argsort(a[i])].tolist()) for i in range(len(a))}
    assert len(perms) == len(a)  # a different permutation per image
    _, again, _ = _apply("random_pixels")
    assert torch.equal(again["train"][0], after["train"][0])  # drawn once from the seed
    assert bool(mask.all())


def test_gaussian_matches_the_training_mean_and_variance():
    before, after, _ = _apply("gaussian", n=4000)
    x, noise = before["train"][0], after["train"][0]
    assert noise.mean().item() == pytest.approx(x.mean().item(), abs=0.01)
    assert noise.var().item() == pytest.approx(x.var().item(), rel=0.05)
    assert not torch.allclose(noise, x)


@pytest.mark.parametrize("p", [0.2, 0.5, 0.8])
def test_label_noise_redraws_with_probability_p_and_marks_only_changed_labels(p):
    y = torch.arange(20_000) % 10
    g = lambda: torch.Generator().manual_seed(3)
    noisy, changed = corruption_lib.corrupt_labels(y, p, 10, g())
    # Zhang's p: a label is redrawn with probability p and may get its true class back, so p (K - 1) / K
    # of the labels change, and only those are noise.
    assert (noisy != y).float().mean().item() == pytest.approx(p * 0.9, abs=0.015)
    assert torch.equal(changed, noisy != y)
    again, _ = corruption_lib.corrupt_labels(y, p, 10, g())
    assert torch.equal(noisy, again)


ALL_INPUTS = {("train", "inputs"), ("val", "inputs"), ("test", "inputs")}


@pytest.mark.parametrize("kind, fraction, touched", [
    ("none", 1.0, set()),
    ("label_noise", 0.5, {("train", "labels")}),
    ("random_labels", 1.0, {("train", "labels")}),
    # Zhang's full input corruptions change the task itself: every split, train and test alike.
    ("shuffled_pixels", 1.0, ALL_INPUTS),
    ("random_pixels", 1.0, ALL_INPUTS),
    ("gaussian", 1.0, ALL_INPUTS),
    # A partial one (Arpit's randX) makes part of the training set noise: evaluation stays real data.
    ("shuffled_pixels", 0.5, {("train", "inputs")}),
    ("random_pixels", 0.5, {("train", "inputs")}),
    ("gaussian", 0.5, {("train", "inputs")}),
    ("gaussian", 0.0, set()),
])
def test_each_corruption_changes_the_documented_splits_and_marks_what_changed(kind, fraction, touched):
    splits = {"train": _images(64, seed=1), "val": _images(16, seed=2), "test": _images(32, seed=3)}
    out, mask = corruption_lib.apply(Corruption(kind, fraction), splits, 10, seed=0)
    changed = {(name, part): (before != after).reshape(len(before), -1).any(1)
               for name in splits for part, before, after in zip(("inputs", "labels"), splits[name], out[name])}
    assert {key for key, rows in changed.items() if rows.any()} == touched
    assert all(changed[key].all() for key in touched if key[0] != "train")  # every evaluation image, when any
    assert torch.equal(mask, changed["train", "inputs"] | changed["train", "labels"])  # noise = what changed
    share = {"label_noise": 0.9 * fraction, "random_labels": 0.9}.get(kind, fraction)  # 1 redraw in 10 hits the true class
    if touched:
        assert mask.float().mean().item() == pytest.approx(share, abs=0.2)


def test_invalid_corruption_is_refused():
    with pytest.raises(ValueError, match="outside"):
        Corruption("label_noise", 1.5)
    with pytest.raises(ValueError, match="unknown corruption"):
        Corruption("rotations")


def test_embedded_sources_have_the_documented_shapes():
    mnist = load("mnist5k")
    assert mnist.x_train.shape == (4000, 1, 28, 28) and mnist.x_test.shape == (1000, 1, 28, 28)
    assert 0.0 <= mnist.x_train.min() and mnist.x_train.max() <= 1.0
    assert torch.bincount(mnist.y_test).min() >= 90  # stratified
    digits = load("digits")
    assert digits.x_train.shape == (1437, 1, 8, 8) and digits.num_classes == 10
    one_d = load("mnist1d")
    assert one_d.x_train.shape[1:] == (40,) and one_d.num_classes == 10


def test_datamodule_standardizes_splits_and_carves_validation():
    dm = ArrayDataModule("digits", val_fraction=0.1, seed=1)
    dm.setup()
    x_train, _ = dm.splits["train"]
    assert len(dm.splits["val"][1]) == 144 and len(x_train) == 1437 - 144
    assert x_train.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert x_train.std().item() == pytest.approx(1.0, abs=1e-4)
    assert dm.eval_splits == ("val", "test")
    # The description travels to DDP workers, the tensors do not.
    import pickle

    assert pickle.loads(pickle.dumps(dm)).splits == {}


def test_tensor_batches_cover_every_example_once_per_epoch_and_shard_across_ranks():
    x, y = torch.arange(10.0).unsqueeze(1), torch.arange(10)
    loader = TensorBatches(x, y, batch_size=3, shuffle=True, seed=0)
    epoch1 = torch.cat([b for _, b in loader])
    epoch2 = torch.cat([b for _, b in loader])
    assert sorted(epoch1.tolist()) == list(range(10)) and len(loader) == 4
    assert not torch.equal(epoch1, epoch2)  # reshuffled every epoch
    ranks = [torch.cat([b for _, b in TensorBatches(x, y, 2, True, 0, rank=r, world_size=2)]) for r in (0, 1)]
    assert sorted(torch.cat(ranks).tolist()) == list(range(10))  # disjoint shards covering the epoch


def test_grouped_tensor_batches_hand_over_the_same_mini_batches_in_the_same_order():
    x, y = torch.arange(10.0).unsqueeze(1), torch.arange(10)
    single = TensorBatches(x, y, batch_size=3, shuffle=True, seed=0, passes=2)
    grouped = TensorBatches(x, y, batch_size=3, shuffle=True, seed=0, passes=2, group=3)
    groups = list(grouped)
    assert [len(g) for g in groups] == [3, 3, 2] and len(grouped) == 3  # 8 mini-batches over the two passes
    assert all(isinstance(g, list) for g in groups)
    flat = [batch for group in groups for batch in group]
    assert [b.tolist() for _, b in flat] == [b.tolist() for _, b in single]
