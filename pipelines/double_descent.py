"""Double descent of Belkin, Hsu, Ma & Mandal (2018): test risk peaks at the interpolation threshold, then falls.

    mlflow run . -e double_descent --env-manager local
    python -m pipelines double_descent --methods rff --n 1000
    python -m pipelines double_descent --methods nn --devices 2 --strategy ddp --accelerator cpu

Each method sweeps its model size across the point where it starts to interpolate the n training
points, in one child run whose steps are the sizes:
- `rff` (Figure 2): random Fourier features of a Gaussian kernel, N features, the minimum-norm
  least-squares fit; threshold N = n. Also fits the kernel interpolant (the N -> infinity limit).
- `nn` (Figure 3): one hidden layer of H units, squared loss, SGD until the training set is
  classified without error or --max_epochs; size = (d+1)H + (H+1)K parameters, threshold n*K.
  Below the threshold each net starts from the previous (smaller) trained net (--weight_reuse).
  Every net's per-epoch metrics (steps from 0 for each) and trained state also go to the nn run.
- `forest` (Figure 4): scikit-learn random forests without bootstrap: one tree with more and more
  leaves up to the fully grown tree that interpolates, then more fully grown trees; size = leaves
  of the whole forest, threshold = the fully grown tree's leaves.
For each size: train and test squared loss (`*_risk`, sum over the K outputs against one-hot
targets), zero-one loss, and the l2 norm of the coefficients (all the net's parameters for nn).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from callbacks.stopping import stop_when
from datamodules.datamodule import ArrayDataModule
from modules.classifier import loss_fn, predictions
from modules.nets import build_net, count_parameters
from modules.random_features import (RandomFourierFeatures, gaussian_kernel, kernel_interpolant, median_distance,
                                     min_norm_least_squares)
from pipelines.figures import line_plot
from pipelines.params import CommonParams, param, require, require_distinct, require_fits, require_fraction
from pipelines.training import datamodule, recipe, train

METHODS = ("rff", "nn", "forest")
LR_DECAY = 0.9 ** (1 / 500)  # the paper's step size loses 10% every 500 epochs; here spread over the epochs
REUSE_STD = 0.1  # the paper draws the new units of a grown net from N(0, 0.01)


@dataclass
class Params(CommonParams):
    """Belkin et al. 2018: double descent of random Fourier features, one-hidden-layer nets and random forests."""

    methods: tuple[str, ...] = param(METHODS, "the models to sweep, in this order", choices=METHODS)
    n: int = param(1000, "training points, a seeded subset of the training set "
                         "(the paper: 10000 for rff and forest, 4000 for nn)")
    sigma: float = param(0.0, "Gaussian kernel bandwidth of rff; 0 = the median pairwise distance of the training inputs")
    rff_features: tuple[float, ...] = param((0.1, 0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0),
                                            "numbers of random features N, in units of n (1 = the threshold N = n)")
    nn_parameters: tuple[float, ...] = param((0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.5, 2.0, 5.0, 10.0),
                                             "numbers of parameters of the nets, in units of n*K (1 = the threshold); "
                                             "each gives the nearest hidden width H")
    weight_reuse: bool = param(True, "below the threshold, start each net from the previous smaller trained net")
    forest_leaves: tuple[float, ...] = param((0.02, 0.05, 0.1, 0.2, 0.4, 0.7),
                                             "max leaves of the single tree, as fractions of a fully grown tree's "
                                             "leaves (the fully grown tree itself is always included)")
    forest_trees: tuple[int, ...] = param((2, 5, 10, 20), "then numbers of fully grown trees")
    max_epochs: int = param(200, "epoch budget of each net (each stops once it fits the training set without error)")
    lr: float = param(0.01, "SGD step size of the nets")
    momentum: float = param(0.0, "SGD momentum of the nets (the paper: plain SGD)")

    def validate(self) -> None:
        super().validate()
        require(bool(self.methods), "methods", f"nothing to run; choose from {', '.join(METHODS)}")
        require(len(set(self.methods)) == len(self.methods), "methods", f"{','.join(self.methods)} repeats a method")
        require(self.sigma >= 0, "sigma", f"must be positive (or 0 for the median pairwise distance), got {self.sigma}")
        require(0 <= self.momentum < 1, "momentum", f"{self.momentum} is outside [0, 1)")
        sweeps = {"rff": ("rff_features",), "nn": ("nn_parameters",), "forest": ("forest_leaves", "forest_trees")}
        for method in self.methods:
            require(any(getattr(self, flag) for flag in sweeps[method]), sweeps[method][0], f"empty sweep for {method}")
        for flag in ("rff_features", "nn_parameters"):
            require(all(v > 0 for v in getattr(self, flag)), flag, "sizes must be positive")
        require_fraction(self.forest_leaves, "forest_leaves", low_open=True)
        require(all(t >= 1 for t in self.forest_trees), "forest_trees", "numbers of trees must be at least 1")
        for flag in ("rff_features", "nn_parameters", "forest_leaves", "forest_trees"):
            require_distinct(getattr(self, flag), flag)

    def preflight(self) -> None:
        super().preflight()
        arrays = self.arrays()
        available = len(arrays.y_train)
        require(2 <= self.n <= available, "n",
                f"{self.n} is outside [2, {available}], the size of {self.dataset}'s training set")
        if "rff" in self.methods:  # the largest model's features of every training and test point, in float64
            features = max(1, round(max(self.rff_features) * self.n))
            require_fits(features * (self.n + len(arrays.y_test)), "rff_features", "cpu",
                         f"the cosines of {features:,} random features at {self.n + len(arrays.y_test):,} points",
                         bytes_each=8)
        if "nn" in self.methods:
            largest = max(self.nn_parameters) * self.n * arrays.num_classes
            width = hidden_units(largest, math.prod(arrays.input_shape), arrays.num_classes)
            self.checked_net("fc", "nn_parameters", widths=(width,))


def risks(outputs: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(squared loss against one-hot targets, zero-one loss) of a predictor's outputs."""
    return loss_fn("squared", outputs, y).item(), (predictions(outputs) != y).double().mean().item()


class Curve:
    """One method's sweep: each size is a step of the method's child run; keeps the curves for the summary."""

    def __init__(self, method: str, run):
        self.method, self.run = method, run
        self.total = 0  # sizes in the sweep, for the progress lines
        self.rows: list[dict] = []
        self.threshold: float | None = None
        self.references: dict[str, dict[str, float]] = {}  # {label: {metric: value}}, drawn as horizontal lines

    def add(self, size: int, train: tuple[float, float], test: tuple[float, float], norm: float | None, **extra):
        row = {"size": size, "train_risk": train[0], "train_zero_one": train[1], "test_risk": test[0],
               "test_zero_one": test[1], "norm": norm, **extra}
        self.rows.append(row)
        self.run.log_metrics({k: v for k, v in row.items() if k != "size"}, step=size)
        extras = " ".join(f"{k}={v}" for k, v in extra.items())
        print(f"[{self.method} {len(self.rows)}/{self.total}] size={size} {extras} train_risk={train[0]:.3g} "
              f"test_risk={test[0]:.4g} test_zero_one={test[1]:.3f} norm={'-' if norm is None else f'{norm:.4g}'}",
              flush=True)

    def column(self, key: str) -> list:
        return [row[key] for row in self.rows]

    def summary(self) -> dict:
        return {"sizes": self.column("size"), "train_risk": self.column("train_risk"),
                "test_risk": self.column("test_risk"), "test_zero_one": self.column("test_zero_one"),
                "norm": self.column("norm"), "threshold": self.threshold}

    def headline(self) -> dict:
        """The peak of the test risk, the best test risk below the threshold, and the last one."""
        peak = max(self.rows, key=lambda row: row["test_risk"])
        under = [row["test_risk"] for row in self.rows if row["size"] < self.threshold]
        return {f"{self.method}_peak_size": peak["size"], f"{self.method}_peak_test_risk": peak["test_risk"],
                f"{self.method}_best_under_threshold_test_risk": min(under) if under else None,
                f"{self.method}_last_test_risk": self.rows[-1]["test_risk"]}


def _train_test(data: ArrayDataModule):
    (x, y), (x_test, y_test) = data.splits["train"], data.splits["test"]
    return x.cpu().flatten(1), y.cpu(), x_test.cpu().flatten(1), y_test.cpu()


def sweep_rff(params: Params, data: ArrayDataModule, curve: Curve) -> None:
    x, y, x_test, y_test = _train_test(data)
    n, targets = len(y), F.one_hot(y, data.num_classes).double()
    sigma = params.sigma or median_distance(x, params.seed)
    sizes = sorted({max(1, round(r * n)) for r in params.rff_features})
    curve.threshold, curve.total = n, len(sizes)
    alpha = kernel_interpolant(x, targets, sigma)
    kernel_test = risks(gaussian_kernel(x_test, x, sigma) @ alpha, y_test)
    kernel = curve.references["kernel (N = inf)"] = {"test_risk": kernel_test[0], "test_zero_one": kernel_test[1],
                                                     "norm": math.sqrt((targets * alpha).sum().item())}
    curve.run.log_metrics({"sigma": sigma, **{f"kernel_{k}": v for k, v in kernel.items()}})
    features = RandomFourierFeatures(x.shape[1], max(sizes), sigma, params.seed)
    train_cosines, test_cosines = features.cosines(x), features.cosines(x_test)
    for size in sizes:
        phi = features.features(train_cosines, size)
        coefficients = min_norm_least_squares(phi, targets)
        curve.add(size, risks(phi @ coefficients, y), risks(features.features(test_cosines, size) @ coefficients, y_test),
                  coefficients.norm().item())


def hidden_units(parameters: float, d: int, k: int) -> int:
    """The width H whose (d+1)H + (H+1)K parameters are nearest to `parameters` (at least 1)."""
    return max(1, round((parameters - k) / (d + 1 + k)))


def reuse_weights(smaller: torch.nn.Module, larger: torch.nn.Module) -> None:
    """The paper's weight reuse: the larger net's first units take the smaller trained net's weights, the rest N(0, 0.01)."""
    (small_in, small_out), (large_in, large_out) = ([m for m in net.modules() if isinstance(m, torch.nn.Linear)]
                                                    for net in (smaller, larger))
    h = small_in.out_features
    with torch.no_grad():
        for p in (large_in.weight, large_in.bias, large_out.weight):
            p.normal_(0, REUSE_STD)
        large_in.weight[:h], large_in.bias[:h] = small_in.weight, small_in.bias
        large_out.weight[:, :h] = small_out.weight
        large_out.bias.copy_(small_out.bias)


def sweep_nn(params: Params, data: ArrayDataModule, curve: Curve) -> None:
    x, y, x_test, y_test = _train_test(data)
    n, k, d = len(y), data.num_classes, x.shape[1]
    widths = sorted({hidden_units(r * n * k, d, k) for r in params.nn_parameters})
    curve.threshold, curve.total = n * k, len(widths)
    previous = None
    for width in widths:
        torch.manual_seed(params.seed)
        net = build_net("fc", data.input_shape, k, widths=(width,))  # PyTorch's default (Glorot-like) init
        size = count_parameters(net)
        if params.weight_reuse and previous is not None and size < curve.threshold:
            reuse_weights(previous, net)
        # in the method's run: it keeps each net's trained state, so a resumed run reloads the sweep, not retrains it
        trained = train(recipe(params, data, net, loss="squared", momentum=params.momentum, lr_decay=LR_DECAY,
                               callbacks=[stop_when("train_acc", 1.0)]), curve.run)
        module, previous = trained.module, trained.net
        on_train, on_test = module.evaluate(x, y), module.evaluate(x_test, y_test)
        norm = torch.cat([p.detach().flatten() for p in module.net.parameters()]).norm().item()
        curve.add(size, (on_train[0], 1 - on_train[1]), (on_test[0], 1 - on_test[1]), norm, hidden_units=width,
                  epochs=len(module.history))


def _probabilities(forest, x, num_classes: int) -> torch.Tensor:
    """The forest's averaged class frequencies as (len(x), K) outputs (a class absent from training gets 0)."""
    out = torch.zeros(len(x), num_classes, dtype=torch.float64)
    out[:, torch.as_tensor(forest.classes_)] = torch.as_tensor(forest.predict_proba(x), dtype=torch.float64)
    return out


def sweep_forest(params: Params, data: ArrayDataModule, curve: Curve) -> None:
    from sklearn.ensemble import RandomForestClassifier

    x, y, x_test, y_test = _train_test(data)

    def grow(trees: int, max_leaves: int | None):
        # No bootstrap: every tree sees all n points, so a fully grown tree interpolates them.
        return RandomForestClassifier(trees, max_leaf_nodes=max_leaves, bootstrap=False,
                                      random_state=params.seed).fit(x.numpy(), y.numpy())

    full_tree = grow(1, None)
    curve.threshold = int(full_tree.estimators_[0].get_n_leaves())
    configs = sorted({(1, max(2, round(f * curve.threshold))) for f in params.forest_leaves if f < 1})
    configs += [(1, None)] + [(t, None) for t in sorted(set(params.forest_trees)) if t > 1]
    curve.total = len(configs)
    for trees, max_leaves in configs:
        forest = full_tree if (trees, max_leaves) == (1, None) else grow(trees, max_leaves)
        size = int(sum(tree.get_n_leaves() for tree in forest.estimators_))
        curve.add(size, risks(_probabilities(forest, x.numpy(), data.num_classes), y),
                  risks(_probabilities(forest, x_test.numpy(), data.num_classes), y_test), None,
                  trees=trees, leaves_per_tree=size / trees)


SWEEPS = {"rff": sweep_rff, "nn": sweep_nn, "forest": sweep_forest}
FIGURES = {"rff": ("fig2_rff", "number of random Fourier features N", "l2 norm of the coefficients"),
           "nn": ("fig3_nn", "number of parameters (d+1)H + (H+1)K", "l2 norm of the parameters"),
           "forest": ("fig4_forest", "leaves of the forest (N_leaf_max x N_tree)", None)}


def run(params: Params, tracking) -> dict:
    data = datamodule(params, train_subset=params.n)
    summary = {}
    for method in params.methods:
        with tracking.child(method, {"method": method}) as child:
            curve = Curve(method, child)
            SWEEPS[method](params, data, curve)
            child.log_metrics({"threshold": curve.threshold})
        tracking.log_metrics(None, curve.headline())
        name, xlabel, norm_label = FIGURES[method]
        tracking.log_figure(_figure(curve, xlabel, norm_label, f"Belkin et al. 2018, {method}, n = {params.n}"), name)
        summary[method] = curve.summary()
    return summary


def headline(summary: dict) -> str:
    """Where each method's test risk peaks against its interpolation threshold, and where it ends."""
    parts = []
    for method, curve in summary.items():
        peak = max(range(len(curve["sizes"])), key=lambda i: curve["test_risk"][i])
        parts.append(f"{method}: test risk peaks at {curve['sizes'][peak]:,} ({curve['test_risk'][peak]:.3g}; "
                     f"threshold {curve['threshold']:,.0f}), ends at {curve['test_risk'][-1]:.3g}")
    return "; ".join(parts)


def _figure(curve: Curve, xlabel: str, norm_label: str | None, title: str):
    """Belkin's panels: test zero-one loss, test squared loss (log), norm (log), training losses; threshold dotted."""
    import matplotlib.pyplot as plt  # after pipelines.figures chose the headless backend

    panels = [("test_zero_one", "test zero-one loss", False), ("test_risk", "test squared loss", True)]
    if norm_label:
        panels.append(("norm", norm_label, True))
    figure, axes = plt.subplots(1, len(panels) + 1, figsize=(4.2 * (len(panels) + 1), 3.6), dpi=110)
    sizes, threshold = curve.column("size"), {"interpolation threshold": curve.threshold}
    for ax, (key, label, logy) in zip(axes, panels):
        hlines = {name: values[key] for name, values in curve.references.items() if key in values}
        line_plot({curve.method: (sizes, curve.column(key))}, xlabel, label, label, logx=True, logy=logy,
                  hlines=hlines, vlines=threshold, ax=ax)
    line_plot({"zero-one": (sizes, curve.column("train_zero_one")), "squared": (sizes, curve.column("train_risk"))},
              xlabel, "training loss", "training losses", logx=True, vlines=threshold, ax=axes[-1])
    figure.suptitle(title)
    figure.tight_layout()
    return figure
