"""ClassifierModule: losses, a real tiny fit, per-epoch history, determinism."""
import pytest
import torch

from datamodules.datamodule import ArrayDataModule
from modules.classifier import ClassifierModule, loss_fn, predictions
from modules.nets import build_net
from pipelines.training import Hardware, TrainJob, fit


def test_squared_loss_is_against_one_hot_targets():
    outputs, y = torch.tensor([[0.5, 0.2, 0.1]]), torch.tensor([1])
    assert loss_fn("squared", outputs, y).item() == pytest.approx(0.25 + 0.64 + 0.01)


def test_hinge_with_one_output_maps_labels_to_plus_minus_one_and_counts_zero_as_wrong():
    outputs, y = torch.tensor([[0.5], [-2.0], [0.0]]), torch.tensor([1, 1, 0])
    assert loss_fn("hinge", outputs, y, "none").tolist() == [0.5, 3.0, 1.0]
    assert (predictions(outputs) == y).tolist() == [True, False, False]


def _train(epochs=3, seed=0, steps_per_call=TrainJob.steps_per_call, **module_kwargs):
    dm = ArrayDataModule("digits", batch_size=64, seed=seed, val_fraction=0.1)
    dm.setup()
    torch.manual_seed(seed)
    module = ClassifierModule(build_net("fc", dm.input_shape, dm.num_classes, widths=(64,)), **module_kwargs)
    return fit(TrainJob(module, dm, Hardware(), epochs, seed, steps_per_call=steps_per_call)).module, dm


def test_a_real_tiny_fit_learns_digits_and_records_history():
    module, dm = _train(epochs=5, optimizer="adam", lr=3e-3)
    assert [h["epoch"] for h in module.history] == list(range(5))
    last = module.history[-1]
    assert last["train_acc"] > 0.9 and last["val_acc"] > 0.9 and last["test_acc"] > 0.9
    assert module.history[0]["train_loss"] > last["train_loss"]
    # evaluate() outside the Trainer agrees with the last epoch's test metrics.
    loss, acc = module.evaluate(*dm.splits["test"])
    assert acc == pytest.approx(last["test_acc"]) and loss == pytest.approx(last["test_loss"], rel=1e-4)


def test_same_seed_gives_the_same_numbers_on_the_cpu():
    a, _ = _train(epochs=2, seed=3)
    b, _ = _train(epochs=2, seed=3)
    c, _ = _train(epochs=2, seed=4)
    assert a.history == b.history
    assert a.history != c.history


def test_lr_decay_is_applied_per_epoch():
    module, _ = _train(epochs=3, lr=0.1, lr_decay=0.5)
    assert module.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** 3)


def test_grouped_mini_batches_train_exactly_as_one_per_lightning_step():
    grouped, dm = _train(epochs=2, lr_decay=0.9)
    single, _ = _train(epochs=2, lr_decay=0.9, steps_per_call=1)
    batches = -(-len(dm.splits["train"][1]) // 64)  # 23 mini-batches of 64 per epoch
    assert grouped.trainer.num_training_batches == -(-batches // 8) and single.trainer.num_training_batches == batches
    assert grouped.trainer.global_step == single.trainer.global_step == 2 * batches  # optimizer steps either way
    assert grouped.history == single.history
    assert all(torch.equal(a, b) for a, b in zip(grouped.state_dict().values(), single.state_dict().values()))
