"""The d_int90 search of the intrinsic-dimension pipeline: an Optuna bisection sampler, its storage,
and a d_int90 estimate that survives a non-monotone pass/fail.

The sampler keeps no state of its own: every proposal is replayed from the study's completed
trials, so a study in SQLite, PostgreSQL or a journal file resumes where it stopped, and a finished
trial is never proposed (nor trained) again. Several seeds share one study; each trial carries its
seed as the user attribute `seed`, and each seed bisects on its own trials only.

Near the threshold, whether a trial passes is decided by a few validation images, so pass/fail is
not monotone in d and the last bracket of one bisection is a noisy answer. `estimate_d_int90` fits
accuracy against log d with a monotone (isotonic) regression over all trials and reads off where
the fit crosses the threshold; when every trial passes (or none does) the crossing lies outside
the trials and the estimate says it is a bound.
"""
from __future__ import annotations

import math
import os
from typing import NamedTuple

import numpy as np
import optuna
from optuna.distributions import IntDistribution
from sklearn.isotonic import IsotonicRegression


def bracket(outcomes: list[tuple[int, bool]], d_min: int, d_max: int) -> tuple[int, int]:
    """(lo, hi) after replaying the trials' (d, passed) in the order they ran: d_min is assumed to
    fail and d_max to pass until a trial says otherwise."""
    lo, hi = d_min, d_max
    for d, passed in outcomes:
        if lo < d < hi:
            hi, lo = (d, lo) if passed else (hi, d)
    return lo, hi


def next_d(lo: int, hi: int, resolution: float) -> int | None:
    """The geometric midpoint of (lo, hi), or None once hi / lo <= 1 + resolution (or no integer is left)."""
    if hi <= lo * (1 + resolution):
        return None
    d = round(math.sqrt(lo * hi))
    return d if lo < d < hi else None


class BisectionSampler(optuna.samplers.BaseSampler):
    """Proposes `d` by bisection of log d in [d_min, d_max], driven by the completed trials of one seed."""

    def __init__(self, d_min: int, d_max: int, resolution: float, seed: int):
        self.d_min, self.d_max, self.resolution, self.seed = d_min, d_max, resolution, seed

    def outcomes(self, study: optuna.Study) -> list[tuple[int, bool]]:
        trials = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        mine = sorted((t for t in trials if t.user_attrs.get("seed") == self.seed), key=lambda t: t.number)
        return [(t.params["d"], bool(t.user_attrs["passed"])) for t in mine]

    def bracket(self, study: optuna.Study) -> tuple[int, int]:
        return bracket(self.outcomes(study), self.d_min, self.d_max)

    def proposal(self, study: optuna.Study) -> int | None:
        """The next d to train, or None when the search has converged."""
        return next_d(*self.bracket(study), self.resolution)

    def infer_relative_search_space(self, study, trial):
        return {"d": IntDistribution(self.d_min, self.d_max, log=True)}

    def sample_relative(self, study, trial, search_space):
        d = self.proposal(study)
        if d is None:
            raise RuntimeError("the bisection has converged: check proposal() before asking for a trial")
        return {"d": d}

    def sample_independent(self, study, trial, param_name, param_distribution):
        raise ValueError(f"the bisection sampler proposes only 'd', not {param_name!r}")


class Estimate(NamedTuple):
    """d_int90 read off the trials, and `kind`, what `d` is: "measured" (the fit crosses the
    threshold between two trials), "at_most" (the fit passes already at the smallest d tried, e.g.
    every trial passed: d_int90 <= d) or "above" (the fit never passes: d_int90 > d, the largest
    d tried). Both None without trials."""

    d: float | None
    kind: str | None


def estimate_d_int90(points: list[tuple[int, float]], threshold: float) -> Estimate:
    """Where a monotone (isotonic, non-decreasing) fit of accuracy against log d first reaches
    `threshold`, interpolated linearly in log d between the fitted points.

    When the fit never reaches the threshold, or already reaches it at the smallest d, the
    crossing lies outside the trials: the answer is that bound, not a measurement.
    """
    if not points:
        return Estimate(None, None)
    log_d = np.log([d for d, _ in points])
    fitted = IsotonicRegression(increasing=True).fit(log_d, [acc for _, acc in points])
    xs, ys = fitted.X_thresholds_, fitted.y_thresholds_  # the fit's knots, sorted by log d
    above = np.nonzero(ys >= threshold - 1e-12)[0]
    if not len(above):
        return Estimate(float(max(d for d, _ in points)), "above")
    k = above[0]
    if k == 0:
        return Estimate(float(min(d for d, _ in points)), "at_most")  # exactly, not through exp(log(d))
    x = xs[k - 1] + (threshold - ys[k - 1]) / (ys[k] - ys[k - 1]) * (xs[k] - xs[k - 1])
    return Estimate(float(math.exp(x)), "measured")


def describe(d: float | None, kind: str | None) -> str:
    """'609', '<= 107' or '> 4,545': an estimate as it reads, bound included."""
    if d is None:
        return "not tried"
    return {"measured": "", "at_most": "<= ", "above": "> "}[kind] + f"{d:,.0f}"


def isotonic_curve(points: list[tuple[int, float]]) -> tuple[list[float], list[float]]:
    """The knots of the monotone fit, as (d, accuracy) lists, for the figure."""
    fitted = IsotonicRegression(increasing=True).fit(np.log([d for d, _ in points]), [a for _, a in points])
    return np.exp(fitted.X_thresholds_).tolist(), fitted.y_thresholds_.tolist()


# ---------------------------------------------------------------------------------------------
# Storage


def default_storage(tracking_uri: str) -> str:
    """An SQLite file `optuna.db` beside the MLflow SQLite database, else in the working directory.

    Not the MLflow database itself: both keep their schema version in an `alembic_version` table.
    """
    if tracking_uri.startswith("sqlite:///"):
        folder = os.path.dirname(tracking_uri[len("sqlite:///"):])
        return "sqlite:///" + os.path.join(folder, "optuna.db")
    return "sqlite:///optuna.db"


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """An Optuna storage from a URL: an RDB URL (sqlite:///..., postgresql://...), or a journal file
    (`journal:///path` or any path ending in `.journal`) for several workers without a database."""
    if url.startswith("journal://") or url.endswith(".journal"):
        path = url[len("journal://"):] if url.startswith("journal://") else url
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        return JournalStorage(JournalFileBackend(path))
    return optuna.storages.RDBStorage(url)
