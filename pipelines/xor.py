"""Brutzkus & Globerson (2019): over-parameterization helps gradient descent find the XOR detector.

    mlflow run . -e xor --env-manager local
    python -m pipelines xor --ks 2,4,50,100 --seeds 20 --clustering_init true

XOR detection: x in {-1, +1}^(2d) read as d pairs, positive iff some pair is (1, 1) or (-1, -1).
The net has k filters w_i with output weight +1 and k filters u_i with -1 (width 2, stride 2),
ReLU and a max-pool over the d positions; it is trained with the hinge loss by full-batch gradient
descent from a small Gaussian initialization, and tested on all 4^d inputs. Each (k, seed) is a
child run; a seed draws its own training set and initialization. A training stops when the
training loss reaches 0 (a global minimum), when it stalls (no fall of 1e-3 in --patience epochs:
a local minimum or a tie with zero gradient), or at --max_epochs.

`--clustering_init true` (Figure 15): the --large_k net of each seed is clustered, its +1 filters
and its -1 filters apart, by k-means into --small_k centres each; a --small_k net starts from the
centres and is compared with the --small_k net from random initialization on the same data.
Figures: filters at initialization and at convergence for the smallest and largest k (Figure
14), test error against k, and the clustering comparison.
"""
from __future__ import annotations

from dataclasses import dataclass

import lightning as L
import numpy as np
import torch

from callbacks.stopping import stop_when
from datamodules.datamodule import ArrayDataModule
from datamodules.sources import xor_detection
from modules.nets import build_net
from pipelines.figures import line_plot, plt
from pipelines.params import CommonParams, param, require, require_distinct
from pipelines.training import recipe, train

STALL_DELTA = 1e-3  # a training loss that falls less than this in --patience epochs has stalled


@dataclass
class Params(CommonParams):
    """Brutzkus & Globerson 2019: XOR detection, small vs large k, clustering initialization."""

    dataset: str = param("xor", "the generated XOR detection data", choices=("xor",))
    max_epochs: int = param(60, "budget of each training, in epochs of --passes_per_epoch gradient-descent steps")
    batch_size: int = param(4096, "mini-batch size; at least --train_size is the paper's full-batch gradient descent")
    lr: float = param(0.05, "gradient-descent step size")
    d: int = param(4, "patterns (pairs of +-1 entries) per input; the test set is all 4^d inputs")
    train_size: int = param(48, "training examples: half drawn uniformly from the positive inputs, half from the negative")
    ks: tuple[int, ...] = param((2, 4, 50, 100), "k values: the net has k filters with output +1 and k with output -1")
    seeds: int = param(5, "seeds per k (--seed, --seed + 1, ...): each draws its own training set and initialization")
    init_std: float = param(0.01, "standard deviation of the Gaussian initialization of the filters")
    passes_per_epoch: int = param(50, "passes over the training set (full batch: gradient steps) per epoch; "
                                      "metrics, the test evaluation and the stall check are per epoch")
    patience: int = param(4, f"a training stops once its training loss has not fallen by {STALL_DELTA} in this many epochs")
    clustering_init: bool = param(True, "initialize a --small_k net from k-means centres of the --large_k net's filters")
    large_k: int = param(50, "k of the net whose filters are clustered")
    small_k: int = param(2, "k of the net initialized from the centres")

    def validate(self) -> None:
        super().validate()
        require(1 <= self.d <= 10, "d", f"must be between 1 and 10 (the test set has 4^d inputs), got {self.d}")
        require(self.train_size >= 2, "train_size", f"needs a positive and a negative example, got {self.train_size}")
        require(bool(self.ks), "ks", "nothing to run: give at least one k")
        require(all(k >= 1 for k in self.ks), "ks", f"every k must be a positive integer, got {','.join(map(str, self.ks))}")
        for name in ("seeds", "passes_per_epoch", "patience"):
            require(getattr(self, name) >= 1, name, f"must be a positive integer, got {getattr(self, name)}")
        require(self.init_std > 0, "init_std", f"must be positive, got {self.init_std}")
        if self.clustering_init:
            require(self.small_k >= 1, "small_k", f"must be a positive integer, got {self.small_k}")
            require(self.large_k > self.small_k, "large_k", f"must exceed --small_k {self.small_k}, got {self.large_k}")
        require_distinct(self.ks, "ks")

    def preflight(self) -> None:
        super().preflight()
        largest = max(self.ks + ((self.large_k,) if self.clustering_init else ()))
        self.checked_net("xor_net", "ks" if largest in self.ks else "large_k", k=largest)


class XorData(ArrayDataModule):
    """The XOR detection data of one seed and size, inputs kept at +-1, an epoch of several passes."""

    def __init__(self, d: int, train_size: int, batch_size: int, seed: int, passes_per_epoch: int):
        super().__init__("xor", batch_size=batch_size, seed=seed, eval_splits=("test",), standardize=False,
                         epoch_passes=passes_per_epoch)
        self.d, self.train_size = d, train_size

    def prepare_arrays(self):
        return xor_detection(self.d, self.train_size, self.seed)


def train_one(params: Params, k: int, seed: int, child, filters: torch.Tensor | None = None) -> dict:
    """Trains the 2k-filter net of one seed (from `filters` if given) by gradient descent on the hinge loss."""
    data = XorData(params.d, params.train_size, params.batch_size, seed, params.passes_per_epoch)
    data.setup()
    L.seed_everything(seed, verbose=False)  # the initialization follows the seed
    net = build_net("xor_net", data.input_shape, 2, k=k, init_std=params.init_std)
    if filters is not None:
        with torch.no_grad():
            net.filters.weight.copy_(filters)
    initial = net.filters.weight.detach().clone()
    stops = [stop_when("train_loss", 0.0, mode="min", stall_epochs=params.patience, stall_delta=STALL_DELTA)]
    trained = train(recipe(params, data, net, seed=seed, loss="hinge", momentum=0.0, callbacks=stops), child)
    train_loss, train_acc = trained.module.evaluate(*data.splits["train"])
    _, test_acc = trained.module.evaluate(*data.splits["test"])
    global_minimum = train_loss == 0.0  # the hinge loss is exactly 0 once every margin is at least 1
    return {"train_loss": train_loss, "train_acc": train_acc, "test_acc": test_acc,
            "global_minimum": global_minimum, "bad_global_minimum": global_minimum and test_acc < 1.0,
            "steps": trained.history[-1]["step"],
            "initial_filters": initial, "final_filters": trained.net.filters.weight.detach().clone()}


def clustered_filters(filters: torch.Tensor, large_k: int, small_k: int, seed: int) -> torch.Tensor:
    """k-means centres of the +1 filters and of the -1 filters apart: the initialization of a small_k net."""
    from sklearn.cluster import KMeans

    halves = (filters[:large_k].numpy(), filters[large_k:].numpy())
    centres = [KMeans(small_k, n_init=10, random_state=seed).fit(half).cluster_centers_ for half in halves]
    return torch.as_tensor(np.concatenate(centres), dtype=torch.float32)


def run(params: Params, tracking) -> dict:
    seeds = list(range(params.seed, params.seed + params.seeds))
    ks = list(dict.fromkeys(params.ks))
    planned = [(k, s, "random") for k in ks for s in seeds]
    if params.clustering_init:
        for s in seeds:  # the clustering study reuses the sweep's trainings of large_k and small_k
            planned += [(k, s, "random") for k in (params.large_k, params.small_k) if k not in ks]
            planned.append((params.small_k, s, "clustered"))
    results: dict[tuple[int, int, str], dict] = {}
    for index, (k, seed, init) in enumerate(planned, start=1):
        label = f"k={k} seed={seed}" + (f" clustered from k={params.large_k}" if init == "clustered" else "")
        filters = None
        if init == "clustered":
            filters = clustered_filters(results[(params.large_k, seed, "random")]["final_filters"],
                                        params.large_k, params.small_k, seed)
        with tracking.child(label, {"k": k, "train_seed": seed, "init": init}) as child:
            result = train_one(params, k, seed, child, filters)
            child.log_metrics({m: result[m] for m in ("train_acc", "test_acc", "train_loss", "steps")} |
                              {"global_minimum": float(result["global_minimum"])})
        results[(k, seed, init)] = result
        print(f"[{index}/{len(planned)}] {label}: train_acc={result['train_acc']:.4f} test_acc={result['test_acc']:.4f} "
              f"train_loss={result['train_loss']:.4f} steps={result['steps']}"
              f"{'' if result['global_minimum'] else ' (stopped at a non-zero loss)'}", flush=True)

    mean = lambda rows, key: float(np.mean([r[key] for r in rows]))
    per_k = {k: [results[(k, s, "random")] for s in seeds] for k in ks}
    summary = {"ks": {str(k): {"train_acc": mean(rows, "train_acc"), "test_acc": mean(rows, "test_acc"),
                               "bad_global_minima_share": mean(rows, "bad_global_minimum")}
                      for k, rows in per_k.items()},
               "clustering_init": {"random_init_test_acc": None, "clustered_init_test_acc": None}}
    if params.clustering_init:
        summary["clustering_init"] = {
            "random_init_test_acc": mean([results[(params.small_k, s, "random")] for s in seeds], "test_acc"),
            "clustered_init_test_acc": mean([results[(params.small_k, s, "clustered")] for s in seeds], "test_acc")}
    tracking.log_metrics(None, {f"test_acc_k{k}": v["test_acc"] for k, v in summary["ks"].items()} | {
        f"clustering_{name}": v for name, v in summary["clustering_init"].items()})
    _figures(params, ks, seeds, results, tracking)
    return summary


def headline(summary: dict) -> str:
    """Mean test accuracy per k, and the clustering initialization against random initialization."""
    line = ", ".join(f"k={k} test {row['test_acc']:.3f}" for k, row in summary["ks"].items())
    clustering = summary["clustering_init"]
    if clustering["clustered_init_test_acc"] is not None:
        line += (f"; small net from clustered filters {clustering['clustered_init_test_acc']:.3f} "
                 f"vs random init {clustering['random_init_test_acc']:.3f}")
    return line


def _figures(params: Params, ks: list[int], seeds: list[int], results: dict, tracking) -> None:
    shown = sorted({min(ks), max(ks)})
    figure, axes = plt.subplots(len(shown), 2, figsize=(8, 4 * len(shown)), dpi=120, squeeze=False)
    for row, k in enumerate(shown):
        result = results[(k, seeds[0], "random")]
        for col, (key, when) in enumerate((("initial_filters", "initialization"), ("final_filters", "end of training"))):
            _draw_filters(axes[row][col], result[key], k, f"k={k}, seed {seeds[0]}: {when}")
    figure.suptitle("Fig. 14: filters w (output +1, blue) and u (output -1, red)")
    figure.tight_layout()
    tracking.log_figure(figure, "fig14_filters")

    ordered = sorted(ks)
    errors = [[1 - results[(k, s, "random")]["test_acc"] for s in seeds] for k in ordered]
    figure = line_plot(
        {"mean test error": (ordered, [float(np.mean(e)) for e in errors])}, "k (filters per output sign)",
        f"test error on all 4^{params.d} inputs", f"Test error against k ({len(seeds)} seeds, band: min-max)",
        logx=True, bands={"mean test error": (ordered, [min(e) for e in errors], [max(e) for e in errors])})
    _label_ticks(figure.axes[0], ordered)
    tracking.log_figure(figure, "test_error_vs_k")

    if params.clustering_init:
        inits = {f"k={params.small_k}, random init": (params.small_k, "random"),
                 f"k={params.small_k}, clustered init": (params.small_k, "clustered"),
                 f"k={params.large_k} (clustered)": (params.large_k, "random")}
        series = {label: (seeds, [results[(k, s, init)]["test_acc"] for s in seeds]) for label, (k, init) in inits.items()}
        markers = ({"marker": "o", "markersize": 7}, {"marker": "s", "markersize": 10, "fillstyle": "none"},
                   {"marker": "x", "markersize": 7})
        styles = {label: {"linestyle": "none", **marker} for label, marker in zip(series, markers)}
        figure = line_plot(series, "seed", "test accuracy",
                           "Fig. 15: initializing a small net from a large net's clustered filters", styles=styles)
        _label_ticks(figure.axes[0], seeds)
        tracking.log_figure(figure, "fig15_clustering_init")


def _label_ticks(ax, values: list[int]) -> None:
    ax.minorticks_off()
    ax.set_xticks(values, [str(v) for v in values])


def _draw_filters(ax, filters: torch.Tensor, k: int, title: str) -> None:
    reach = max(float(filters.abs().max()), 1e-12) * 1.15
    for index, (a, b) in enumerate(filters.tolist()):
        ax.arrow(0, 0, a, b, color="tab:blue" if index < k else "tab:red", alpha=0.6,
                 width=reach * 0.004, head_width=reach * 0.03, length_includes_head=True)
    ax.set(xlim=(-reach, reach), ylim=(-reach, reach), aspect="equal", title=title)
    ax.tick_params(labelsize=7)
    ax.axhline(0, color="gray", linewidth=0.5)
    ax.axvline(0, color="gray", linewidth=0.5)
