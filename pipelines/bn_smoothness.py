"""BatchNorm smooths the loss landscape (Santurkar, Tsipras, Ilyas & Madry 2018, "How does batch normalization help
optimization?").

    mlflow run . -e bn_smoothness --env-manager local
    python -m pipelines bn_smoothness --variants none,bn,noisy_bn --lrs 0.02,0.05
    python -m pipelines bn_smoothness --dataset cifar10 --model vgg11 --lrs 0.05,0.1 --max_epochs 30   # the paper's setting

Each variant (no normalization, BatchNorm, noisy BatchNorm: per-example noise after every BN whose
per-activation mean and variance are redrawn at every step; on request `shifted_bn`, its control
with the step's shift and no per-example noise) at each learning rate is a child run.
While it trains, `callbacks.smoothness.SmoothnessProbe` probes the landscape every --probe_every
steps along the gradient, at theta - eta * g for eta = c * lr, c in --etas: the range of the loss,
the change of the gradient and the effective beta-smoothness; and the internal covariate shift of
--ics_layers (the paper's Definition 2.1). Figures: the notes' Figures 10-12 (the paper's
Figures 1, 2 and 4) and the ICS per variant.

The default is small_vgg on `digits` for 15 epochs (180 steps): at default init the no-BN net sits
on a plateau for its first ~50-100 steps, so a comparison needs the steps after it; on `mnist5k`
that many steps cost several times the few-minute budget (see the README for measured numbers).
A no-BN net that dies (chance accuracy, NaN) has a flat landscape and reverses every comparison,
and the probe at step 0 can dominate max beta: so every run reports `died` and `beta_median` (over
the probes after step 0) beside `beta_max`.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass


from callbacks.smoothness import QUANTILES, SmoothnessProbe, weight_layers
from modules.nets import NORMS, NoisyBatchNorm, build_net
from pipelines.figures import line_plot, plt
from pipelines.params import CommonParams, param, require, require_distinct
from pipelines.training import datamodule, recipe, train

MODELS = ("small_vgg", "vgg11", "deep_linear")  # the zoo's nets that take a `norm`


@dataclass
class Params(CommonParams):
    """Santurkar et al. 2018: BatchNorm vs none vs noisy BatchNorm; landscape smoothness probes; ICS."""

    dataset: str = param("digits", "dataset name (embedded: mnist5k, digits, mnist1d; torchvision: mnist, fashion_mnist, "
                                   "cifar10)")
    max_epochs: int = param(15, "epoch budget of each training")
    lr: float = param(0.02, "not used here: the learning rates are --lrs")
    model: str = param("small_vgg", "network (each built with norm = the variant)", choices=MODELS)
    variants: tuple[str, ...] = param(("none", "bn", "noisy_bn"), "normalizations after each conv/linear layer "
                                      "(shifted_bn: noisy BN's control, the step's shift without per-example noise)",
                                      choices=NORMS)
    lrs: tuple[float, ...] = param((0.02, 0.05), "learning rates (each variant trains at each)")
    momentum: float = param(0.9, "SGD momentum")
    noise_scale: float = param(1.0, "noisy BN: each step, each activation's noise has mean ~ U(-s, s) and std ~ U(s/2, 3s/2), "
                                    "every example draws its own, added after BN; shifted_bn: s * BN + m, m ~ U(-s, s), "
                                    "s ~ U(1 - s/2, 1 + s/2) per activation and step (0: plain BN)")
    probe_every: int = param(8, "probe the landscape every this many steps")
    etas: tuple[float, ...] = param((0.5, 1.0, 2.0, 4.0), "probe step sizes along -g, in multiples of the learning rate")
    ics_layers: tuple[int, ...] = param((2, 4), "weight layers (Conv/Linear, from 0, in forward order) whose ICS is measured")
    activation_layer: int = param(2, "weight layer whose normalized output's distribution is recorded (Fig. 11)")

    def validate(self) -> None:
        super().validate()
        require(len(self.variants) > 0, "variants", "give at least one variant")
        require(len(self.lrs) > 0, "lrs", "give at least one learning rate")
        require(min(self.lrs) > 0, "lrs", f"learning rates must be positive, got {min(self.lrs)}")
        require(self.probe_every >= 1, "probe_every", f"must be at least 1, got {self.probe_every}")
        require(len(self.etas) > 0, "etas", "give at least one step size")
        require(min(self.etas) > 0, "etas", f"step sizes must be positive, got {min(self.etas)}")
        require(math.isfinite(self.noise_scale) and self.noise_scale >= 0, "noise_scale",
                f"must be a finite non-negative number, got {self.noise_scale}")
        require(self.noise_scale < 2 or "shifted_bn" not in self.variants, "noise_scale",
                f"{self.noise_scale} is not below 2, which shifted_bn needs (its spread must stay positive)")
        require(0 <= self.momentum < 1, "momentum", f"{self.momentum} is outside [0, 1)")
        for name in ("variants", "lrs", "etas", "ics_layers"):
            require_distinct(getattr(self, name), name)

    def preflight(self) -> None:
        super().preflight()
        layers = self._weight_layers()
        require(all(1 <= i < layers for i in self.ics_layers), "ics_layers",
                f"layers must be in [1, {layers - 1}] ({self.model} has {layers} weight layers; layer 0 has no earlier layer)")
        require(0 <= self.activation_layer < layers, "activation_layer",
                f"must be in [0, {layers - 1}] ({self.model} has {layers} weight layers)")

    def _weight_layers(self) -> int:
        return len(weight_layers(self.checked_net(self.model)))


def train_one(params: Params, variant: str, lr: float, child) -> dict:
    """Trains one variant at one learning rate under the probe; returns its history and probe records."""
    data = datamodule(params)

    def net():
        built = build_net(params.model, data.input_shape, data.num_classes, norm=variant)
        for module in built.modules():
            if isinstance(module, NoisyBatchNorm):
                module.scale = params.noise_scale
        return built

    probe = SmoothnessProbe(params.probe_every, tuple(c * lr for c in params.etas), params.ics_layers,
                            params.activation_layer)
    trained = train(recipe(params, data, net, lr=lr, momentum=params.momentum, callbacks=[probe]), child)
    return {"history": trained.history, "records": probe.records, "chance": 1 / data.num_classes}


def _finite(value: float) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def summarize(result: dict) -> dict:
    """The summary.json entry of one run, from its history and probe records."""
    history, records = result["history"], result["records"]
    mean = lambda xs: statistics.fmean(xs) if xs else math.nan
    ics = [shift for r in records for shift in r.get("ics", {}).values()]
    later_betas = [r["beta"] for r in records if r["step"] > 0]
    entry = {
        "final_train_acc": history[-1]["train_acc"] if history else math.nan,
        "final_test_acc": history[-1].get("test_acc", math.nan) if history else math.nan,
        "loss_range_mean": mean([r["loss_range"] for r in records]),
        "grad_change_mean": mean([r["grad_change_max"] for r in records]),
        "beta_max": max((r["beta"] for r in records), default=math.nan),
        "beta_median": statistics.median(later_betas) if later_betas else math.nan,
        "ics_l2_mean": mean([l2 for l2, _ in ics]),
        "ics_cos_mean": mean([cos for _, cos in ics]),
    }
    losses = [r["loss"] for r in records] + [h["train_loss"] for h in history] + [entry["beta_max"]]
    # A run that died (NaN, or stuck at chance) has a flat landscape: its numbers compare nothing.
    entry["died"] = not all(map(math.isfinite, losses)) or not entry["final_train_acc"] >= 1.5 * result["chance"]
    return {k: (_finite(v) if isinstance(v, float) else v) for k, v in entry.items()}


def run(params: Params, tracking) -> dict:
    trainings = [(variant, lr) for lr in params.lrs for variant in params.variants]
    results, summary = {}, {}
    for index, (variant, lr) in enumerate(trainings, start=1):
        key = f"{variant}@{lr:g}"
        with tracking.child(key, {"variant": variant, "run_lr": lr}) as child:
            result = train_one(params, variant, lr, child)
            entry = summarize(result)
            for record in result["records"]:
                ics = list(record.get("ics", {}).values())
                child.log_metrics({
                    "probe_loss_range": record["loss_range"], "probe_grad_change": record["grad_change_max"],
                    "probe_beta": record["beta"], "probe_ics_l2": statistics.fmean(l2 for l2, _ in ics) if ics else None,
                    "probe_ics_cos": statistics.fmean(c for _, c in ics) if ics else None}, step=record["step"])
            child.log_metrics({k: v for k, v in entry.items() if k != "died"})
            child.set_tag("died", entry["died"])
            child.log_dict({"records": result["records"]}, "smoothness.json")
        tracking.log_metrics(None, {f"{variant}_lr{lr:g}_{k}": entry[k] for k in
                                    ("final_test_acc", "loss_range_mean", "grad_change_mean", "beta_median")})
        results[key], summary[key] = result, entry
        short = lambda k: "nan" if entry[k] is None else f"{entry[k]:.4g}"  # None: NaN, or no probe after step 0
        print(f"[{index}/{len(trainings)}] {key}: train_acc={entry['final_train_acc']} test_acc={entry['final_test_acc']} "
              f"loss_range={short('loss_range_mean')} grad_change={short('grad_change_mean')} "
              f"beta_median={short('beta_median')} beta_max={short('beta_max')} "
              f"ics_l2={entry['ics_l2_mean']} ics_cos={entry['ics_cos_mean']}{' DIED' if entry['died'] else ''}",
              flush=True)
    _figures(params, results, tracking)
    return {"runs": summary}


def _series(records: list[dict], key: str) -> tuple[list, list]:
    return [r["step"] for r in records], [r[key] for r in records]


def _figures(params: Params, results: dict, tracking) -> None:
    lrs, variants = params.lrs, params.variants
    # Figure 10 (paper Fig. 1): training and test accuracy over steps.
    figure, axes = plt.subplots(2, len(lrs), figsize=(5 * len(lrs), 7), dpi=120, squeeze=False)
    for col, lr in enumerate(lrs):
        for row, split in enumerate(("train", "test")):
            series = {v: ([h["step"] for h in results[f"{v}@{lr:g}"]["history"]],
                          [h.get(f"{split}_acc") for h in results[f"{v}@{lr:g}"]["history"]]) for v in variants}
            line_plot(series, "steps", f"{split} accuracy", f"Fig. 10: {split} accuracy, lr {lr:g}", ax=axes[row, col])
    figure.tight_layout()
    tracking.log_figure(figure, "fig10_accuracy")

    # Figure 11 (paper Fig. 2): one activation's distribution over training (percentile bands).
    figure, axes = plt.subplots(len(lrs), len(variants), figsize=(4 * len(variants), 3.2 * len(lrs)), dpi=120,
                                squeeze=False)
    for row, lr in enumerate(lrs):
        for col, variant in enumerate(variants):
            records = [r for r in results[f"{variant}@{lr:g}"]["records"] if "activation_quantiles" in r]
            steps = [r["step"] for r in records]
            q = [[r["activation_quantiles"][i] for r in records] for i in range(len(QUANTILES))]
            line_plot({"median": (steps, q[2])}, "steps", f"layer {params.activation_layer} activation",
                      f"Fig. 11: {variant}, lr {lr:g}", bands={"5-95%": (steps, q[0], q[4]), "25-75%": (steps, q[1], q[3])},
                      ax=axes[row, col])
    figure.tight_layout()
    tracking.log_figure(figure, "fig11_activations")

    # Figure 12 (paper Fig. 4): loss range, gradient change (shaded over the etas) and effective beta.
    for lr in lrs:
        figure, axes = plt.subplots(1, 3, figsize=(15, 4), dpi=120)
        runs = {v: results[f"{v}@{lr:g}"]["records"] for v in variants}
        # a band named like its series is drawn in the series' colour: the range over the etas
        line_plot({v: _series(r, "loss") for v, r in runs.items()}, "steps", "loss at theta (band: range along -g)",
                  "(a) loss landscape", logy=True, ax=axes[0],
                  bands={v: (_series(r, "loss")[0], _series(r, "loss_min")[1], _series(r, "loss_max")[1])
                         for v, r in runs.items()})
        line_plot({v: _series(r, "grad_change_max") for v, r in runs.items()}, "steps",
                  "max ||g - g'|| (band: range over eta)", "(b) gradient predictiveness", logy=True, ax=axes[1],
                  bands={v: (_series(r, "loss")[0], _series(r, "grad_change_min")[1], _series(r, "grad_change_max")[1])
                         for v, r in runs.items()})
        line_plot({v: _series(r, "beta") for v, r in runs.items()}, "steps", "max ||g - g'|| / ||theta - theta'||",
                  '(c) "effective" beta-smoothness', logy=True, ax=axes[2])
        figure.suptitle(f"Fig. 12: landscape along -g, eta = ({', '.join(f'{c:g}' for c in params.etas)}) x lr {lr:g}")
        figure.tight_layout()
        tracking.log_figure(figure, f"fig12_landscape_lr{lr:g}")

    # Internal covariate shift (Definition 2.1), mean over --ics_layers.
    if params.ics_layers:
        figure, axes = plt.subplots(len(lrs), 2, figsize=(10, 3.5 * len(lrs)), dpi=120, squeeze=False)
        for row, lr in enumerate(lrs):
            for col, (index, name) in enumerate(((0, "||G - G'||"), (1, "cos(G, G')"))):
                series = {}
                for v in variants:
                    records = [r for r in results[f"{v}@{lr:g}"]["records"] if "ics" in r]
                    series[v] = ([r["step"] for r in records],
                                 [statistics.fmean(s[index] for s in r["ics"].values()) for r in records])
                line_plot(series, "steps", name, f"ICS of layers {','.join(map(str, params.ics_layers))}, "
                          f"lr {lr:g}", logy=index == 0, ax=axes[row, col])
        figure.tight_layout()
        tracking.log_figure(figure, "ics")
