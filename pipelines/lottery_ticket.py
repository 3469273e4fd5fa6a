"""Lottery tickets of Frankle & Carbin (2019): iterative magnitude pruning with rewinding, and its controls.

    mlflow run . -e lottery_ticket --env-manager local
    python -m pipelines lottery_ticket --seeds 2 --controls random_reinit,random_prune
    python -m pipelines lottery_ticket --dataset cifar10 --model conv2 --lr 2e-4 --max_epochs 20

Round 0 trains the dense net; every later round trains the winning ticket that the previous round
left: of each layer's surviving weights, those of smallest magnitude pruned at the rate of its kind
(`conv_rate`, `fc_rate`, `output_rate`; the paper's Figure 2: conv layers 10% for Conv-2/4 and 15%
for Conv-6, fully connected 20%, the output layer 10%; sparsity.json lists every layer's rate), the
survivors rewound to their values at iteration `rewind_step` (0 = the initialization). Each round
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

from callbacks.prune_rewind import (PRUNINGS, EarlyStopTrace, PruneRates, PruneRewind, apply, layer_kinds, layer_rates,
                                    masks, prepare, prunable_layers, pruned_count, pruning_groups, random_masks,
                                    sparsity_report, theta)
from modules.nets import NETS, build_net
from pipelines.figures import line_plot
from pipelines.params import CommonParams, param, require, require_distinct
from pipelines.training import datamodule, recipe, train

CONTROLS = ("random_reinit", "random_prune")
RESULT_FIELDS = ("weights_remaining", "early_stop_iter", "test_acc_at_early_stop", "final_test_acc")
PAPER_CONV_RATES = {"conv2": 0.1, "conv4": 0.1, "conv6": 0.15}  # Frankle & Carbin's Figure 2
OTHER_CONV_RATE = 0.2  # the zoo's other conv nets, absent from that table: the paper's fc rate


@dataclass
class Params(CommonParams):
    """Frankle & Carbin 2019: winning tickets found by iterative magnitude pruning, against their controls."""

    max_epochs: int = param(25, "epochs per training (mnist5k: 60 iterations each; the paper: 50,000 iterations)")
    batch_size: int = param(60, "mini-batch size (the paper's 60)")
    lr: float = param(1.2e-3, "learning rate (the paper: 1.2e-3 LeNet, 2e-4 Conv-2, 3e-4 Conv-4/6)")
    optimizer: str = param("adam", "optimizer", choices=("sgd", "adam"))
    model: str = param("lenet_300_100", "network from the zoo (conv2, conv4, conv6 for cifar10)", choices=tuple(NETS))
    rounds: int = param(14, "pruning rounds after the dense training (an fc layer keeps 0.8^14 = 0.044 of its weights)")
    conv_rate: float = param(0.0, "fraction of a conv layer's surviving weights pruned per round; 0: the paper's rate "
                             "for --model (0.1 for conv2 and conv4, 0.15 for conv6; 0.2 for the zoo's other nets)")
    fc_rate: float = param(0.2, "fraction of a fully connected hidden layer's surviving weights pruned per round "
                           "(the paper's 0.2)")
    output_rate: float = param(0.1, "fraction of the output layer's surviving weights pruned per round (the paper's "
                               "0.1, half the fc rate)")
    pruning: str = param("layerwise", "rank weights by magnitude per layer, or across the layers of a kind "
                         "(conv, fc, output)", choices=PRUNINGS)
    rewind_step: int = param(0, "rewind the survivors to their values at this iteration (0: the initialization)")
    controls: tuple[str, ...] = param(("random_reinit",), "controls trained every round (Figure 1: random_reinit; empty: none)",
                                      choices=CONTROLS)
    seeds: int = param(1, "replicates, seeded seed, seed+1, ...; figures show their mean and min-max")
    val_fraction: float = param(0.1, "share of the training set held out for validation (early stopping)")
    val_every: int = param(50, "validate every this many iterations (the early-stop resolution)")

    def validate(self) -> None:
        super().validate()
        require(0 <= self.conv_rate < 1, "conv_rate", f"{self.conv_rate} is outside (0, 1) (0: the paper's rate "
                "for --model)")
        for name in ("fc_rate", "output_rate"):
            require(0 < getattr(self, name) < 1, name, f"{getattr(self, name)} is outside (0, 1)")
        require(self.rounds >= 1, "rounds", f"must be a positive integer, got {self.rounds}")
        require(self.rewind_step >= 0, "rewind_step", f"must be an iteration (0 or more), got {self.rewind_step}")
        require_distinct(self.controls, "controls")
        require(self.seeds >= 1, "seeds", f"must be a positive integer, got {self.seeds}")
        require(0 < self.val_fraction < 1, "val_fraction", f"{self.val_fraction} is outside (0, 1)")
        require(self.val_every >= 1, "val_every", f"must be a positive integer, got {self.val_every}")

    def preflight(self) -> None:
        super().preflight()
        arrays, net = self.arrays(), self.checked_net(self.model)
        self.check_validation_split(self.val_fraction, "val_fraction")
        sizes = {name: layer.weight.numel() for name, layer in prunable_layers(net).items()}
        stalls = []  # per group: the rounds that prune some of its weights (a round that prunes none repeats the last)
        for names, rate in pruning_groups(layer_kinds(net), self.prune_rates(), self.pruning):
            left, pruning_rounds = sum(sizes[n] for n in names), 0
            while pruning_rounds < self.rounds and pruned_count(left, rate) >= 1:
                left, pruning_rounds = left - pruned_count(left, rate), pruning_rounds + 1
            stalls.append((pruning_rounds, names, left, rate))
            require(left >= len(names), "rounds", f"{self.rounds} rounds at rate {rate} leave {left} "
                    f"weights in layer {', '.join(names)}: fewer than one per layer")
        pruning_rounds, names, left, rate = min(stalls)
        require(pruning_rounds == self.rounds, "rounds", f"round {pruning_rounds + 1} would prune nothing of layer "
                f"{', '.join(names)} ({left} weights left, rate {rate}): at most {pruning_rounds} rounds prune every layer")
        n_train = len(arrays.y_train) - round(self.val_fraction * len(arrays.y_train))
        iterations = self.max_epochs * math.ceil(n_train / self.batch_size)
        require(self.rewind_step < iterations, "rewind_step", f"{self.rewind_step} is not below the {iterations} "
                "iterations of a training")
        require(self.val_every <= iterations, "val_every",
                f"{self.val_every} exceeds the {iterations} iterations of a training")

    def prune_rates(self) -> PruneRates:
        """The rates per layer kind, `conv_rate` 0 resolved to the paper's rate for the model."""
        return PruneRates(self.conv_rate or PAPER_CONV_RATES.get(self.model, OTHER_CONV_RATE), self.fc_rate,
                          self.output_rate)


def train_ticket(params: Params, net, data, seed: int, pruner: PruneRewind, child) -> dict:
    """Trains `net` (pruned and rewound by `pruner` at the end, in place); returns its early-stop results."""
    trace = EarlyStopTrace()
    # fused: torch's default CPU Adam slows down on the exact zeros that pruning leaves in its state
    train(recipe(params, data, net, seed=seed, fused=True, callbacks=[trace, pruner], check_val_every_n_epoch=None,
                 val_check_interval=params.val_every), child)
    identical = all(row == check[0] for check in pruner.rank_digests for row in check)  # rank 0's view of every rank
    return {**trace.result(), "masks_identical_on_ranks": float(identical)}


def run(params: Params, tracking) -> dict:
    total = params.seeds * (1 + params.rounds * (1 + len(params.controls)))
    rows: list[dict] = []
    for seed in range(params.seed, params.seed + params.seeds):
        prune_rates = run_replicate(params, seed, tracking, rows, total)
    summary = {"prune_rates": prune_rates, **summarize(params, rows)}
    for r, entry in enumerate(summary["rounds"], start=1):
        tracking.log_metrics(None, {f"{kind}_{k}": v for kind in ("winning", *params.controls)
                                    for k, v in entry[kind].items()}, step=r)
    tracking.log_metrics(None, {f"dense_{k}": v for k, v in summary["dense"].items()})
    _figures(params, rows, tracking)
    return summary


def run_replicate(params: Params, seed: int, tracking, rows: list[dict], total: int) -> dict[str, float]:
    """The dense training and every round of one replicate, each round followed by its controls; returns
    {layer: the fraction of its surviving weights each round pruned}."""
    data = datamodule(params, seed=seed, val_fraction=params.val_fraction)
    rates = params.prune_rates()

    def fresh_net(init_seed: int):
        L.seed_everything(init_seed, verbose=False)
        return prepare(build_net(params.model, data.input_shape, data.num_classes))

    def train_child(kind: str, round_: int, net, pruner: PruneRewind) -> None:
        """One training in its child run; `net` and `pruner` come out pruned and rewound for the next round."""
        report = sparsity_report(net, rates)
        with tracking.child(f"seed {seed} {kind}" + (f" round {round_}" if round_ else ""),
                            {"kind": kind, "round": round_, "replicate_seed": seed}) as child:
            _log_masks(child, net, report)
            result = train_ticket(params, net, data, seed, pruner, child)
            row = {"seed": seed, "kind": kind, "round": round_,
                   "weights_remaining": report["total"]["percent_remaining"], **result}
            child.log_metrics({k: row[k] for k in (*RESULT_FIELDS, "val_loss_at_early_stop", "masks_identical_on_ranks")})
        rows.append(row)
        print(f"[{len(rows)}/{total}] seed {seed} round {round_} {kind}: {row['weights_remaining']:.1f}% remaining, "
              f"early stop at iteration {row['early_stop_iter']} (test acc {row['test_acc_at_early_stop']:.4f}), "
              f"final test acc {row['final_test_acc']:.4f}", flush=True)

    ticket = fresh_net(seed)
    pruner = PruneRewind(rates, params.pruning, params.rewind_step)
    for round_ in range(params.rounds + 1):
        pruner.prune_at_end = round_ < params.rounds
        ticket_masks = {k: m.clone() for k, m in masks(ticket).items()}
        train_child("dense" if round_ == 0 else "winning", round_, ticket, pruner)
        if round_ == 0:
            continue
        control_seed = seed + 1000 * round_
        for kind in params.controls:
            net = fresh_net(control_seed)
            if kind == "random_reinit":  # the ticket's mask on a fresh initialization
                apply(net, ticket_masks, theta(net))
            else:  # a random mask of the ticket's per-layer sparsity on the ticket's initialization theta_k
                apply(net, random_masks(ticket_masks, control_seed), pruner.theta_k)
            train_child(kind, round_, net, PruneRewind(rates, prune_at_end=False))
    return layer_rates(ticket, rates)


def _log_masks(child, net, report: dict) -> None:
    """The training's masks (masks.npz, one boolean array per layer) and its per-layer sparsity report
    (with each layer's kind and prune rate)."""
    child.log_dict(report, "sparsity.json")
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "masks.npz")
        np.savez_compressed(path, **{name: m.detach().cpu().bool().numpy() for name, m in masks(net).items()})
        child.log_artifact(path)


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


def headline(summary: dict) -> str:
    """The sparsest round: the ticket's early stop and accuracy against each control's, and the dense net's."""
    dense, last = summary["dense"], summary["rounds"][-1]
    controls = [k for k in ("random_reinit", "random_prune") if k in last]
    row = lambda name, r: f"{name} stops at {r['early_stop_iter']:.0f} with {r['test_acc_at_early_stop']:.3f}"
    return (f"at {last['weights_remaining']:.1f}% of the weights: " + "; ".join(
        [row("winning ticket", last["winning"]), *(row(k, last[k]) for k in controls),
         row("dense net", dense)]))


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
