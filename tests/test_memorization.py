"""Tests for the memorization tracker, the critical sample ratio and the `memorization` entry point."""
import json

import pytest
import torch
from torch import nn

from callbacks.memorization import NOT_LEARNED, MemorizationTracker, critical_samples, forgetting_events, learned_epoch
from datamodules.datamodule import ArrayDataModule
from pipelines.memorization import noise_corruption


def test_learned_epoch_and_forgetting_events_on_a_hand_made_record():
    # rows: epochs 1..5; columns: examples
    correct = torch.tensor([
        [1, 0, 1, 1, 0, 1],
        [1, 1, 0, 1, 0, 1],
        [1, 1, 1, 0, 0, 0],
        [1, 0, 1, 1, 0, 0],
        [1, 1, 1, 1, 0, 1],
    ], dtype=torch.bool)
    assert learned_epoch(correct).tolist() == [1, 5, 3, 4, NOT_LEARNED, 5]
    assert forgetting_events(correct).tolist() == [0, 1, 1, 1, 0, 1]


def test_statistics_of_the_tracker():
    tracker = MemorizationTracker(csr_examples=0)
    for row in ([1, 0, 1, 0], [1, 1, 0, 0], [1, 1, 1, 0]):
        tracker._correct.append(torch.tensor(row, dtype=torch.bool))
    stats = tracker.statistics()
    assert stats["learned_epoch"].tolist() == [1, 2, 3, NOT_LEARNED]
    assert stats["forgetting_events"].tolist() == [0, 0, 1, 0]
    assert stats["never_forgotten"].tolist() == [True, True, False, False]  # never learned is not "never forgotten"


def _boundary_net() -> nn.Module:
    """Two classes split by the line x0 = x1: class 1 where x0 > x1."""
    net = nn.Linear(2, 2)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[-1.0, 1.0], [1.0, -1.0]]))
        net.bias.zero_()
    return net


def test_critical_samples_finds_the_flip_near_the_boundary_and_none_without_a_box():
    net = _boundary_net()
    x = torch.tensor([[0.52, 0.50], [0.45, 0.50], [3.0, 0.0], [0.0, 3.0]])  # two near the boundary, two far
    search = dict(step=0.01, noise=0.005, iterations=20, generator=torch.Generator().manual_seed(0))
    assert critical_samples(net, x, radius=0.05, **search).tolist() == [True, True, False, False]
    assert not critical_samples(net, x, radius=0.0, **search).any()
    # the signed gradient, not the noise, finds it: with no noise the same points flip
    assert critical_samples(net, x, radius=0.05, **{**search, "noise": 0.0}).tolist() == [True, True, False, False]


# Small data for the paper's claims: 500 mnist5k digits, batch 50 (10 steps an epoch), SGD lr 0.05.
# Seeds 0, 1, 2 gave epochs to fit (noise 0, 0.5, 1) = (9, 18, 25), (9, 16, 20), (9, 23, 24);
# learned in epoch 1 and never forgotten: clean data 0.83, 0.82, 0.80, random labels 0.09, 0.11, 0.16;
# at noise 0.5, clean 0.56, 0.52, 0.56 vs noisy (label changed) 0.02, 0.03, 0.05; mean CSR over
# training, noise 1 vs 0: 0.018 vs 0.001, 0.027 vs 0.006, 0.018 vs 0.002.
SMALL = ("--train_subset", "500", "--batch_size", "50", "--lr", "0.05", "--csr_examples", "100")


def test_paper_claims_end_to_end(run_pipeline):
    run = run_pipeline("memorization", *SMALL, "--noise_kinds", "randY", "--noise_levels", "0,0.5,1",
                       "--regularizers", "dropout", "--regularizer_epochs", "2")
    assert run.exit_code == 0
    summary = run.summary()
    assert set(summary) == {"epochs_to_fit", "learned_first_epoch_share", "csr", "regularizers"}

    epochs = summary["epochs_to_fit"]["randY"]  # more noise, more epochs to fit
    assert 1.5 * epochs["0"] < epochs["0.5"] <= epochs["1"]

    share = summary["learned_first_epoch_share"]["randY"]  # real examples are learned first, and kept
    assert share["0"]["noisy"] is None  # no noisy examples (at level 1, the clean ones are the redraws of the true class)
    assert share["0"]["clean"] > 0.6 and share["1"]["noisy"] < 0.3 and share["0"]["clean"] > 3 * share["1"]["noisy"]
    assert share["0.5"]["clean"] > 3 * share["0.5"]["noisy"]

    csr = summary["csr"]["randY"]  # one ratio per epoch; noise makes more points critical
    assert all(csr[level]["epoch"] == list(range(1, epochs[level] + 1)) for level in csr)
    mean = {level: sum(c["ratio"]) / len(c["ratio"]) for level, c in csr.items()}
    assert mean["1"] > 2 * mean["0"]

    study = summary["regularizers"]
    assert study["noise"] == "randY" and [r["strength"] for r in study["dropout"]] == [0.5]
    assert all(0 <= r[k] <= 1 for rows in (study["none"], study["dropout"]) for r in rows
               for k in ("val_acc_real", "train_acc_noise"))

    assert len(run.children) == 3 + 2 * 2  # three noise levels; real and noise data for none and dropout
    # Noisy examples are those whose label differs from the true one, not every redrawn label.
    child = next(c for c in run.children if c.data.params.get("aliases") == "randY=0.5")
    with open(run.client.download_artifacts(child.info.run_id, "per_example.json")) as handle:
        noisy = torch.tensor(json.load(handle)["noisy"])
    labels = {p: _training_labels(p) for p in (0.0, 0.5)}
    assert torch.equal(noisy, labels[0.5] != labels[0.0])
    assert {"figures/epochs_to_fit.png", "figures/first_learned_epoch_randY.png", "figures/critical_sample_ratio.png",
            "figures/learned_first_epoch_share.png", "figures/regularizers.png", "summary.json",
            "per_example_statistics.json"} <= set(run.artifact_paths())


def _training_labels(level: float) -> torch.Tensor:
    datamodule = ArrayDataModule(train_subset=500, corruption=noise_corruption("randY", level))
    datamodule.setup()
    return datamodule.splits["train"][1]


def test_level_zero_is_trained_once_for_both_kinds(run_pipeline):
    run = run_pipeline("memorization", *SMALL, "--noise_kinds", "randY,randX", "--noise_levels", "0",
                       "--regularizers", "", "--csr_examples", "0")
    summary = run.summary()
    assert len(run.children) == 1
    assert summary["epochs_to_fit"]["randY"]["0"] == summary["epochs_to_fit"]["randX"]["0"]
    assert summary["csr"]["randX"]["0"] == {"epoch": [], "ratio": []} and "regularizers" not in summary


@pytest.mark.parametrize("flags, flag", [
    (("--noise_kinds", "randY,randZ"), "noise_kinds"), (("--noise_levels", "0,1.5"), "noise_levels"),
    (("--noise_levels", "-0.1"), "noise_levels"), (("--regularizers", "dropout,mixup"), "regularizers")])
def test_bad_input_is_one_line_naming_the_flag(refused, flags, flag):
    assert f"--{flag}" in refused("memorization", *flags)


def test_ddp_tracks_once_on_rank_zero(run_pipeline):
    run = run_pipeline("memorization", *SMALL, "--noise_kinds", "randY", "--noise_levels", "0.5", "--max_epochs", "3",
                       "--regularizers", "", "--devices", "2", "--strategy", "ddp", "--accelerator", "cpu")
    assert run.exit_code == 0 and len(run.children) == 1
    summary = run.summary()
    assert summary["csr"]["randY"]["0.5"]["epoch"] == [1, 2, 3]  # the tracker's record came back from rank 0, once
    share = summary["learned_first_epoch_share"]["randY"]["0.5"]
    assert share["clean"] > share["noisy"]
