"""examples/: the project's pieces under a plain Lightning Trainer, whose DDP ranks Lightning launches itself.

Each script runs as a user runs it, in its own process; with `--out` every rank saves what it holds. The
examples' 1,080 training examples split into whole shards, so 2 ranks take the same mini-batches as 1
process: masks must match exactly, other numbers to float precision (DDP sums the gradient in another order).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def run_example(script: str, out: Path, devices: int, *flags: str) -> tuple[str, list[dict]]:
    """(stdout, what each rank saved, in rank order) of `python examples/<script> --devices N --out <out> <flags>`."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, str(REPO / "examples" / script), "--devices", str(devices), "--out", str(out),
                           *flags], env=env, capture_output=True, text=True, timeout=900)
    saved = sorted(out.glob("rank*.pt"))
    # Only rank 0's exit code reaches us (Lightning started the others): a rank that failed saved nothing.
    assert done.returncode == 0 and len(saved) == devices, f"saved {[p.name for p in saved]}\n{done.stderr[-4000:]}"
    return done.stdout, [torch.load(path, weights_only=True) for path in saved]


def assert_same_net(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0)


def assert_masks_agree_on_every_rank(ranks: list[dict], trainings: int) -> None:
    """Every rank gathered one mask digest per rank at the start and end of every training: all equal."""
    for held in ranks:
        assert held["world_size"] == len(ranks) and len(held["rank_digests"]) == 2 * trainings
        assert all(digest == check[0] for check in held["rank_digests"] for digest in check)
        assert all(r["masks_agree"] for r in held["rounds"])
    assert_same_net(ranks[0]["net"], ranks[1]["net"])  # masks and weights, bit for bit


def test_prune_rewind_runs_under_a_plain_ddp_trainer(tmp_path):
    stdout, ranks = run_example("prune_rewind.py", tmp_path / "two", 2, "--rounds", "1", "--epochs", "1")
    assert len(ranks) == 2 and stdout.count("round ") == 2  # rank 0 alone prints, once per training
    assert_masks_agree_on_every_rank(ranks, trainings=2)
    assert ranks[0]["rounds"][1]["percent_remaining"] < 85  # the dense net was pruned
    survivors = [float(mask.sum()) for key, mask in ranks[0]["net"].items() if key.endswith("_mask")]
    assert ranks[0]["rank_digests"][-1][0][::2] == survivors  # a digest tells the masks it was taken of


@pytest.mark.slow
def test_prune_rewind_on_two_ranks_finds_the_ticket_of_one_process(tmp_path):
    flags = ("--rounds", "2", "--epochs", "2")
    _, (one,) = run_example("prune_rewind.py", tmp_path / "one", 1, *flags)
    _, ranks = run_example("prune_rewind.py", tmp_path / "two", 2, *flags)
    assert_masks_agree_on_every_rank(ranks, trainings=3)
    two = ranks[0]
    masks = [key for key in one["net"] if key.endswith("_mask")]
    assert masks and all(torch.equal(one["net"][key], two["net"][key]) for key in masks)
    assert one["rank_digests"] == [[check[0]] for check in two["rank_digests"]]
    assert two["rounds"][-1]["percent_remaining"] < 70  # two prunings
    assert [r["test_acc"] for r in two["rounds"]] == pytest.approx([r["test_acc"] for r in one["rounds"]], abs=0.01)
    assert [h["train_loss"] for h in two["history"]] == pytest.approx([h["train_loss"] for h in one["history"]], rel=1e-5)


def probe_errors(probe: dict) -> list[float]:
    return [probe["baseline_error"], *(e for layer in probe["reinit"].values() for e in layer.values()),
            *probe["rerandomize"].values()]


@pytest.mark.slow
def test_rewind_probe_on_two_ranks_probes_once_on_rank_zero_as_one_process_does(tmp_path):
    flags = ("--epochs", "4", "--probe_every", "2")
    _, (one,) = run_example("rewind_probe.py", tmp_path / "one", 1, *flags)
    stdout, (rank0, rank1) = run_example("rewind_probe.py", tmp_path / "two", 2, *flags)
    assert [p["epoch"] for p in rank0["probes"]] == [2, 4] and rank0["distance"]
    assert rank1["probes"] == [] and rank1["distance"] == {}  # evaluated once: on rank 0
    assert stdout.count("test error") == 1
    assert_same_net(rank0["net"], rank1["net"])
    assert rank0["history"] == rank1["history"]
    # As one process, to float precision: SGD with momentum turns 1e-7 into 4e-5 in 4 epochs (measured).
    assert_same_net(one["net"], rank0["net"], atol=1e-3)
    assert [h["train_loss"] for h in rank0["history"]] == pytest.approx([h["train_loss"] for h in one["history"]], rel=1e-5)
    for ours, theirs in zip(rank0["probes"], one["probes"], strict=True):
        assert ours["reinit"].keys() == theirs["reinit"].keys()
        assert probe_errors(ours) == pytest.approx(probe_errors(theirs), abs=0.01)  # a test example or two may flip
