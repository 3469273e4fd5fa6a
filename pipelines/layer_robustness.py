"""Layer robustness of Zhang, Bengio & Singer, "Are all layers created equal?".

    mlflow run . -e layer_robustness --env-manager local
    python -m pipelines layer_robustness                                  # FCN 3x256 on mnist5k
    python -m pipelines layer_robustness --depths 1,2,3,4,6                # + the depth sweep (Figure 5)
    python -m pipelines layer_robustness --model vgg11 --dataset cifar10 --download true
    python -m pipelines layer_robustness --model resnet18 --dataset cifar10 --download true
    python -m pipelines layer_robustness --model small_vgg --norm bn --dataset digits --max_epochs 8 --checkpoints 0,1,2,3,5

Trains the net once (a child run) while `callbacks.rewind_probe.RewindProbe` keeps every layer at
the epochs in --checkpoints; then, for every layer alone, measures the test error after
re-initializing it to each checkpoint and after re-randomizing it from its own initializer.
In nets with BatchNorm, every BatchNorm re-estimates its running statistics on the training inputs
once a layer is changed (--bn_stats recompute): rewound statistics (--bn_stats rewind) would blame the
layer for stale statistics. A layer is *robust* when re-initializing it to epoch 0 (its values before
any update) keeps the test error within --robust_margin of the trained net's. --depths trains an
FCN of each depth (--depth_width units per hidden layer), a child run each, and plots the share of
robust layers against depth. Figures: the notes' Figures 2-4 (heatmaps, layers x checkpoints, darker = higher
error, re-randomization as the last column) and Figure 5.
"""
from __future__ import annotations

from dataclasses import dataclass

import matplotlib.pyplot as plt

from callbacks.rewind_probe import BN_STATS, RewindProbe
from modules.nets import NETS, NORMS, build_net
from pipelines.figures import line_plot
from pipelines.params import CommonParams, fc_options, param, require, require_distinct, require_fits
from pipelines.training import datamodule, recipe, train

NORM_NETS = ("vgg11", "small_vgg")


@dataclass
class Params(CommonParams):
    """Zhang, Bengio & Singer: re-initialization and re-randomization robustness of each layer."""

    max_epochs: int = param(30, "epochs of training (the last one is always a checkpoint)")
    model: str = param("fc", "network from the zoo (the paper's: fc, vgg11, resnet18)", choices=tuple(NETS))
    widths: tuple[int, ...] = param((256, 256, 256), "hidden widths of the fc model (the paper's FCN 3x256)")
    norm: str = param("none", "normalization after each conv of vgg11/small_vgg", choices=NORMS)
    momentum: float = param(0.9, "SGD momentum")
    checkpoints: tuple[int, ...] = param((0, 1, 2, 3, 5, 10), "epochs whose weights are kept (0 = before any update)")
    probe_every: int = param(0, "also probe every this many epochs during training (0: only at the end)")
    robust_margin: float = param(0.02, "a layer is robust if re-initializing it to epoch 0 adds at most this test error")
    bn_stats: str = param("recompute", "BatchNorm running statistics once a layer is rewound or re-randomized: "
                          "recompute (every BatchNorm re-estimates them on up to 10,000 training inputs) or rewind "
                          "(the layer's own are rewound with it, the others stay stale); no effect without BatchNorm",
                          choices=BN_STATS)
    depths: tuple[int, ...] = param((), "FCN depths (hidden layers) to sweep for Figure 5 (empty: no sweep)")
    depth_width: int = param(256, "hidden width of every layer of the depth sweep's FCNs")

    def validate(self) -> None:
        super().validate()
        cps = self.checkpoints
        require(0 in cps, "checkpoints", "must include 0 (before any update): robustness is re-initialization to epoch 0")
        require(all(a < b for a, b in zip(cps, cps[1:])), "checkpoints",
                f"must be strictly increasing, got {','.join(map(str, cps))}")
        require(all(0 <= c <= self.max_epochs for c in cps), "checkpoints",
                f"epochs must lie in [0, --max_epochs={self.max_epochs}], got {','.join(map(str, cps))}")
        require(self.probe_every >= 0, "probe_every", f"must be 0 or a positive integer, got {self.probe_every}")
        require(self.robust_margin >= 0, "robust_margin", f"must be non-negative, got {self.robust_margin}")
        require(all(d >= 1 for d in self.depths), "depths", f"depths must be positive, got {self.depths}")
        require_distinct(self.depths, "depths")
        require(all(w >= 1 for w in self.widths), "widths", "widths must be positive")
        require(self.depth_width >= 1, "depth_width", f"must be a positive integer, got {self.depth_width}")
        deepest = max(self.depths, default=1)  # its (depth - 1) width x width weight matrices: checked before building it
        require_fits((deepest - 1) * self.depth_width ** 2, "depths", self.accelerator,
                     f"the FCN of depth {deepest} and width {self.depth_width}")
        require(0 <= self.momentum < 1, "momentum", f"{self.momentum} is outside [0, 1)")
        require(self.norm == "none" or self.model in NORM_NETS, "norm",
                f"only {', '.join(NORM_NETS)} take a norm; {self.model} has its own")

    def preflight(self) -> None:
        super().preflight()
        self.checked_net(self.model, **self.net_options())
        if self.depths:
            self.checked_net("fc", "depths", widths=(self.depth_width,) * max(self.depths))

    def net_options(self) -> dict:
        """The options of --model: the fc model's widths, the norm of a net that takes one."""
        if self.model in NORM_NETS:
            return {"norm": self.norm}
        return fc_options(self)


def train_and_probe(params: Params, model: str, options: dict, child) -> RewindProbe:
    """Trains one net with the rewind probe attached; returns the probe as rank 0 left it."""
    data = datamodule(params, eval_splits=("test",))
    net = lambda: build_net(model, data.input_shape, data.num_classes, **options)
    probe = RewindProbe(params.checkpoints, params.probe_every, "test", params.seed, params.bn_stats)
    return train(recipe(params, data, net, momentum=params.momentum, callbacks=[probe]), child).callback(RewindProbe)


def robustness(result: dict, margin: float) -> dict:
    """Robust layers (re-initialized to epoch 0, test error within `margin` of the trained net's), their
    share of all layers, and the mean over layers of the test-error increase of that re-initialization."""
    baseline = result["baseline_error"]
    damage = {name: errors[0] - baseline for name, errors in result["reinit"].items()}
    robust = [name for name, d in damage.items() if d <= margin]
    return {"baseline_error": baseline, "robust_layers": robust, "robust_share": len(robust) / len(damage),
            "mean_reinit_damage": sum(damage.values()) / len(damage)}


def log_probe(child, probe: RewindProbe, margin: float, title: str) -> dict:
    """Logs one training's probe (metrics per probe epoch, table, heatmap); returns its robustness."""
    for result in probe.probes:
        metrics = {"baseline_error": result["baseline_error"]}
        for name, errors in result["reinit"].items():
            metrics.update({f"reinit_error/{name}/epoch_{tau}": e for tau, e in errors.items()})
            metrics[f"rerandomize_error/{name}"] = result["rerandomize"][name]
        child.log_metrics(metrics, step=result["epoch"])
    for tau in probe.distance[probe.layer_names[0]]:  # step = checkpoint epoch: a curve per layer
        metrics = {}
        for name in probe.layer_names:
            metrics[f"distance_from_init/{name}"] = probe.distance[name][tau]
            metrics[f"relative_distance_from_init/{name}"] = probe.relative_distance[name][tau]
        child.log_metrics(metrics, step=tau)
    scores = robustness(probe.result, margin)
    child.log_metrics({"robust_layers": len(scores["robust_layers"]), "robust_share": scores["robust_share"],
                       "mean_reinit_damage": scores["mean_reinit_damage"]})
    child.log_table(_table(probe), "layer_robustness_table.json")
    child.log_figure(heatmap(probe, title), "heatmap")
    return scores


def headline(summary: dict) -> str:
    """Which layers survive being reset to their initial values, against re-randomization of any layer."""
    worst_rerandomized = min(summary["rerandomize"].values())
    return (f"trained test error {summary['baseline_error']:.3f}; robust to re-initialization (epoch 0): "
            f"{', '.join(summary['robust_layers']) or 'none'} of {len(summary['reinit'])} layers; "
            f"re-randomizing any layer: test error >= {worst_rerandomized:.3f}")


def _table(probe: RewindProbe) -> dict[str, list]:
    """One row per (probe epoch, layer, checkpoint): re-init to each checkpoint, then "rand" (re-randomization)."""
    rows = []
    for result in probe.probes:
        for name, errors in result["reinit"].items():
            rows += [{"probe_epoch": result["epoch"], "layer": name, "checkpoint": str(tau), "test_error": e,
                      "distance_from_init": probe.distance[name][tau]} for tau, e in errors.items()]
            rows.append({"probe_epoch": result["epoch"], "layer": name, "checkpoint": "rand",
                         "test_error": result["rerandomize"][name], "distance_from_init": None})
    return {key: [row[key] for row in rows] for key in rows[0]}


def heatmap(probe: RewindProbe, title: str):
    """The notes' Figures 2-4: test error, layers x checkpoints (+ re-randomization), darker = higher;
    beside it each layer's distance from its initialization at each checkpoint, relative to its norm."""
    result = probe.result
    names, taus = list(result["reinit"]), list(next(iter(result["reinit"].values())))
    errors = [[result["reinit"][n][t] for t in taus] + [result["rerandomize"][n]] for n in names]
    distances = [[probe.relative_distance[n][t] for t in taus] for n in names]
    figure, (left, right) = plt.subplots(1, 2, figsize=(4 + 0.9 * len(taus), 1.5 + 0.32 * len(names)), dpi=120,
                                         gridspec_kw={"width_ratios": [len(taus) + 1, len(taus)]})
    if result["bn_stats"] != "none":
        title += f" (BN stats: {result['bn_stats']})"
    panels = ((left, errors, [str(t) for t in taus] + ["rand"], "Greys", 1.0, f"{title}: test error"),
              (right, distances, [str(t) for t in taus], "Blues", None, "||w_t - w_0|| / ||w_0||"))
    for ax, values, columns, cmap, vmax, label in panels:
        image = ax.imshow(values, cmap=cmap, vmin=0, vmax=vmax, aspect="auto")
        top = vmax or max(max(row) for row in values) or 1.0
        for i, row in enumerate(values):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if v > top / 2 else "black")
        ax.set(xticks=range(len(columns)), xticklabels=columns, yticks=range(len(names)), yticklabels=names,
               xlabel="checkpoint epoch", title=label)
        figure.colorbar(image, ax=ax, fraction=0.05)
    left.axvline(len(taus) - 0.5, color="tab:red", linewidth=2)  # re-randomization is not a checkpoint
    right.set_yticklabels([])
    figure.tight_layout()
    return figure


def _depth_figure(sweep: dict[int, dict]):
    """Figure 5: deeper FCNs are more robust (share of robust layers up, mean re-init damage down)."""
    depths = sorted(sweep)
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
    line_plot({"robust layers": (depths, [sweep[d]["robust_share"] for d in depths])}, "hidden layers",
              "share of robust layers", "Fig. 5: share of robust layers vs depth", ax=left)
    line_plot({"re-init to epoch 0": (depths, [sweep[d]["mean_reinit_damage"] for d in depths])}, "hidden layers",
              "mean test error increase (lower is better)", "mean over layers of re-init damage", ax=right)
    for ax in (left, right):
        ax.set_xticks(depths)
    figure.tight_layout()
    return figure


def _config(model: str, options: dict) -> tuple:
    """A hashable training configuration: equal configurations are trained once."""
    return model, tuple(options.items())


def _label(config: tuple) -> str:
    model, options = config
    return " ".join([model] + [f"{k}={','.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in options])


def run(params: Params, tracking) -> dict:
    main = _config(params.model, params.net_options())
    depth_configs = {d: _config("fc", {"widths": (params.depth_width,) * d}) for d in params.depths}
    configs = list(dict.fromkeys([main, *depth_configs.values()]))  # the default FCN is also a point of the sweep
    probes: dict[tuple, RewindProbe] = {}
    for index, config in enumerate(configs, start=1):
        with tracking.child(_label(config), {"model": config[0], **dict(config[1])}) as child:
            probes[config] = probe = train_and_probe(params, config[0], dict(config[1]), child)
            scores = log_probe(child, probe, params.robust_margin, _label(config))
        print(f"[{index}/{len(configs)}] {_label(config)}: baseline_error={scores['baseline_error']:.4f} "
              f"robust={scores['robust_layers']} of {len(probe.layer_names)} layers", flush=True)

    result = probes[main].result
    headline = robustness(result, params.robust_margin)
    summary = {"baseline_error": result["baseline_error"],
               "reinit": {n: {str(t): e for t, e in errors.items()} for n, errors in result["reinit"].items()},
               "rerandomize": result["rerandomize"],
               "robust_layers": headline["robust_layers"],
               "bn_stats": result["bn_stats"]}
    tracking.log_metrics(None, {k: headline[k] for k in ("baseline_error", "robust_share", "mean_reinit_damage")})
    tracking.log_figure(heatmap(probes[main], params.model), f"heatmap_{params.model}")
    if params.depths:
        sweep = {d: robustness(probes[config].result, params.robust_margin) for d, config in depth_configs.items()}
        summary["depth_sweep"] = {str(d): point for d, point in sweep.items()}
        tracking.log_figure(_depth_figure(sweep), "fig5_robust_share_vs_depth")
    return summary
