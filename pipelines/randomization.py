"""Randomization tests of Zhang, Bengio, Hardt, Recht & Vinyals (2017): nets fit random labels and pixels.

    mlflow run . -e randomization --env-manager local
    python -m pipelines randomization --conditions true_labels,random_labels --label_noise 0,0.5,1

Each corruption condition and each label-noise level is a child run that trains until it fits the
training set (running epoch accuracy 100%, or training loss below --fit_loss) or reaches
--max_epochs. label_noise 0 and 1 are the true_labels and random_labels trainings (same data, same
seed), so they are trained once. Figures: the paper's Figure 1 a-c.
"""
from __future__ import annotations

from dataclasses import dataclass

from callbacks.stopping import stop_when, stopped_by_threshold
from datamodules.corruption import Corruption
from modules.nets import NETS, build_net
from pipelines.figures import line_plot
from pipelines.params import CommonParams, fc_options, format_value, param, require, require_distinct, require_fraction
from pipelines.training import datamodule, recipe, train

CONDITIONS = {"true_labels": "none", "random_labels": "random_labels", "shuffled_pixels": "shuffled_pixels",
              "random_pixels": "random_pixels", "gaussian": "gaussian"}


@dataclass
class Params(CommonParams):
    """Zhang et al. 2017: fitting random labels, shuffled/random pixels and Gaussian inputs."""

    max_epochs: int = param(300, "epoch budget of each training (each stops as soon as it fits)")
    model: str = param("fc", "network from the zoo", choices=tuple(NETS))
    widths: tuple[int, ...] = param((512,), "hidden widths of the fc model (the paper's MLP 1x512)")
    conditions: tuple[str, ...] = param(tuple(CONDITIONS), "corruption conditions", choices=tuple(CONDITIONS))
    label_noise: tuple[float, ...] = param((0.0, 0.2, 0.4, 0.6, 0.8, 1.0), "label corruption levels p")
    fit_loss: float = param(0.01, "a training also counts as fit once its epoch training loss is below this")
    momentum: float = param(0.9, "SGD momentum")
    lr_decay: float = param(1.0, "per-epoch learning-rate decay factor (the paper's CIFAR runs: 0.95)")
    weight_decay: float = param(0.0, "weight decay (regularization study)")
    dropout: float = param(0.0, "dropout after each hidden layer of fc nets (regularization study)")
    augment: bool = param(False, "random-crop augmentation, 4-pixel padding (regularization study)")

    def validate(self) -> None:
        super().validate()
        require_fraction(self.label_noise, "label_noise")
        require(bool(self.conditions) or bool(self.label_noise), "conditions", "nothing to run: no condition and no label_noise")
        require(self.fit_loss > 0, "fit_loss", f"must be positive, got {self.fit_loss}")
        require(0 <= self.dropout < 1, "dropout", f"{self.dropout} is outside [0, 1)")
        require(self.dropout == 0 or self.model == "fc", "dropout", "dropout is an option of the fc model only")
        require(all(w >= 1 for w in self.widths), "widths", f"widths must be positive, got {format_value(self.widths)}")
        require_distinct(self.conditions, "conditions")
        require_distinct(self.label_noise, "label_noise")
        require(0 <= self.momentum < 1, "momentum", f"{self.momentum} is outside [0, 1)")
        require(self.weight_decay >= 0, "weight_decay", f"must be non-negative, got {self.weight_decay}")
        require(0 < self.lr_decay <= 1, "lr_decay", f"{self.lr_decay} is outside (0, 1]")

    def preflight(self) -> None:
        super().preflight()
        self.checked_net(self.model, **_net_options(self))
        require(not self.augment or len(self.arrays().input_shape) == 3, "augment",
                f"random crops need images; {self.dataset}'s inputs have shape {self.arrays().input_shape}")


def _trainings(params: Params) -> dict[tuple[str, float], list[str]]:
    """Unique trainings {(corruption kind, p): names}; label noise 0 and 1 reuse the matching condition."""
    trainings: dict[tuple[str, float], list[str]] = {}
    for name in params.conditions:
        trainings.setdefault((CONDITIONS[name], 1.0), []).append(name)
    for p in params.label_noise:
        key = ("none", 1.0) if p == 0 else ("random_labels", 1.0) if p == 1 else ("label_noise", p)
        trainings.setdefault(key, []).append(f"label_noise={p:g}")
    return trainings


def _net_options(params: Params) -> dict:
    return fc_options(params, dropout=params.dropout)


def train_one(params: Params, corruption: Corruption, child) -> dict:
    """Trains one net on one corruption until it fits; returns its results and loss curve."""
    data = datamodule(params, corruption=corruption, augment=params.augment)
    net = lambda: build_net(params.model, data.input_shape, data.num_classes, **_net_options(params))
    stops = [stop_when("train_acc", 1.0), stop_when("train_loss", params.fit_loss, mode="min")]
    trained = train(recipe(params, data, net, momentum=params.momentum, weight_decay=params.weight_decay,
                           lr_decay=params.lr_decay, callbacks=stops), child)
    last = trained.history[-1]
    fitted = any(stopped_by_threshold(cb) for cb in trained.callbacks)
    return {"train_acc": last["train_acc"], "test_acc": last["test_acc"],
            "steps_to_fit": last["step"] if fitted else None, "chance_error": 1 - 1 / data.num_classes,
            "curve": ([h["step"] for h in trained.history], [h["train_loss"] for h in trained.history])}


def run(params: Params, tracking) -> dict:
    trainings = _trainings(params)
    results: dict[str, dict] = {}
    for index, ((kind, p), names) in enumerate(trainings.items(), start=1):
        label = " = ".join(names)
        with tracking.child(label, {"corruption": kind, "corruption_p": p, "aliases": ",".join(names)}) as child:
            result = train_one(params, Corruption(kind, p), child)
            child.log_metrics({k: result[k] for k in ("train_acc", "test_acc", "steps_to_fit")},
                              step=result["curve"][0][-1])
        for name in names:
            results[name] = result
        print(f"[{index}/{len(trainings)}] {label}: train_acc={result['train_acc']:.4f} "
              f"test_acc={result['test_acc']:.4f} steps_to_fit={result['steps_to_fit']}", flush=True)

    summary_of = lambda r: {k: r[k] for k in ("train_acc", "test_acc", "steps_to_fit")}
    summary = {"conditions": {c: summary_of(results[c]) for c in params.conditions},
               "label_noise": {f"{p:g}": summary_of(results[f"label_noise={p:g}"]) for p in params.label_noise}}
    _figures(params, results, tracking)
    return summary


def headline(summary: dict) -> str:
    """The paper's claim in one line: what each condition took to fit, and what it tests at."""
    parts = [f"{name.replace('_', ' ')} {row['train_acc']:.3f} train / {row['test_acc']:.3f} test"
             + (f" in {row['steps_to_fit']:,} steps" if row["steps_to_fit"] is not None else " (not fit)")
             for name, row in summary["conditions"].items()]
    return "; ".join(parts) or "label noise only: see the table in summary.json"


def _figures(params: Params, results: dict, tracking) -> None:
    if params.conditions:
        curves = {c: ([s / 1000 for s in results[c]["curve"][0]], results[c]["curve"][1]) for c in params.conditions}
        tracking.log_figure(line_plot(curves, "thousand steps", "average training loss",
                                      "Fig. 1a: learning curves under corruptions", logy=True,
                                      # an FC net sees shuffled pixels as it sees true ones: keep both visible
                                      styles={"shuffled_pixels": {"linestyle": "--", "marker": "x"}}),
                            "fig1a_training_loss")
    if params.label_noise:
        noise = sorted(params.label_noise)
        rows = [results[f"label_noise={p:g}"] for p in noise]
        fitted = [(p, r["steps_to_fit"] / 1000) for p, r in zip(noise, rows) if r["steps_to_fit"] is not None]
        tracking.log_figure(line_plot({"time to fit": ([p for p, _ in fitted], [s for _, s in fitted])},
                                      "label corruption p", "thousand steps to fit",
                                      "Fig. 1b: convergence slowdown"), "fig1b_steps_to_fit")
        tracking.log_figure(line_plot({"test error": (noise, [1 - r["test_acc"] for r in rows])},
                                      "label corruption p", "test error", "Fig. 1c: generalization error growth",
                                      hlines={"chance": rows[0]["chance_error"]}), "fig1c_test_error")
