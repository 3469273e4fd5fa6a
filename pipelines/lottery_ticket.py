"""Lottery tickets of Frankle & Carbin (2019): iterative magnitude pruning with rewinding, and its controls.

    mlflow run . -e lottery_ticket --env-manager local
    python -m pipelines lottery_ticket --seeds 2 --controls random_reinit,random_prune
    python -m pipelines lottery_ticket --dataset cifar10 --model conv2 --lr 2e-4 --max_epochs 20

Round 0 trains the dense net; every later round trains the winning ticket that the previous round
left: `prune_rate` of its surviving weights pruned by magnitude (the output layer at half the rate),
the survivors rewound to their values at iteration `rewind_step` (0 = the initialization). Each round
r >= 1 also trains the controls on the same per-layer sparsity: `random_reinit` (the ticket's mask, a
fresh initialization) and `random_prune` (a random mask, the ticket's initialization theta_k). The
controls' seeds are `seed + 1000 * round`. All trainings of one replicate see the same data order.

Every training is a child run validated every `val_every` iterations; its early-stop iteration is
the one of minimum validation loss (the validation split is carved from the training set; the test
set is only reported). Figures: the paper's Figure 1 (early-stop iteration and test accuracy at
early stop vs percent of weights remaining), mean and min-max over replicates.
"""
from __future__ import annotations

import math
import os
import statistics
import tempfile
from dataclasses import dataclass

import lightning as L
import numpy as np

from callbacks.prune_rewind import (PRUNINGS, EarlyStopTrace, PruneRewind, apply, masks, prepare, prunable_layers,
                                    pruned_count, pruning_groups, random_masks, sparsity_report, theta)
from datamodules.datamodule import ArrayDataModule
from modules.classifier import ClassifierModule
from modules.nets import NETS, build_net
from pipelines.figures import line_plot
from pipelines.params import CommonParams, UsageError, param, require
from pipelines.training import Hardware, TrainJob, fit

CONTROLS = ("random_reinit", "random_prune")
RESULT_FIELDS = ("weights_remaining", "early_stop_iter", "test_acc_at_early_stop", "final_test_acc")


@dataclass
class Params(CommonParams):
    """Frankle & Carbin 2019: winning tickets found by iterative magnitude pruning, against their controls."""

    max_epochs: int = param(25, "epochs per training (mnist5k: 60 iterations each; the paper: 50,000 iterations)")
    batch_size: int = param(60, "mini-batch size (the paper's 60)")
    lr: float = param(1.2e-3, "learning rate (the paper: 1.2e-3 LeNet, 2e-4 Conv-2, 3e-4 Conv-4/6)")
    optimizer: str = param("adam", "optimizer", choices=("sgd", "adam"))
    model: str = param("lenet_300_100", "network from the zoo (conv2, conv4, conv6 for cifar10)", choices=tuple(NETS))
    rounds: int = param(14, "pruning rounds after the dense training (0.8^14: 4.4% of the weights remain)")
    prune_rate: float = param(0.2, "fraction of the surviving weights pruned per round")
    pruning: str = param("layerwise", "rank weights by magnitude per layer, or across layers", choices=PRUNINGS)
    output_rate_half: bool = param(True, "prune the output layer at half the rate (the paper's choice)")
    rewind_step: int = param(0, "rewind the survivors to their values at this iteration (0: the initialization)")
    controls: tuple[str, ...] = param(("random_reinit",), "controls trained every round (Figure 1: random_reinit)",
                                      choices=CONTROLS)
    seeds: int = param(1, "replicates, seeded seed, seed+1, ...; figures show their mean and min-max")
    val_fraction: float = param(0.1, "share of the training set held out for validation (early stopping)")
    val_every: int = param(50, "validate every this many iterations (the early-stop resolution)")

    def validate(self) -> None:
        from datamodules.sources import load  # late: keeps --help fast

        super().validate()
        require(0 < self.prune_rate < 1, "prune_rate", f"{self.prune_rate} is outside (0, 1)")
        require(self.rounds >= 1, "rounds", f"must be a positive integer, got {self.rounds}")
        require(self.seeds >= 1, "seeds", f"must be a positive integer, got {self.seeds}")
        require(0 < self.val_fraction < 1, "val_fraction", f"{self.val_fraction} is outside (0, 1)")
        require(self.val_every >= 1, "val_every", f"must be a positive integer, got {self.val_every}")
        arrays = load(self.dataset, self.data_dir, self.download, self.seed)
        try:
            net = build_net(self.model, arrays.input_shape, arrays.num_classes)
        except ValueError as error:  # e.g. a conv net on 1-D features
            raise UsageError("model", str(error)) from None
        sizes = {name: layer.weight.numel() for name, layer in prunable_layers(net).items()}
        for names, rate in pruning_groups(list(sizes), self.prune_rate, self.pruning, self.output_rate_half):
            left = sum(sizes[n] for n in names)
            for _ in range(self.rounds):
                left -= pruned_count(left, rate)
            require(left >= len(names), "rounds", f"{self.rounds} rounds at prune_rate {self.prune_rate} leave {left} "
                    f"weights in {', '.join(names)}: fewer than one per layer")
        n_train = len(arrays.y_train) - round(self.val_fraction * len(arrays.y_train))
        iterations = self.max_epochs * math.ceil(n_train / self.batch_size)
        require(self.rewind_step < iterations, "rewind_step", f"{self.rewind_step} is not below the {iterations} "
                "iterations of a training")
        require(self.val_every <= iterations, "val_every", f"{self.val_every} exceeds the {iterations} iterations of a training")


def train(params: Params, net, datamodule, seed: int, pruner: PruneRewind, run_id: str, tracking_uri: str):
    """Trains `net`; returns its early-stop results, the net as the pruner left it, and the pruner."""
    # fused: torch's default CPU Adam slows down on the exact zeros that pruning leaves in its state
    module = ClassifierModule(net, "cross_entropy", params.optimizer, params.lr, fused=True)
    job = fit(TrainJob(module, datamodule, Hardware.from_params(params), params.max_epochs, seed,
                       [EarlyStopTrace(), pruner], run_id, tracking_uri,
                       check_val_every_n_epoch=None, val_check_interval=params.val_every))
    trace, pruner = job.callbacks  # under DDP: rank 0's copies
    identical = all(row == check[0] for check in pruner.rank_digests for row in check)
    return {**trace.result(), "masks_identical_on_ranks": float(identical)}, job.module.net, pruner


def run(params: Params, tracking) -> dict:
    total = params.seeds * (1 + params.rounds * (1 + len(params.controls)))
    rows: list[dict] = []
    for seed in range(params.seed, params.seed + params.seeds):
        run_replicate(params, seed, tracking, rows, total)
    summary = summarize(params, rows)
    for r, entry in enumerate(summary["rounds"], start=1):
        tracking.log_metrics(None, {f"{kind}_{k}": v for kind in ("winning", *params.controls)
                                    for k, v in entry[kind].items()}, step=r)
    tracking.log_metrics(None, {f"dense_{k}": v for k, v in summary["dense"].items()})
    _figures(params, rows, tracking)
    return summary


def run_replicate(params: Params, seed: int, tracking, rows: list[dict], total: int) -> None:
    """The dense training and every round of one replicate, each round followed by its controls."""
    datamodule = ArrayDataModule(params.dataset, params.data_dir, params.download, params.batch_size, seed,
                                 val_fraction=params.val_fraction)
    datamodule.setup()

    def fresh_net(init_seed: int):
        L.seed_everything(init_seed, verbose=False)
        return prepare(build_net(params.model, datamodule.input_shape, datamodule.num_classes))

    def train_child(kind: str, round_: int, net, pruner: PruneRewind):
        report = sparsity_report(net)
        run_id = tracking.child(f"seed {seed} {kind}" + (f" round {round_}" if round_ else ""),
                                {"kind": kind, "round": round_, "replicate_seed": seed})
        _log_masks(tracking, run_id, net, report)
        result, net, pruner = train(params, net, datamodule, seed, pruner, run_id, tracking.uri)
        row = {"seed": seed, "kind": kind, "round": round_,
               "weights_remaining": report["total"]["percent_remaining"], **result}
        tracking.log_metrics(run_id, {k: row[k] for k in (*RESULT_FIELDS, "val_loss_at_early_stop",
                                                            "masks_identical_on_ranks")})
        tracking.end_child(run_id)
        rows.append(row)
        print(f"[{len(rows)}/{total}] seed {seed} round {round_} {kind}: {row['weights_remaining']:.1f}% remaining, "
              f"early stop at iteration {row['early_stop_iter']} (test acc {row['test_acc_at_early_stop']:.4f}), "
              f"final test acc {row['final_test_acc']:.4f}", flush=True)
        return net, pruner

    ticket = fresh_net(seed)
    pruner = PruneRewind(params.prune_rate, params.pruning, params.output_rate_half, params.rewind_step)
    for round_ in range(params.rounds + 1):
        pruner.prune_at_end = round_ < params.rounds
        ticket_masks = {k: m.clone() for k, m in masks(ticket).items()}
        ticket, pruner = train_child("dense" if round_ == 0 else "winning", round_, ticket, pruner)
        if round_ == 0:
            continue
        control_seed = seed + 1000 * round_
        for kind in params.controls:
            net = fresh_net(control_seed)
            if kind == "random_reinit":  # the ticket's mask on a fresh initialization
                apply(net, ticket_masks, theta(net))
            else:  # a random mask of the ticket's per-layer sparsity on the ticket's initialization theta_k
                apply(net, random_masks(ticket_masks, control_seed), pruner.theta_k)
            train_child(kind, round_, net, PruneRewind(params.prune_rate, prune_at_end=False))


def _log_masks(tracking, run_id: str, net, report: dict) -> None:
    """The training's masks (masks.npz, one boolean array per layer) and its per-layer sparsity report."""
    tracking.log_dict(report, "sparsity.json", run_id=run_id)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "masks.npz")
        np.savez_compressed(path, **{name: m.detach().cpu().bool().numpy() for name, m in masks(net).items()})
        tracking.client.log_artifact(run_id, path)


def _mean_fields(rows: list[dict]) -> dict:
    return {k: statistics.fmean(r[k] for r in rows) for k in RESULT_FIELDS}


def summarize(params: Params, rows: list[dict]) -> dict:
    """Means over replicates: the dense net, then per round the winning ticket and each control."""
    pick = lambda kind, round_: [r for r in rows if r["kind"] == kind and r["round"] == round_]
    dense = _mean_fields(pick("dense", 0))
    rounds = []
    for round_ in range(1, params.rounds + 1):
        entry = {kind: _mean_fields(pick(kind, round_)) for kind in ("winning", *params.controls)}
        rounds.append({"weights_remaining": entry["winning"]["weights_remaining"], **entry})
    return {"dense": {k: dense[k] for k in ("early_stop_iter", "test_acc_at_early_stop")}, "rounds": rounds}


def _figures(params: Params, rows: list[dict], tracking) -> None:
    styles = {"winning ticket": {"linestyle": "-"}, "random_reinit": {"linestyle": "--"},
              "random_prune": {"linestyle": ":"}}
    kinds = {"winning ticket": "winning", **{c: c for c in params.controls}}
    for field, ylabel, name in (("early_stop_iter", "early-stop iteration (val. loss)", "fig1_early_stop_iter"),
                                ("test_acc_at_early_stop", "test accuracy at early stop", "fig1_test_acc_at_early_stop")):
        series, bands = {}, {}
        for label, kind in kinds.items():
            points = [(100.0, [r[field] for r in rows if r["kind"] == "dense"])]  # every curve starts at the dense net
            points += [(statistics.fmean(r["weights_remaining"] for r in group), [r[field] for r in group])
                       for group in ([r for r in rows if r["kind"] == kind and r["round"] == k]
                                     for k in range(1, params.rounds + 1))]
            xs = [x for x, _ in points]
            series[label] = (xs, [statistics.fmean(v) for _, v in points])
            bands[label] = (xs, [min(v) for _, v in points], [max(v) for _, v in points])
        figure = line_plot(series, "percent of weights remaining", ylabel,
                           f"Fig. 1: {params.model} on {params.dataset} ({params.seeds} seeds, min-max)",
                           logx=True, styles=styles, bands=bands)
        figure.axes[0].invert_xaxis()  # the paper reads left to right as pruning proceeds
        tracking.log_figure(figure, name)
