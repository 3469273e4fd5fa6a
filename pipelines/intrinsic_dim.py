"""Intrinsic dimension of Li, Farkhoor, Liu & Yosinski (2018): train nets in random d-dimensional
subspaces of their D parameters, theta = theta0 + P theta_d, and find d_int90, the smallest d that
reaches 90% of the directly trained net's accuracy.

    mlflow run . -e intrinsic_dim --env-manager local              (the project's main job: d_int90 of FC on mnist5k)
    python -m pipelines intrinsic_dim --model lenet --corruption shuffled_pixels --seeds 3
    python -m pipelines intrinsic_dim --mode sweep --ds 100,300,1000,3000      (Figure 6: accuracy vs d)
    python -m pipelines intrinsic_dim --mode efficiency                        (Figure 9: direct vs subspace)
    python -m pipelines intrinsic_dim --mode architectures                     (Figure 7: d_int90 vs D)

`--mode bisect` trains the direct net once (the baseline), then an Optuna study whose trials
bisect log d (`pipelines/bisection.py`): each trial is a child run that stops as soon as the
criterion (validation accuracy; training accuracy under random labels, as in the paper) reaches
the threshold, or at --max_epochs. The study lives in --storage, so running the same command
again resumes it and trains no finished trial again. d_int90 is read off a monotone fit of
accuracy against log d over all trials; `--seeds N` repeats the bisection and reports the spread.

Parallel workers share one study: the same command started K times on one storage (one per GPU
with CUDA_VISIBLE_DEVICES, or on several machines with PostgreSQL or a shared journal file), or
`--workers K`, which starts the K - 1 others itself. Each worker trains the steps it claimed (a
seed's next d, or the direct net), none is trained twice, and every worker ends with the
one-worker summary (`pipelines/bisection.py: SharedStudy`). Under DDP (`--devices N --strategy
ddp`, torchrun, srun) every rank trains and only global rank 0 reads and writes the study.

    python -m pipelines intrinsic_dim --workers 3 --seeds 3
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import optuna
from sqlalchemy.engine import make_url

from callbacks.stopping import stop_when
from datamodules.corruption import Corruption
from modules.nets import build_net, count_parameters
from modules.projections import PROJECTIONS
from modules.subspace import SubspaceNet
from pipelines.bisection import (Bisection, SharedStudy, default_storage, describe, estimate_d_int90,
                                 isotonic_curve, next_d, open_storage)
from pipelines.figures import line_plot
from pipelines.params import (CommonParams, UsageError, defaults, fc_options, format_value, param, require, require_distinct,
                              require_fits, require_fraction, resolved_accelerator)
from pipelines.redact import mask_url
from pipelines.tracking import NOT_IN_DIGEST, resolve_tracking_uri
from pipelines.training import datamodule, recipe, train

MODES = ("bisect", "sweep", "efficiency", "architectures")
CORRUPTIONS = ("none", "shuffled_pixels", "random_labels")
# Flags that change how the study is searched or where it is reported, not what a trial measures:
# left out of the default study name, so changing them resumes the same study. (--seed stays in:
# it draws the validation split and the corruption that the baseline and every trial share.)
NOT_IN_STUDY = NOT_IN_DIGEST + ("mode", "seeds", "d_min", "d_max", "resolution", "storage", "study_name", "ds",
                                "direct_widths", "arch_widths", "arch_depths")


RUN_NAME_FIELDS = ("mode", "model", "dataset", "projection")  # e.g. "intrinsic_dim bisect fc mnist5k fastfood"


@dataclass
class Params(CommonParams):
    """Li et al. 2018: intrinsic dimension d_int90 by random-subspace training."""

    max_epochs: int = param(20, "epoch budget of each training (a bisection trial stops when it passes)")
    lr: float = param(0.03, "learning rate of the subspace trainings (theta_d)")
    optimizer: str = param("adam", "optimizer", choices=("sgd", "adam"))
    mode: str = param("bisect", "bisect: d_int90 by bisection; sweep: accuracy over --ds; efficiency: direct vs "
                      "subspace at equal trainable parameters; architectures: d_int90 across FC widths x depths",
                      choices=MODES)
    model: str = param("fc", "network whose intrinsic dimension is measured", choices=("fc", "lenet"))
    widths: tuple[int, ...] = param((200, 200), "hidden widths of the fc model (FC 784-200-200-10: D = 199,210)")
    projection: str = param("fastfood", "random projection P from d to D dimensions", choices=tuple(PROJECTIONS))
    corruption: str = param("none", "corruption of the training set; under random_labels the criterion is training "
                            "accuracy", choices=CORRUPTIONS)
    val_fraction: float = param(0.2, "share of the training set held out as the validation (criterion) set")
    threshold: float = param(0.9, "a trial passes when its accuracy reaches threshold x baseline (d_int90: 0.9)")
    reference: float = param(0.0, "baseline accuracy to use instead of training the direct net (0: train it)")
    baseline_lr: float = param(0.001, "learning rate of the directly trained nets (baseline, efficiency)")
    d_min: int = param(100, "smallest d of the bisection")
    d_max: int = param(5000, "largest d of the bisection")
    resolution: float = param(0.1, "the bisection stops when hi / lo <= 1 + resolution")
    seeds: int = param(3, "independent bisections (seeds --seed, --seed + 1, ...): init, projection")
    storage: str = param("", "Optuna storage URL: sqlite:///..., postgresql://..., a *.journal file or journal:///path "
                         "(default: optuna.db beside the MLflow SQLite database, else in the working directory)")
    study_name: str = param("", "Optuna study (default: derived from the flags that change what a trial measures); "
                            "the same name resumes the study")
    workers: int = param(1, "start K worker processes on this storage, each with its own parent run, sharing the study's "
                         "trainings (on a GPU machine, each on the next visible GPU); 1: this process only")
    ds: tuple[int, ...] = param((100, 200, 300, 500, 750, 1000, 1500, 2500, 5000), "subspace dimensions of --mode sweep")
    direct_widths: tuple[int, ...] = param((1, 2, 4, 8, 16), "--mode efficiency: hidden widths of the small direct "
                                           "FC nets; the subspace net trains at d = each one's parameter count")
    arch_widths: tuple[int, ...] = param((50, 200), "--mode architectures: hidden-layer widths")
    arch_depths: tuple[int, ...] = param((1, 2), "--mode architectures: numbers of hidden layers")

    def validate(self) -> None:
        super().validate()
        for name in ("d_min", "d_max", "seeds", "workers"):
            require(getattr(self, name) >= 1, name, f"must be a positive integer, got {getattr(self, name)}")
        require(self.d_min <= self.d_max, "d_min", f"{self.d_min} is larger than --d_max {self.d_max}")
        require(self.resolution > 0, "resolution", f"must be positive, got {self.resolution}")
        require(self.mode not in ("bisect", "architectures") or next_d(self.d_min, self.d_max, self.resolution),
                "d_max", f"the bisection has no d to try between --d_min {self.d_min} and {self.d_max} at "
                f"--resolution {self.resolution}")
        require_fraction(self.threshold, "threshold", low_open=True)
        require_fraction(self.reference, "reference")
        require(self.baseline_lr > 0, "baseline_lr", f"must be positive, got {self.baseline_lr}")
        require(0 <= self.val_fraction < 1, "val_fraction", f"{self.val_fraction} is outside [0, 1)")
        require(self.val_fraction > 0 or self.corruption == "random_labels", "val_fraction",
                "the criterion is validation accuracy: it needs a validation split (> 0)")
        for name in ("widths", "ds", "direct_widths", "arch_widths", "arch_depths"):
            values = getattr(self, name)
            require(all(v >= 1 for v in values), name, f"must be positive integers, got {values}")
        require(bool(self.ds) or self.mode != "sweep", "ds", "--mode sweep needs at least one d")
        require(bool(self.direct_widths) or self.mode != "efficiency", "direct_widths",
                "--mode efficiency needs at least one width")
        for name in ("arch_widths", "arch_depths"):
            require(bool(getattr(self, name)) or self.mode != "architectures", name,
                    "--mode architectures needs at least one")
        for name in ("ds", "direct_widths", "arch_widths", "arch_depths"):
            require_distinct(getattr(self, name), name)
        if self.mode == "architectures":  # the deepest net's (depth - 1) width x width matrices: before building it
            require_fits((max(self.arch_depths) - 1) * max(self.arch_widths) ** 2, "arch_depths", self.accelerator,
                         f"the FC net of depth {max(self.arch_depths)} and width {max(self.arch_widths)}")
        require(self.workers == 1 or self.mode in ("bisect", "architectures"), "workers",
                f"workers share an Optuna study: --mode bisect or architectures, not {self.mode}")
        require(self.workers == 1 or self.devices * self.num_nodes == 1, "workers", "a worker trains on one device: "
                "--devices 1 with --workers (one DDP training at a time: --devices N without --workers)")

    def preflight(self) -> None:
        super().preflight()
        if self.val_fraction:
            self.check_validation_split(self.val_fraction, "val_fraction")
        self._check_sizes()
        if self.mode in ("bisect", "architectures"):
            url = self.storage_url()
            require(self.workers == 1 or not (url.startswith("sqlite") and make_url(url).database in (None, "", ":memory:")),
                    "storage", f"{url!r} is a database in memory, which --workers processes cannot share: give a file")
            try:  # an unreachable database is bad input: found here, before any run exists
                open_storage(self.storage_url())
            except Exception as error:  # noqa: BLE001 (drivers raise anything)
                raise UsageError("storage", f"cannot open {mask_url(self.storage_url())!r}: "
                                 f"{str(error).splitlines()[0] if str(error) else type(error).__name__}") from None

    def _check_sizes(self) -> None:
        """Every d asked for must fit in the D of the net it projects into; every net, and a dense projection
        (d x D numbers), in the device's memory. The nets are built on the meta device (`checked_net`)."""
        if self.mode == "architectures":
            Ds = [self._D(p, "arch_widths") for p in architectures(self)]
            require(self.d_max <= min(Ds), "d_max", f"{self.d_max} is larger than the smallest net's D = {min(Ds):,}")
            d, D = self.d_max, max(Ds)
        else:
            D = self._D(self)
            if self.mode == "bisect":
                require(self.d_max <= D, "d_max", f"{self.d_max} is larger than the net's D = {D:,}")
                d = self.d_max
            elif self.mode == "sweep":
                require(max(self.ds) <= D, "ds", f"{max(self.ds)} is larger than the net's D = {D:,}")
                d = max(self.ds)
            else:  # efficiency: the subspace net trains at d = each direct net's parameter count
                d = self._D(dataclasses.replace(self, model="fc", widths=(max(self.direct_widths),)), "direct_widths")
                require(d <= D, "direct_widths",
                        f"the direct net of width {max(self.direct_widths)} has {d:,} parameters, more than D = {D:,}")
        if self.projection == "dense":
            require_fits(d * D, "projection", self.accelerator, f"a dense projection of d = {d:,} into D = {D:,}")

    def _D(self, params: "Params", size_flag: str | None = None) -> int:
        """D of the net that `params` describe, on this dataset (built on the meta device)."""
        return count_parameters(self.checked_net(params.model, size_flag, **fc_options(params)))

    def storage_url(self) -> str:
        return self.storage or default_storage(resolve_tracking_uri(self.tracking_uri))

    def study(self) -> str:
        """The study name: --study_name, else one derived from everything that changes a trial's result."""
        if self.study_name:
            return self.study_name
        key = {k: v for k, v in dataclasses.asdict(self).items() if k not in NOT_IN_STUDY}
        digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
        return f"intrinsic_dim-{self.model}-{self.dataset}-{self.corruption}-{digest}"

    @property
    def criterion(self) -> str:
        """What the threshold applies to: training accuracy when the labels are random (the paper), else validation."""
        return "train_acc" if self.corruption == "random_labels" else "val_acc"


def build_net_for(params: Params, input_shape, num_classes):
    return build_net(params.model, input_shape, num_classes, **fc_options(params))


@functools.lru_cache(maxsize=None)
def _data_shape(dataset: str, data_dir: str, download: bool, seed: int) -> tuple[tuple[int, ...], int]:
    from datamodules.sources import load

    arrays = load(dataset, data_dir, download, seed)
    return arrays.input_shape, arrays.num_classes


def D_of(params: Params) -> int:
    """The number of parameters D of the net that `params` describe."""
    shape = _data_shape(params.dataset, params.data_dir, params.download, params.seed)
    return count_parameters(build_net_for(params, *shape))


def architectures(params: Params) -> list[Params]:
    """The FC nets of --mode architectures (Figure 7), every width at every depth."""
    return [dataclasses.replace(params, model="fc", widths=(width,) * depth)
            for depth in params.arch_depths for width in params.arch_widths]


# ---------------------------------------------------------------------------------------------
# One training


def train_net(params: Params, d: int | None, seed: int, child, stop_at: float | None = None) -> dict:
    """Trains the net directly (d None, at --baseline_lr) or in a random d-dimensional subspace.

    The data (validation split, corruption, batch order) comes from --seed, the same for every
    trial; `seed` draws the net's initialization theta0 and the projection. `acc` is the best
    criterion accuracy over the epochs; with `stop_at` the training stops once it reaches that.
    """
    data = datamodule(params, val_fraction=params.val_fraction, corruption=Corruption(params.corruption))

    def net():
        native = build_net_for(params, data.input_shape, data.num_classes)
        return native if d is None else SubspaceNet(native, d, params.projection, seed)

    callbacks = [stop_when(params.criterion, stop_at)] if stop_at is not None else []
    lr = params.lr if d is not None else params.baseline_lr
    trained = train(recipe(params, data, net, seed=seed, lr=lr, callbacks=callbacks), child)
    history = trained.history
    best = max(history, key=lambda h: h[params.criterion])
    return {"acc": best[params.criterion], "test_acc": history[-1]["test_acc"], "epochs": len(history),
            "D": trained.net.D if d is not None else count_parameters(trained.net)}


def train_child(params: Params, tracking, name: str, d: int | None, seed: int, stop_at: float | None = None,
                extra: dict | None = None) -> dict:
    """`train_net` inside its own child run, which ends with the metrics acc, test_acc, epochs."""
    with tracking.child(name, {"d": "direct" if d is None else d, "seed": seed, "widths": params.widths,
                               "model": params.model, **(extra or {})}) as child:
        result = train_net(params, d, seed, child, stop_at)
        child.log_metrics({k: result[k] for k in ("acc", "test_acc", "epochs")})
    return {**result, "run_id": child.id}


def baseline(params: Params, tracking, label: str = "") -> tuple[float, int]:
    """(baseline accuracy, D): --reference when given, else the directly trained net's accuracy."""
    if params.reference:
        return params.reference, D_of(params)
    result = train_child(params, tracking, f"{label}direct", None, params.seed)
    print(f"{label}direct net (D={result['D']:,}): {params.criterion}={result['acc']:.4f}", flush=True)
    return result["acc"], result["D"]


# ---------------------------------------------------------------------------------------------
# Modes


def bisect(params: Params, tracking, label: str = "") -> tuple[dict, list[dict]]:
    """d_int90 by bisection, one Optuna study, every seed; resumes a study that already holds trials,
    and shares it with every other worker on the same storage: this one trains what it claims.

    Returns the summary and one row per trial (with its seed, test accuracy, epochs and run id)."""
    study_name = params.study()
    study = SharedStudy(params.storage_url(), study_name, Bisection(params.d_min, params.d_max, params.resolution))
    if params.reference and study.baseline() is None:
        study.set_baseline(params.reference, D_of(params))
    for claim in study.claims(seeds=None):  # the direct net, once per study: every trial is judged against it
        with study.training(claim):
            result = train_child(params, tracking, f"{label}direct", None, params.seed,
                                 extra={"study_name": study_name, "optuna_trial": claim.number})
        print(f"{label}direct net (D={result['D']:,}): {params.criterion}={result['acc']:.4f}", flush=True)
        study.set_baseline(result["acc"], result["D"])
        study.tell(claim, result["acc"], {params.criterion: result["acc"], "test_acc": result["test_acc"],
                                          "epochs": result["epochs"], "mlflow_run_id": result["run_id"]})
    baseline_acc, D = study.baseline()
    threshold_acc = params.threshold * baseline_acc
    print(f"{label}study {study_name!r} in {mask_url(params.storage_url())}: threshold {params.criterion} "
          f"{threshold_acc:.4f} = {params.threshold} x {baseline_acc:.4f}", flush=True)

    seeds = list(range(params.seed, params.seed + params.seeds))
    for claim in study.claims(seeds):
        d, seed = claim.d, claim.seed
        with study.training(claim):
            result = train_child(params, tracking, f"{label}d={d} seed={seed}", d, seed, stop_at=threshold_acc,
                                 extra={"study_name": study_name, "optuna_trial": claim.number})
        passed = result["acc"] >= threshold_acc
        # The trial's value is its criterion accuracy; its user attributes name it (val_acc or train_acc)
        # beside the threshold, so optuna-dashboard's trial table reads on its own.
        if study.tell(claim, result["acc"], {"passed": passed, params.criterion: result["acc"],
                                             "threshold_acc": threshold_acc, "test_acc": result["test_acc"],
                                             "epochs": result["epochs"], "mlflow_run_id": result["run_id"]}):
            lo, hi = study.bracket(seed)
            print(f"{label}[seed {seed} trial {claim.number}] d={d}: {params.criterion}={result['acc']:.4f} "
                  f"{'passed' if passed else 'failed'} after {result['epochs']} epochs; bracket [{lo}, {hi}]", flush=True)

    rows = [{"d": t.params["d"], "acc": t.value, "passed": t.user_attrs["passed"],
             "seed": t.user_attrs["seed"], "trial": t.number, "test_acc": t.user_attrs["test_acc"],
             "epochs": t.user_attrs["epochs"], "mlflow_run_id": t.user_attrs["mlflow_run_id"]}
            for t in study.completed(seeds)]
    return _summary(rows, seeds, baseline_acc, threshold_acc, D), rows


def _summary(rows: list[dict], seeds: list[int], baseline_acc: float, threshold_acc: float, D: int) -> dict:
    """The summary of a set of trials: d_int90 from a monotone fit over all of them, and per seed.

    `d_int90_is` says whether d_int90 was "measured" or is a bound: "at_most" when even the
    smallest d tried passes, "above" when no d tried does."""
    def d_int90(rs: list[dict]) -> dict:
        d, kind = estimate_d_int90([(r["d"], r["acc"]) for r in rs], threshold_acc)
        return {"d_int90": d, "d_int90_is": kind}

    per_seed = [{"seed": s, **d_int90([r for r in rows if r["seed"] == s])} for s in seeds]
    return {**d_int90(rows), "D": D, "baseline_acc": baseline_acc, "threshold_acc": threshold_acc, "seeds": per_seed,
            "trials": [{"d": r["d"], "acc": r["acc"], "passed": r["passed"]} for r in rows]}


def sweep(params: Params, tracking) -> tuple[dict, list[dict]]:
    """Accuracy over the grid --ds at the full budget, every seed (the notes' Figure 6)."""
    baseline_acc, D = baseline(params, tracking)
    threshold_acc = params.threshold * baseline_acc
    seeds = list(range(params.seed, params.seed + params.seeds))
    rows = []
    for seed in seeds:
        for d in sorted(params.ds):
            result = train_child(params, tracking, f"d={d} seed={seed}", d, seed)
            rows.append({"d": d, "acc": result["acc"], "passed": result["acc"] >= threshold_acc, "seed": seed,
                         "test_acc": result["test_acc"], "epochs": result["epochs"], "mlflow_run_id": result["run_id"]})
            print(f"[seed {seed}] d={d}: {params.criterion}={result['acc']:.4f} test_acc={result['test_acc']:.4f}",
                  flush=True)
    return _summary(rows, seeds, baseline_acc, threshold_acc, D), rows


def efficiency(params: Params, tracking) -> dict:
    """Small direct FC nets against subspace training with as many trainable parameters (Figure 9)."""
    baseline_acc, D = baseline(params, tracking)
    seeds = list(range(params.seed, params.seed + params.seeds))
    points = []
    for width in params.direct_widths:
        small = dataclasses.replace(params, model="fc", widths=(width,))
        for seed in seeds:
            direct = train_child(small, tracking, f"direct fc {width} seed={seed}", None, seed)
            subspace = train_child(params, tracking, f"d={direct['D']} seed={seed}", direct["D"], seed)
            points.append({"params": direct["D"], "direct_width": width, "seed": seed,
                           "direct_acc": direct["acc"], "subspace_acc": subspace["acc"]})
            print(f"[seed {seed}] {direct['D']:,} trainable parameters: direct fc of width {width} "
                  f"{params.criterion}={direct['acc']:.4f}, subspace d={direct['D']} {subspace['acc']:.4f}", flush=True)
    return {"D": D, "baseline_acc": baseline_acc, "points": points}


def architecture_sweep(params: Params, tracking) -> dict:
    """d_int90 of FC nets of every width and depth against their D (Figure 7)."""
    rows = []
    for arch in architectures(params):
        name = "fc " + "-".join(map(str, arch.widths))
        result, trials = bisect(arch, tracking, label=f"{name}: ")
        rows.append({"widths": list(arch.widths), **{k: result[k] for k in
                                                     ("D", "d_int90", "d_int90_is", "baseline_acc", "threshold_acc",
                                                      "seeds")}})
        _log_bisect_figure(arch, result, trials, tracking, f"d_int90_{name.replace(' ', '_')}")
    found = [r["d_int90"] for r in rows if r["d_int90_is"] == "measured"]
    ratio = lambda xs: max(xs) / min(xs) if xs else None
    return {"architectures": rows, "d_int90_ratio": ratio(found), "D_ratio": ratio([r["D"] for r in rows])}


# ---------------------------------------------------------------------------------------------


def run(params: Params, tracking) -> dict:
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # progress is ours: one line per trial
    with other_workers(params, tracking):
        return _run(params, tracking)


@contextlib.contextmanager
def other_workers(params: Params, tracking) -> Iterator[None]:
    """--workers K: K - 1 more processes of this command (with --workers 1), started now and waited for at
    the end, each with its own parent run in this experiment; with a GPU, worker k sees only the k-th
    visible one. They stop (SIGTERM) when this process fails."""
    if params.workers == 1:
        yield
        return
    default = defaults(Params)
    flags = {name: format_value(value) for name, value in dataclasses.asdict(params).items()
             if format_value(value) != default[name]}
    flags.update(workers="1", experiment_name=tracking.client.get_experiment(tracking.experiment_id).name)
    command = [sys.executable, "-m", "pipelines", "intrinsic_dim", *(f"--{k}={v}" for k, v in flags.items())]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_RUN_ID"}  # each its own parent, even under `mlflow run`
    gpus = []
    if resolved_accelerator(params.accelerator) == "gpu":  # this process trains on the first visible GPU
        import torch

        gpus = os.environ.get("CUDA_VISIBLE_DEVICES", ",".join(map(str, range(torch.cuda.device_count())))).split(",")
    workers = [subprocess.Popen(command, env={**env, **({"CUDA_VISIBLE_DEVICES": gpus[k % len(gpus)]} if gpus else {})})
               for k in range(1, params.workers)]
    try:
        yield
    except BaseException:
        for worker in workers:
            worker.terminate()
        raise
    finally:
        codes = [worker.wait() for worker in workers]
    failed = [f"pid {w.pid} exited with code {code}" for w, code in zip(workers, codes) if code]
    if failed:
        raise RuntimeError(f"--workers: {', '.join(failed)} (the study holds what they finished)")


def _run(params: Params, tracking) -> dict:
    if params.mode == "efficiency":
        summary = efficiency(params, tracking)
        tracking.log_metrics(None, {"D": summary["D"], "baseline_acc": summary["baseline_acc"]})
        _log_efficiency_figure(params, summary, tracking)
        return summary
    if params.mode == "architectures":
        summary = architecture_sweep(params, tracking)
        tracking.log_metrics(None, {"d_int90_ratio": summary["d_int90_ratio"], "D_ratio": summary["D_ratio"]})
        _log_architectures_figure(summary, tracking)
        return summary
    result, rows = bisect(params, tracking) if params.mode == "bisect" else sweep(params, tracking)
    if rows:  # every trial with its seed, epochs, test accuracy and child run, as a table in the UI
        tracking.log_table({k: [r[k] for r in rows] for k in rows[0]}, "trials.json")
    # A bound is logged under its own name (d_int90_at_most, d_int90_above), never as d_int90.
    found = [s["d_int90"] for s in result["seeds"] if s["d_int90_is"] == "measured"]
    d_int90 = "d_int90" if result["d_int90_is"] == "measured" else f"d_int90_{result['d_int90_is']}"
    tracking.log_metrics(None, {d_int90: result["d_int90"]} | {k: result[k] for k in ("D", "baseline_acc", "threshold_acc")} |
                         ({"d_int90_min": min(found), "d_int90_max": max(found)} if found else {}))
    _log_bisect_figure(params, result, rows, tracking,
                       "fig6_accuracy_vs_d" if params.mode == "sweep" else "d_int90_bisection")
    _report(params, result)
    return result


def _report(params: Params, result: dict) -> None:
    per_seed = ", ".join(f"{s['seed']}: {describe(s['d_int90'], s['d_int90_is'])}" for s in result["seeds"])
    print(f"{_d_int90_label(result)} (D = {result['D']:,}; per seed {per_seed}); "
          f"baseline {result['baseline_acc']:.4f}, threshold {result['threshold_acc']:.4f}", flush=True)
    bounded = {s["d_int90_is"] for s in [result, *result["seeds"]]}
    if "at_most" in bounded:
        print(f"<= is a bound, not a measurement: the smallest d tried already passes; lower --d_min "
              f"({params.d_min}) to measure d_int90", flush=True)
    if "above" in bounded:
        print(f"> is a bound, not a measurement: no d up to {params.d_max} reached the threshold; raise --d_max "
              f"or --max_epochs", flush=True)


def headline(summary: dict) -> str:
    """The run's result in one line, per mode: d_int90 with its spread over seeds and the baseline."""
    if "architectures" in summary:
        ratio = summary["d_int90_ratio"]
        return (f"d_int90 of {len(summary['architectures'])} FC nets varies {ratio:.2f}x while D varies "
                f"{summary['D_ratio']:.1f}x" if ratio else "d_int90 of the FC nets: no net measured")
    if "points" in summary:
        wins = sum(p["subspace_acc"] > p["direct_acc"] for p in summary["points"])
        return (f"subspace training beats a direct net of as many parameters in {wins} of "
                f"{len(summary['points'])} pairs (baseline {summary['baseline_acc']:.3f})")
    measured = [s["d_int90"] for s in summary["seeds"] if s["d_int90_is"] == "measured"]
    spread = f" ({min(measured):,.0f}-{max(measured):,.0f} over {len(measured)} seeds)" if len(measured) > 1 else ""
    return f"{_d_int90_label(summary)}{spread}, baseline {summary['baseline_acc']:.3f}, D = {summary['D']:,}"


def _d_int90_label(summary: dict) -> str:
    """'d_int90 = 609', or a bound: 'd_int90 <= 107', 'd_int90 > 4,545'."""
    kind = summary["d_int90_is"]
    return f"d_int90 {'= ' if kind == 'measured' else ''}{describe(summary['d_int90'], kind)}"


# ---------------------------------------------------------------------------------------------
# Figures


def _log_bisect_figure(params: Params, result: dict, rows: list[dict], tracking, name: str) -> None:
    series = {f"{kind} trials": ([r["d"] for r in rows if r["passed"] == passed],
                                 [r["acc"] for r in rows if r["passed"] == passed])
              for kind, passed in (("passed", True), ("failed", False))}
    if rows:
        series["monotone fit"] = isotonic_curve([(r["d"], r["acc"]) for r in rows])
    styles = {"passed trials": {"linestyle": "none", "color": "tab:green"},
              "failed trials": {"linestyle": "none", "color": "tab:red", "marker": "x"},
              "monotone fit": {"marker": None, "color": "tab:blue"}}
    vlines = {} if result["d_int90"] is None else {_d_int90_label(result): result["d_int90"]}
    accuracy = "training accuracy" if params.criterion == "train_acc" else "validation accuracy"
    corruption = "" if params.corruption == "none" else f" ({params.corruption})"
    title = f"{'Fig. 6: ' if name.startswith('fig6') else ''}{params.model} on {params.dataset}{corruption}, D = {result['D']:,}"
    figure = line_plot(series, "subspace dimension d", accuracy, title, logx=True, styles=styles, vlines=vlines,
                       hlines={f"baseline {result['baseline_acc']:.3f}": result["baseline_acc"],
                               f"{params.threshold:g} x baseline": result["threshold_acc"]})
    tracking.log_figure(figure, name)


def _log_efficiency_figure(params: Params, summary: dict, tracking) -> None:
    counts = sorted({p["params"] for p in summary["points"]})
    mean = lambda key: [statistics.mean(p[key] for p in summary["points"] if p["params"] == c) for c in counts]
    figure = line_plot({"direct training (fc, one hidden layer)": (counts, mean("direct_acc")),
                        f"subspace training ({params.model}, {params.projection})": (counts, mean("subspace_acc"))},
                       "trainable parameters", "validation accuracy" if params.criterion == "val_acc" else
                       "training accuracy", "Fig. 9: parameter efficiency", logx=True,
                       hlines={"baseline (full net)": summary["baseline_acc"]})
    tracking.log_figure(figure, "fig9_parameter_efficiency")


def _log_architectures_figure(summary: dict, tracking) -> None:
    series = {}
    for depth in sorted({len(r["widths"]) for r in summary["architectures"]}):
        rows = [r for r in summary["architectures"] if len(r["widths"]) == depth and r["d_int90_is"] == "measured"]
        series[f"{depth} hidden layer{'s' if depth > 1 else ''}"] = ([r["D"] for r in rows],
                                                                     [r["d_int90"] for r in rows])
    ratio = summary["d_int90_ratio"]
    title = "Fig. 7: d_int90 across FC nets" + (f" (varies {ratio:.2f}x, D {summary['D_ratio']:.1f}x)" if ratio else "")
    figure = line_plot(series, "number of parameters D", "d_int90", title, logx=True,
                       styles={k: {"linestyle": "none"} for k in series})
    figure.axes[0].set_ylim(bottom=0)  # from zero: how little d_int90 moves while D grows
    tracking.log_figure(figure, "fig7_d_int90_vs_D")
