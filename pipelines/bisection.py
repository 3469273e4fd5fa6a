"""The d_int90 search of the intrinsic-dimension pipeline: the bisection, the Optuna study that holds
it (shared by any number of workers), its storage, and a d_int90 estimate that survives a
non-monotone pass/fail.

Every proposal is replayed from the study's completed trials, so a study in SQLite, PostgreSQL or a
journal file resumes where it stopped, and a finished trial is never proposed (nor trained) again.
Several seeds share one study; each trial carries its seed as the user attribute `seed`, and each
seed bisects on its own trials only.

Several workers (processes, machines) can run one study: each trains only the steps it claimed
(`SharedStudy`), so nothing is trained twice, and each ends with the same trials, hence the same
d_int90, as one worker alone. Under DDP only global rank 0 of a worker talks to the storage.

Near the threshold, whether a trial passes is decided by a few validation images, so pass/fail is
not monotone in d and the last bracket of one bisection is a noisy answer. `estimate_d_int90` fits
accuracy against log d with a monotone (isotonic) regression over all trials and reads off where
the fit crosses the threshold; when every trial passes (or none does) the crossing lies outside
the trials and the estimate says it is a bound.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import math
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import optuna
from optuna.distributions import IntDistribution
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState
from sklearn.isotonic import IsotonicRegression

from pipelines.distributed import is_rank_zero, on_rank_zero


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


@dataclass(frozen=True)
class Bisection:
    """Bisection of log d in [d_min, d_max] down to hi / lo <= 1 + resolution, for each seed on its
    own completed trials."""

    d_min: int
    d_max: int
    resolution: float

    def bracket(self, trials: list[FrozenTrial], seed: int) -> tuple[int, int]:
        done = sorted((t for t in trials if t.state == TrialState.COMPLETE and t.user_attrs.get("seed") == seed),
                      key=lambda t: t.number)
        return bracket([(t.params["d"], bool(t.user_attrs["passed"])) for t in done], self.d_min, self.d_max)

    def proposal(self, trials: list[FrozenTrial], seed: int) -> int | None:
        """The next d to train for `seed`, or None when its search has converged."""
        return next_d(*self.bracket(trials, seed), self.resolution)

    @property
    def distribution(self) -> IntDistribution:
        return IntDistribution(self.d_min, self.d_max, log=True)


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
# The study, shared by workers

HEARTBEAT_S = 10  # how often a training bumps its trial's heartbeat
STALE_AFTER_S = 120  # a claim of another host whose heartbeat stood still this long is given up
POLL_S = 2  # how often a worker with nothing to claim looks again


class Claim(NamedTuple):
    """A RUNNING trial that this worker trains: a bisection step (seed, d), or the direct net (both None)."""

    trial_id: int
    number: int
    seed: int | None
    d: int | None


class Waiting(NamedTuple):
    """Nothing to claim now, but these trainings of other workers are not finished."""

    trainings: tuple[str, ...]


def this_worker() -> str:
    """The worker's name, `host:pid`, as its claims carry it."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _unit(trial: FrozenTrial):
    """What a trial trains: its seed's bisection, or None for the direct net."""
    return None if trial.user_attrs.get("training") == "direct" else trial.user_attrs.get("seed", "?")


def _what(trial: FrozenTrial) -> str:
    unit = _unit(trial)
    what = "the direct net" if unit is None else f"seed {unit} d={trial.params.get('d')}"
    return f"{what} (trial {trial.number}, {trial.user_attrs.get('worker', 'no worker')})"


def _decided_on_rank_zero(method):
    """Only global rank 0 talks to the storage: `method` runs there, and every rank gets its answer."""

    @functools.wraps(method)
    def decided(self, *args, **kwargs):
        return on_rank_zero(method, self, *args, **kwargs)

    return decided


class SharedStudy:
    """One Optuna study of the bisection as one worker sees it; any number of workers may run it at
    once on one storage, and each trains only the steps it claimed.

    A claim is a RUNNING trial written in one storage operation with its seed, its d and its worker
    (`host:pid`, user attribute `worker`). Two workers may claim the same step at the same moment:
    the claim with the smaller trial number holds, and a claim lapses when the bisection has moved on
    meanwhile (a trial of that seed completed between this worker's read and its write). A lost
    claim is told PRUNED and never trained. The claim of a worker that is gone is told FAIL and
    claimed again: at once when that worker ran on this host and its process has ended, else once
    its heartbeat (`_heartbeat`) has stood still for STALE_AFTER_S seconds.

    Under DDP every rank holds a SharedStudy but only global rank 0 opens the storage: the decided
    methods run there and return its answer on every rank.
    """

    def __init__(self, storage, study_name: str, bisection: Bisection, worker: str | None = None):
        """`storage`: an Optuna storage, or a URL for `open_storage`."""
        self.name, self.bisection, self.worker = study_name, bisection, worker or this_worker()
        self._storage = self._id = None
        self._seen: dict[int, tuple] = {}  # trial number -> (heartbeat, when this worker first saw it)
        self._open(storage)

    @_decided_on_rank_zero
    def _open(self, storage) -> None:
        self._storage = open_storage(storage) if isinstance(storage, str) else storage
        optuna.create_study(study_name=self.name, storage=self._storage, direction="maximize", load_if_exists=True)
        self._id = self._storage.get_study_id_from_name(self.name)

    # -- what every rank calls

    @_decided_on_rank_zero
    def baseline(self) -> tuple[float, int] | None:
        """(baseline accuracy, D) once known to the study."""
        attrs = self._storage.get_study_user_attrs(self._id)
        return (attrs["baseline_acc"], attrs["D"]) if "baseline_acc" in attrs else None

    @_decided_on_rank_zero
    def set_baseline(self, acc: float, D: int) -> None:
        for key, value in (("D", D), ("baseline_acc", acc)):  # baseline_acc last: it says the baseline is known
            self._storage.set_study_user_attr(self._id, key, value)

    def claims(self, seeds: list[int] | None) -> Iterator[Claim]:
        """The steps this worker trains, one at a time, until none is left (seeds None: the direct net,
        until the baseline is known); while the only steps left train elsewhere, it waits for them."""
        shown = None
        while (step := self._next(seeds)) is not None:
            if isinstance(step, Claim):
                yield step
                continue
            if step != shown:
                print(f"waiting for {len(step.trainings)} training(s) of other workers: {', '.join(step.trainings)}",
                      flush=True)
                shown = step
            time.sleep(POLL_S)

    @contextlib.contextmanager
    def training(self, claim: Claim) -> Iterator[None]:
        """`with study.training(claim):` around the training of `claim`: rank 0 keeps the claim's heartbeat,
        and an exception tells the trial FAIL there (no collective: the other ranks may be gone)."""
        if not is_rank_zero():
            yield
            return
        try:
            with _heartbeat(self._storage, claim.trial_id):
                yield
        except BaseException:
            self._end(claim.trial_id, TrialState.FAIL)
            raise

    @_decided_on_rank_zero
    def tell(self, claim: Claim, value: float, attrs: dict) -> bool:
        """Records a finished training: its user attributes, then COMPLETE with `value`. False when another
        worker gave the claim up meanwhile (and trains it again): the result is dropped."""
        try:
            for key, attr in attrs.items():
                self._storage.set_trial_user_attr(claim.trial_id, key, attr)
            self._storage.set_trial_state_values(claim.trial_id, TrialState.COMPLETE, [value])
        except UpdateFinishedTrialError:
            print(f"trial {claim.number} was given up by another worker while it trained here: its result is dropped",
                  flush=True)
            return False
        return True

    @_decided_on_rank_zero
    def bracket(self, seed: int) -> tuple[int, int]:
        return self.bisection.bracket(self._storage.get_all_trials(self._id, deepcopy=False), seed)

    @_decided_on_rank_zero
    def completed(self, seeds: list[int]) -> list[FrozenTrial]:
        """The completed bisection trials of `seeds`, in the order they were claimed."""
        trials = self._storage.get_all_trials(self._id, states=(TrialState.COMPLETE,))
        return sorted((t for t in trials if _unit(t) in seeds), key=lambda t: t.number)

    # -- rank 0 only

    @_decided_on_rank_zero
    def _next(self, seeds: list[int] | None) -> Claim | Waiting | None:
        """The next step this worker may train, Waiting while the steps left train elsewhere, None when
        nothing is left."""
        while True:
            trials = self._live_trials()
            if seeds is None and "baseline_acc" in self._storage.get_study_user_attrs(self._id):
                return None  # the baseline is known: the direct net is trained
            busy = {_unit(t): t for t in trials if t.state == TrialState.RUNNING}
            units = [None] if seeds is None else self._rotated(seeds)
            steps = [(unit, None if unit is None else self.bisection.proposal(trials, unit))
                     for unit in units if unit not in busy]
            steps = [(unit, d) for unit, d in steps if unit is None or d is not None]  # no d: that seed has converged
            if not steps:
                waiting = tuple(_what(busy[unit]) for unit in units if unit in busy)
                return Waiting(waiting) if waiting else None
            claim = self._claim(*steps[0])
            if claim is not None:
                return claim
            # lost to another worker's claim: read again

    def _rotated(self, seeds: list[int]) -> list[int]:
        """`seeds`, from the one at index pid mod len(seeds) on: workers started together (consecutive
        pids) mostly try different seeds first, and few claims are lost."""
        start = int(self.worker.rpartition(":")[2]) % len(seeds)
        return seeds[start:] + seeds[:start]

    def _claim(self, seed: int | None, d: int | None) -> Claim | None:
        """A claim on (seed, d), or None when another worker's holds."""
        attrs = {"worker": self.worker, **({"training": "direct"} if seed is None else {"seed": seed})}
        template = optuna.trial.create_trial(state=TrialState.RUNNING, user_attrs=attrs, params={} if d is None else
                                             {"d": d}, distributions={} if d is None else {"d": self.bisection.distribution})
        trial_id = self._storage.create_new_trial(self._id, template_trial=template)
        claim = Claim(trial_id, self._storage.get_trial(trial_id).number, seed, d)
        if self._holds(claim):
            return claim
        self._end(trial_id, TrialState.PRUNED)  # lost: never trained
        return None

    def _holds(self, claim: Claim) -> bool:
        """Whether `claim` holds: no RUNNING trial of its seed (or of the direct net) has a smaller number,
        and the step is still to do (the bisection still proposes its d; the baseline is still unknown)."""
        trials = self._storage.get_all_trials(self._id, deepcopy=False)
        if any(t.state == TrialState.RUNNING and _unit(t) == claim.seed and t.number < claim.number for t in trials):
            return False
        if claim.seed is None:
            return "baseline_acc" not in self._storage.get_study_user_attrs(self._id)
        return self.bisection.proposal(trials, claim.seed) == claim.d

    def _live_trials(self) -> list[FrozenTrial]:
        """Every trial of the study, after the claims of workers that are gone have been told FAIL."""
        trials = self._storage.get_all_trials(self._id, deepcopy=False)
        gone = [(t, why) for t in trials if t.state == TrialState.RUNNING and (why := self._gone(t))]
        for trial, why in gone:
            self._end(self._storage.get_trial_id_from_study_id_trial_number(self._id, trial.number), TrialState.FAIL)
            print(f"{_what(trial)}: {why}; its claim is given up", flush=True)
        return self._storage.get_all_trials(self._id, deepcopy=False) if gone else trials

    def _gone(self, trial: FrozenTrial) -> str | None:
        """Why the worker of a RUNNING trial is gone, or None while it may be training."""
        worker = trial.user_attrs.get("worker", "")
        host, _, pid = worker.rpartition(":")
        if worker == self.worker:  # this worker holds no claim while it looks: an earlier process with its pid left it
            return "left by an earlier process of this worker's name"
        if host == socket.gethostname():
            return None if _alive(int(pid)) else f"its process {pid} has ended"
        beat = trial.system_attrs.get("heartbeat")
        if trial.number not in self._seen or self._seen[trial.number][0] != beat:
            self._seen[trial.number] = (beat, time.monotonic())  # new to this worker, or it moved: alive now
        silent = time.monotonic() - self._seen[trial.number][1]
        return f"no heartbeat for {silent:.0f} s" if silent >= STALE_AFTER_S else None

    def _end(self, trial_id: int, state: TrialState) -> None:
        """Ends a RUNNING trial as `state` (FAIL, PRUNED), unless it has ended meanwhile."""
        try:
            self._storage.set_trial_state_values(trial_id, state)
        except UpdateFinishedTrialError:
            pass  # it finished meanwhile, or another worker gave it up first


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


@contextlib.contextmanager
def _heartbeat(storage, trial_id: int) -> Iterator[None]:
    """Bumps the system attribute `heartbeat` of a RUNNING trial every HEARTBEAT_S seconds (a thread),
    so that workers on other hosts can tell that it still trains. A counter, not a time: the watchers
    time how long it stands still on their own clocks, so no two clocks must agree. (Optuna's own
    heartbeat, `RDBStorage(heartbeat_interval=...)`, covers RDB storages only.)"""
    stop = threading.Event()

    def beat() -> None:
        for count in itertools.count(1):
            if stop.wait(HEARTBEAT_S):
                return
            try:
                storage.set_trial_system_attr(trial_id, "heartbeat", count)
            except Exception:  # noqa: BLE001 a missed beat (a busy database) must not stop the training
                pass

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


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
    from pipelines.storage import schema_lock

    with schema_lock(url):  # a new SQLite file: one process creates its tables while the others wait
        return optuna.storages.RDBStorage(url)
