"""Memorization in deep networks (Arpit et al. 2017): real data is learned first, noise is memorized later.

    mlflow run . -e memorization --env-manager local
    python -m pipelines memorization --noise_kinds randY --noise_levels 0,0.4,0.8 --regularizers dropout

Each noise kind and level is a child run that trains until it fits the training set (epoch training
accuracy --fit_acc) or reaches --max_epochs: randY redraws a fraction of the labels as uniform
classes, randX replaces a fraction of the training inputs by Gaussian noise (test images stay
real). Level 0 is the same clean training for every kind, so it is trained once. A
`MemorizationTracker` records which training examples are correct after every epoch (learned
epoch, forgetting events) and the critical sample ratio of a fixed subset. Per-example statistics
keep clean and noisy examples apart; noisy means the input was replaced or the label differs from
the true one (a random label that happens to be the true class is clean). Then every
--regularizers entry is trained for --regularizer_epochs on real data (validation accuracy) and on
pure noise (training accuracy): a good regularizer lowers the second without lowering the first
(Arpit's Figure 10).
"""
from __future__ import annotations

from dataclasses import dataclass

import matplotlib.pyplot as plt
import torch
from torch import nn

from callbacks.memorization import NOT_LEARNED, MemorizationTracker
from callbacks.stopping import stop_when, stopped_by_threshold
from datamodules.corruption import Corruption
from modules.nets import NETS, build_net
from pipelines.figures import line_plot
from pipelines.params import CommonParams, fc_options, format_value, param, require, require_distinct, require_fraction
from pipelines.training import Trained, datamodule, recipe, train

NOISE_KINDS = {"randY": "label_noise", "randX": "gaussian"}
REGULARIZERS = ("dropout", "weight_decay", "input_noise")


@dataclass
class Params(CommonParams):
    """Arpit et al. 2017: time to fit, per-example learning and critical sample ratio under randY/randX noise."""

    max_epochs: int = param(300, "epoch budget of each training to fit (each stops as soon as it fits)")
    lr: float = param(0.05, "learning rate")
    model: str = param("fc", "network from the zoo", choices=tuple(NETS))
    widths: tuple[int, ...] = param((512,), "hidden widths of the fc model")
    train_subset: int = param(0, "train on this many training examples (0: all)")
    noise_kinds: tuple[str, ...] = param(tuple(NOISE_KINDS), "randY: training labels made random; randX: training inputs "
                                         "replaced by Gaussian noise (test images stay real)", choices=tuple(NOISE_KINDS))
    noise_levels: tuple[float, ...] = param((0.0, 0.2, 0.4, 0.6, 0.8), "fractions of the training set made noise")
    fit_acc: float = param(1.0, "a training has fit once its epoch training accuracy reaches this")
    momentum: float = param(0.9, "SGD momentum")
    csr_examples: int = param(256, "training examples the critical sample ratio is measured on (0: off)")
    csr_every: int = param(1, "measure the critical sample ratio every this many epochs")
    csr_iterations: int = param(10, "search steps per point (the protocol allows up to 100)")
    csr_radius: float = param(0.3, "L-infinity box radius, in 1/255 of the [0, 1] pixel range")
    csr_step: float = param(0.25, "signed-gradient step, in 1/255 of the [0, 1] pixel range")
    csr_noise: float = param(0.2, "std of the Gaussian noise added each step, in 1/255 of the [0, 1] pixel range")
    regularizers: tuple[str, ...] = param(REGULARIZERS, "regularizers compared on real data vs noise", choices=REGULARIZERS)
    dropout_rates: tuple[float, ...] = param((0.5,), "dropout after each hidden layer (fc nets)")
    weight_decays: tuple[float, ...] = param((1e-3,), "weight decay (L2) strengths")
    input_noise_stds: tuple[float, ...] = param((1.0,), "std of Gaussian noise added to the inputs each step, in data stds")
    regularizer_noise: str = param("randY", "the noise data set of the regularizer study (level 1: all noise)",
                                   choices=tuple(NOISE_KINDS))
    regularizer_epochs: int = param(30, "fixed epoch budget of each regularizer training")
    val_fraction: float = param(0.2, "share of the training set held out as real validation data (regularizer study)")

    def validate(self) -> None:
        super().validate()
        require_fraction(self.noise_levels, "noise_levels")
        require(len(set(self.noise_levels)) == len(self.noise_levels), "noise_levels", "a level is repeated")
        require(bool(self.noise_kinds) and bool(self.noise_levels) or bool(self.regularizers), "noise_levels",
                "nothing to run: no noise kind or level, and no regularizer")
        require(0 < self.fit_acc <= 1, "fit_acc", f"{self.fit_acc} is outside (0, 1]")
        for name in ("csr_examples", "train_subset"):
            require(getattr(self, name) >= 0, name, f"must be a non-negative integer, got {getattr(self, name)}")
        for name in ("csr_every", "csr_iterations", "regularizer_epochs"):
            require(getattr(self, name) >= 1, name, f"must be a positive integer, got {getattr(self, name)}")
        for name in ("csr_radius", "csr_step", "csr_noise"):
            require(getattr(self, name) >= 0, name, f"must be non-negative, got {getattr(self, name)}")
        require(all(0 <= p < 1 for p in self.dropout_rates), "dropout_rates", "every rate must be in [0, 1)")
        require(all(w >= 0 for w in self.weight_decays), "weight_decays", "every strength must be non-negative")
        require(all(s >= 0 for s in self.input_noise_stds), "input_noise_stds", "every std must be non-negative")
        require(self.model == "fc" or "dropout" not in self.regularizers, "regularizers",
                "dropout is an option of the fc model only")
        require(0 < self.val_fraction < 1 or not self.regularizers, "val_fraction", f"{self.val_fraction} is outside (0, 1)")
        require(all(w >= 1 for w in self.widths), "widths", f"widths must be positive, got {format_value(self.widths)}")
        require(0 <= self.momentum < 1, "momentum", f"{self.momentum} is outside [0, 1)")
        for name in ("noise_kinds", "regularizers", "dropout_rates", "weight_decays", "input_noise_stds"):
            require_distinct(getattr(self, name), name)
        for regularizer, flag in (("dropout", "dropout_rates"), ("weight_decay", "weight_decays"),
                                  ("input_noise", "input_noise_stds")):
            require(regularizer not in self.regularizers or getattr(self, flag), flag,
                    f"--regularizers {regularizer} needs at least one strength")

    def preflight(self) -> None:
        super().preflight()
        self.checked_net(self.model, **fc_options(self))
        n = len(self.arrays().y_train)
        require(self.train_subset <= n, "train_subset", f"{self.train_subset:,} is more than the {n:,} training "
                f"examples of {self.dataset}")
        if self.regularizers:
            self.check_validation_split(self.val_fraction, "val_fraction", self.train_subset)


class InputNoise(nn.Module):
    """Arpit's input-noise regularizer: adds N(0, std^2) to the standardized inputs in training mode."""

    def __init__(self, net: nn.Module, std: float):
        super().__init__()
        self.net, self.std = net, std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x + self.std * torch.randn_like(x) if self.training else x)


def noise_corruption(noise_kind: str, level: float) -> Corruption:
    return Corruption(NOISE_KINDS[noise_kind], level) if level > 0 else Corruption()


def _trainings(params: Params) -> dict[Corruption, list[tuple[str, float]]]:
    """Unique trainings {corruption: [(noise kind, level)]}: level 0 is one clean training for every kind."""
    trainings: dict[Corruption, list[tuple[str, float]]] = {}
    for kind in params.noise_kinds:
        for level in params.noise_levels:
            trainings.setdefault(noise_corruption(kind, level), []).append((kind, level))
    return trainings


def _train(params: Params, corruption: Corruption, child, callbacks: list, max_epochs: int, val_fraction: float = 0.0,
           dropout: float = 0.0, weight_decay: float = 0.0, input_noise: float = 0.0) -> Trained:
    """One training of the pipeline's net (with the regularizer given, if any) on `corruption`."""
    data = datamodule(params, val_fraction=val_fraction, corruption=corruption, train_subset=params.train_subset,
                      eval_splits=("val",) if val_fraction else ("test",))

    def net():
        built = build_net(params.model, data.input_shape, data.num_classes, **fc_options(params, dropout=dropout))
        return InputNoise(built, input_noise) if input_noise else built

    return train(recipe(params, data, net, max_epochs=max_epochs, momentum=params.momentum,
                        weight_decay=weight_decay, callbacks=callbacks), child)


def _group(values: dict[str, torch.Tensor], mask: torch.Tensor) -> dict[str, float] | None:
    """Per-example statistics of the examples in `mask` (None when the group is empty)."""
    if not mask.any():
        return None
    learned = values["learned_epoch"][mask]
    return {"examples": int(mask.sum()), "learned_first_epoch_share": (learned == 1).float().mean().item(),
            "never_forgotten_share": values["never_forgotten"][mask].float().mean().item(),
            "learned_share": (learned != NOT_LEARNED).float().mean().item(),
            "forgetting_events_mean": values["forgetting_events"][mask].float().mean().item()}


def train_to_fit(params: Params, corruption: Corruption, child) -> dict:
    """One training until it fits, tracked per example; its results."""
    tracker = MemorizationTracker(params.csr_examples, params.csr_every, params.seed, params.csr_step / 255,
                                  params.csr_noise / 255, params.csr_radius / 255, params.csr_iterations)
    stop = stop_when("train_acc", params.fit_acc)
    trained = _train(params, corruption, child, [tracker, stop], params.max_epochs)  # both hold rank 0's state now
    values = tracker.statistics()
    noisy = trained.data.corrupted  # replaced inputs, and labels that differ from the true ones
    last = trained.history[-1]
    return {"epochs_to_fit": last["epoch"] + 1 if stopped_by_threshold(stop) else None,
            "train_acc": last["train_acc"], "test_acc": last["test_acc"],
            "groups": {"clean": _group(values, ~noisy), "noisy": _group(values, noisy)},
            "csr": {"epoch": [e for e, _ in tracker.csr], "ratio": [r for _, r in tracker.csr]},
            "per_example": {"learned_epoch": values["learned_epoch"].tolist(),
                            "forgetting_events": values["forgetting_events"].tolist(), "noisy": noisy.tolist()}}


def _regularizer_settings(params: Params) -> list[tuple[str, float]]:
    """(regularizer, strength) pairs; ("none", 0) is the unregularized reference every curve starts from."""
    strengths = {"dropout": params.dropout_rates, "weight_decay": params.weight_decays,
                 "input_noise": params.input_noise_stds}
    return [("none", 0.0)] + [(name, s) for name in params.regularizers for s in strengths[name]]


def regularizer_study(params: Params, tracking) -> dict:
    """Validation accuracy on real data and training accuracy on noise, per regularizer and strength."""
    settings = _regularizer_settings(params)
    results: dict[str, list[dict]] = {}
    for index, (name, strength) in enumerate(settings, start=1):
        row = {"strength": strength}
        for data, corruption in (("real", Corruption()), ("noise", noise_corruption(params.regularizer_noise, 1.0))):
            options = {name: strength} if name != "none" else {}
            with tracking.child(f"{name}={strength:g} on {data}",
                                {"regularizer": name, "strength": strength, "data": data}) as child:
                trained = _train(params, corruption, child, [], params.regularizer_epochs, params.val_fraction,
                                 **options)
                # Accuracies of the trained net itself (eval mode: no dropout, no input noise).
                accuracy = {split: trained.module.evaluate(*trained.data.splits[split])[1] for split in ("train", "val")}
                child.log_metrics({"final_train_acc": accuracy["train"], "final_val_acc": accuracy["val"]})
            row["val_acc_real" if data == "real" else "train_acc_noise"] = accuracy["val" if data == "real" else "train"]
        results.setdefault(name, []).append(row)
        print(f"[regularizer {index}/{len(settings)}] {name}={strength:g}: val_acc_real={row['val_acc_real']:.4f} "
              f"train_acc_noise={row['train_acc_noise']:.4f}", flush=True)
    return results


def run(params: Params, tracking) -> dict:
    trainings = _trainings(params)
    results: dict[tuple[str, float], dict] = {}
    for index, (corruption, aliases) in enumerate(trainings.items(), start=1):
        label = " = ".join(f"{kind}={level:g}" for kind, level in aliases)
        with tracking.child(label, {"corruption": corruption.kind, "corruption_p": corruption.fraction,
                                    "aliases": ",".join(f"{k}={v:g}" for k, v in aliases)}) as child:
            result = train_to_fit(params, corruption, child)
            metrics = {f"{k}_{group}": v for group, stats in result["groups"].items() if stats for k, v in stats.items()}
            child.log_metrics({**{k: result[k] for k in ("epochs_to_fit", "train_acc", "test_acc")}, **metrics})
            for epoch, ratio in zip(result["csr"]["epoch"], result["csr"]["ratio"]):
                child.log_metrics({"csr": ratio}, step=epoch)
            child.log_dict(result["per_example"], "per_example.json")
        for alias in aliases:
            results[alias] = result
        groups = result["groups"]
        share = lambda g: "-" if groups[g] is None else f"{groups[g]['learned_first_epoch_share']:.3f}"
        print(f"[{index}/{len(trainings)}] {label}: epochs_to_fit={result['epochs_to_fit']} "
              f"learned_first_epoch clean={share('clean')} noisy={share('noisy')} "
              f"final csr={result['csr']['ratio'][-1] if result['csr']['ratio'] else '-'}", flush=True)

    levels = {kind: sorted(params.noise_levels) for kind in params.noise_kinds}
    by_level = lambda pick: {kind: {f"{p:g}": pick(results[(kind, p)]) for p in ps} for kind, ps in levels.items()}
    first = lambda r: {g: None if s is None else s["learned_first_epoch_share"] for g, s in r["groups"].items()}
    summary = {"epochs_to_fit": by_level(lambda r: r["epochs_to_fit"]), "learned_first_epoch_share": by_level(first),
               "csr": by_level(lambda r: r["csr"])}
    tracking.log_dict(by_level(lambda r: r["groups"]), "per_example_statistics.json")
    if params.regularizers:
        summary["regularizers"] = {"noise": params.regularizer_noise, "epochs": params.regularizer_epochs,
                                   **regularizer_study(params, tracking)}
    _figures(params, results, levels, summary.get("regularizers"), tracking)
    return summary


def headline(summary: dict) -> str:
    """Epochs to fit per noise level, per kind of noise (more noise, more epochs: memorization is slower)."""
    parts = [f"{kind} epochs to fit " + " / ".join("-" if e is None else str(e) for e in by_level.values())
             + f" at noise {', '.join(by_level)}" for kind, by_level in summary["epochs_to_fit"].items()]
    return "; ".join(parts)


def _figures(params: Params, results: dict, levels: dict, regularizers: dict | None, tracking) -> None:
    if results:
        fitted = {kind: ([p for p in ps if results[(kind, p)]["epochs_to_fit"] is not None],
                         [results[(kind, p)]["epochs_to_fit"] for p in ps if results[(kind, p)]["epochs_to_fit"] is not None])
                  for kind, ps in levels.items()}
        tracking.log_figure(line_plot(fitted, "noise level", f"epochs to {params.fit_acc:g} training accuracy",
                                      "Epochs to fit vs noise level"), "epochs_to_fit")
        share = {f"{kind} {group}": ([p for p in ps if results[(kind, p)]["groups"][group]],
                                     [results[(kind, p)]["groups"][group]["learned_first_epoch_share"]
                                      for p in ps if results[(kind, p)]["groups"][group]])
                 for kind, ps in levels.items() for group in ("clean", "noisy")}
        tracking.log_figure(line_plot(share, "noise level", "share learned in epoch 1, never forgotten",
                                      "Real examples are learned first"), "learned_first_epoch_share")
        for kind, ps in levels.items():
            tracking.log_figure(_histograms(kind, ps, results), f"first_learned_epoch_{kind}")
        if params.csr_examples:
            figure, axes = plt.subplots(1, len(levels), figsize=(6 * len(levels), 4), dpi=120, squeeze=False)
            for ax, (kind, ps) in zip(axes[0], levels.items()):
                curves = {f"{kind}={p:g}": (results[(kind, p)]["csr"]["epoch"], results[(kind, p)]["csr"]["ratio"])
                          for p in ps}
                line_plot(curves, "epoch", "critical sample ratio", f"CSR during training, {kind}", ax=ax)
            figure.tight_layout()
            tracking.log_figure(figure, "critical_sample_ratio")
    if regularizers:
        curves = {name: ([r["train_acc_noise"] for r in regularizers["none"] + rows],
                         [r["val_acc_real"] for r in regularizers["none"] + rows])
                  for name, rows in regularizers.items() if name in REGULARIZERS}
        none = regularizers["none"][0]
        tracking.log_figure(line_plot(curves, f"training accuracy on {regularizers['noise']} noise",
                                      "validation accuracy on real data",
                                      "Regularizers: generalize on real data vs memorize noise",
                                      hlines={"no regularizer": none["val_acc_real"]},
                                      vlines={"no regularizer": none["train_acc_noise"]}), "regularizers")


def _histograms(kind: str, levels: list[float], results: dict):
    """Arpit's per-example view: when each example is learned for good, clean and noisy examples apart."""
    figure, axes = plt.subplots(1, len(levels), figsize=(3.2 * len(levels), 3), dpi=120, squeeze=False, sharey=True)
    for ax, p in zip(axes[0], levels):
        examples = results[(kind, p)]["per_example"]
        learned, noisy = torch.tensor(examples["learned_epoch"]), torch.tensor(examples["noisy"])
        last = max(int(learned.max()), 1)
        bins = torch.arange(0.5, last + 1.5).tolist()
        for group, mask in (("clean", ~noisy), ("noisy", noisy)):
            chosen = learned[mask & (learned != NOT_LEARNED)].float()
            if mask.any():
                ax.hist(chosen.tolist(), bins=bins, weights=[1 / int(mask.sum())] * len(chosen), alpha=0.6, label=group)
        ax.set(title=f"{kind}={p:g}", xlabel="epoch learned for good")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("share of the group")
    figure.tight_layout()
    return figure
