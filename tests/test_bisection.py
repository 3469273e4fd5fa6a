"""The d_int90 search without training: the bisection on a synthetic pass/fail predicate, its
storages and resumption, workers sharing one study (claims, their races, gone workers), and the
monotone d_int90 estimate on non-monotone trials."""
from __future__ import annotations

import collections
import math
import socket
import subprocess
import sys
import threading
import time
import types

import optuna
import pytest
from optuna.trial import TrialState

from pipelines import bisection
from pipelines.bisection import (Bisection, Claim, Estimate, SharedStudy, Waiting, bracket, default_storage, describe,
                                 estimate_d_int90, next_d, open_storage)

optuna.logging.set_verbosity(optuna.logging.WARNING)
D_MIN, D_MAX, RESOLUTION = 100, 5000, 0.1
BISECTION = Bisection(D_MIN, D_MAX, RESOLUTION)


def search(storage, study_name: str, passes, seed: int = 0, max_trials: int | None = None,
           worker: str | None = None) -> list[int]:
    """Runs one seed's bisection as the pipeline does (claim, train, tell); returns the d of every new trial."""
    study = SharedStudy(storage, study_name, BISECTION, worker)
    tried = []
    for claim in study.claims([seed]):
        with study.training(claim):
            passed = passes(claim.d)
        study.tell(claim, float(passed), {"passed": passed})
        tried.append(claim.d)
        if len(tried) == max_trials:  # stopped here, as if interrupted between two trials
            break
    return tried


def states(storage, study_name: str = "s") -> list[TrialState]:
    return [t.state for t in optuna.load_study(study_name=study_name, storage=storage).trials]


@pytest.mark.parametrize("true_d", [101, 737, 4999])
def test_bisection_brackets_a_monotone_predicate_to_the_resolution(true_d):
    tried = search(optuna.storages.InMemoryStorage(), "s", lambda d: d >= true_d)
    lo, hi = bracket([(d, d >= true_d) for d in tried], D_MIN, D_MAX)
    assert lo < true_d <= hi and hi / lo <= 1 + RESOLUTION
    # Each trial halves log(hi/lo): the fewest trials that reach the resolution, no more.
    expected = math.ceil(math.log2(math.log(D_MAX / D_MIN) / math.log(1 + RESOLUTION)))
    assert len(tried) == expected
    assert len(set(tried)) == len(tried)


def test_next_d_is_the_geometric_midpoint_and_stops_at_the_resolution():
    assert next_d(100, 400, 0.1) == 200
    assert next_d(100, 110, 0.1) is None
    assert next_d(10, 12, 0.01) == 11
    assert next_d(10, 11, 0.01) is None  # no integer strictly inside


@pytest.mark.parametrize("kind", ["sqlite", "journal_path", "journal_url"])
def test_an_interrupted_search_resumes_without_repeating_a_trial(tmp_path, kind):
    url = {"sqlite": f"sqlite:///{tmp_path / 'optuna.db'}", "journal_path": str(tmp_path / "study.journal"),
           "journal_url": f"journal://{tmp_path / 'study.journal'}"}[kind]
    passes = lambda d: d >= 737
    uninterrupted = search(optuna.storages.InMemoryStorage(), "whole", passes)
    first = search(open_storage(url), "s", passes, max_trials=2)  # stopped after two trials
    second = search(open_storage(url), "s", passes)  # a new process: a fresh storage object and sampler
    assert first + second == uninterrupted
    assert search(open_storage(url), "s", passes) == []  # converged: nothing left to train


def test_each_seed_bisects_on_its_own_trials():
    storage = optuna.storages.InMemoryStorage()
    seed0 = search(storage, "s", lambda d: d >= 300, seed=0)
    seed1 = search(storage, "s", lambda d: d >= 3000, seed=1)
    assert seed1[0] == seed0[0]  # seed 1 starts from the full range, not from seed 0's bracket
    trials = optuna.load_study(study_name="s", storage=storage).trials
    assert BISECTION.bracket(trials, 0)[1] < 330
    assert BISECTION.bracket(trials, 1)[0] > 2700


TRUE_D = {0: 300, 1: 737, 2: 3000}  # the synthetic d_int90 of each seed


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_workers_on_one_storage_train_nothing_twice_and_end_with_the_one_worker_trials(tmp_path, monkeypatch, kind):
    monkeypatch.setattr(bisection, "POLL_S", 0.01)
    url = {"sqlite": f"sqlite:///{tmp_path / 'optuna.db'}", "journal": str(tmp_path / "study.journal")}[kind]
    open_storage(url)  # the schema, once (first use by several processes at once is the storage's business)
    seeds = list(TRUE_D)
    trained, ended = collections.Counter(), {}

    def worker(name: str) -> None:
        study = SharedStudy(open_storage(url), "s", BISECTION, worker=name)  # its own connection, as a process has
        for claim in study.claims(None):  # the direct net: once
            with study.training(claim):
                trained["direct"] += 1
                time.sleep(0.05)
            study.set_baseline(0.95, 1)
            study.tell(claim, 0.95, {})
        for claim in study.claims(seeds):
            with study.training(claim):
                trained[claim.seed, claim.d] += 1
                time.sleep(0.01)
            study.tell(claim, float(claim.d >= TRUE_D[claim.seed]), {"passed": claim.d >= TRUE_D[claim.seed]})
        ended[name] = [(t.user_attrs["seed"], t.params["d"], t.value) for t in study.completed(seeds)]

    # pids 3, 6, 9: the same first seed for all three, so that they contend for every step
    threads = [threading.Thread(target=worker, args=(f"elsewhere:{3 * k}",)) for k in (1, 2, 3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    alone = {(seed, d) for seed in seeds
             for d in search(optuna.storages.InMemoryStorage(), "one", lambda d: d >= TRUE_D[seed], seed=seed)}
    assert set(trained) == alone | {"direct"} and set(trained.values()) == {1}  # all of it, nothing twice
    assert len(ended) == 3 and all(rows == ended["elsewhere:3"] for rows in ended.values())  # the same end everywhere
    assert {(seed, d) for seed, d, _ in ended["elsewhere:3"]} == alone
    assert optuna.load_study(study_name="s", storage=open_storage(url)).user_attrs["baseline_acc"] == 0.95
    left = set(states(open_storage(url))) - {TrialState.COMPLETE, TrialState.PRUNED}
    assert not left  # claims lost to another worker are PRUNED; none stays RUNNING


def test_of_two_claims_on_one_step_only_the_first_holds(monkeypatch):
    storage = optuna.storages.InMemoryStorage()
    a, b = (SharedStudy(storage, "s", BISECTION, worker=f"elsewhere:{k}") for k in (1, 2))
    d = BISECTION.proposal([], 0)
    # Both read the study (seed 0 free, next d = d); B writes its claim between A's write and A's check.
    claims, a_holds = {}, a._holds

    def b_writes_first(claim: Claim) -> bool:
        claims["b"] = b._claim(0, d)
        return a_holds(claim)

    monkeypatch.setattr(a, "_holds", b_writes_first)
    claims["a"] = a._claim(0, d)
    assert claims["a"] == Claim(claims["a"].trial_id, 0, 0, d) and claims["b"] is None  # the smaller number holds
    assert states(storage) == [TrialState.RUNNING, TrialState.PRUNED]  # the lost claim is never trained
    # B decided on (seed 0, d) from a read made before A's claim, and A has trained d and told it before B
    # writes: at B's check no RUNNING trial of seed 0 is left; the claim lapses because the bisection moved on.
    a.tell(claims["a"], 1.0, {"passed": True})
    assert b._claim(0, d) is None
    assert states(storage) == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.PRUNED]
    # The direct net: a second claim lapses once the baseline is known, RUNNING or not.
    direct = a._claim(None, None)
    assert b._claim(None, None) is None
    a.set_baseline(0.9, 10)
    a.tell(direct, 0.9, {})
    assert b._claim(None, None) is None and b._next(None) is None


def test_a_claim_of_a_gone_worker_is_claimed_again(monkeypatch):
    storage = optuna.storages.InMemoryStorage()
    # On this host, a worker whose process has ended: its claim is given up at once.
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    left = SharedStudy(storage, "s", BISECTION, worker=f"{socket.gethostname()}:{ended.pid}")._next([0])
    assert isinstance(left, Claim)
    again = SharedStudy(storage, "s", BISECTION)._next([0])
    assert (again.seed, again.d) == (left.seed, left.d) and states(storage) == [TrialState.FAIL, TrialState.RUNNING]

    # On another host: once its heartbeat has stood still for STALE_AFTER_S on the watcher's clock.
    clock = [0.0]
    monkeypatch.setattr(bisection, "time", types.SimpleNamespace(monotonic=lambda: clock[0], sleep=time.sleep))
    far = SharedStudy(storage, "t", BISECTION, worker="elsewhere:1")._next([0])
    here = SharedStudy(storage, "t", BISECTION)
    looks = []
    for beat, now in [(None, 0), (1, 100), (1, 200), (1, 219), (1, 220)]:  # a beat at 100, none after
        if beat:
            storage.set_trial_system_attr(far.trial_id, "heartbeat", beat)
        clock[0] = now
        looks.append(type(here._next([0])))
    assert looks == [Waiting] * 4 + [Claim]  # 120 s after the last beat was seen, not before
    assert states(storage, "t")[:1] == [TrialState.FAIL]


def test_a_training_that_fails_tells_its_trial_fail_and_the_step_is_claimed_again():
    storage = optuna.storages.InMemoryStorage()
    study = SharedStudy(storage, "s", BISECTION)
    claim = next(study.claims([0]))
    with pytest.raises(RuntimeError), study.training(claim):
        raise RuntimeError("out of memory")
    assert states(storage) == [TrialState.FAIL]
    assert next(study.claims([0])).d == claim.d


def test_d_int90_follows_the_monotone_fit_not_a_lucky_or_unlucky_trial():
    threshold = 0.9
    trials = [(100, 0.50), (150, 0.905),  # a lucky pass far below the rest: pooled away
              (200, 0.70), (400, 0.91), (500, 0.87), (600, 0.88),  # 400 passes, 500-600 fail: not monotone
              (800, 0.93), (1600, 0.95)]
    d_int90, kind = estimate_d_int90(trials, threshold)
    # The fit pools 150-600 below the threshold and crosses it between 600 and 800, interpolated in log d.
    assert 600 < d_int90 < 800 and kind == "measured"
    assert estimate_d_int90(trials[::-1], threshold).d == pytest.approx(d_int90)  # order does not matter
    assert 600 < estimate_d_int90(trials + [(700, 0.95)], threshold).d < d_int90  # a pass at 700 moves it down


def test_d_int90_is_a_bound_when_nothing_or_everything_passes():
    # No d tried passes: d_int90 lies above the largest; every d passes: it is at most the smallest.
    assert estimate_d_int90([(100, 0.5), (1000, 0.8), (300, 0.7)], 0.9) == Estimate(1000, "above")
    assert estimate_d_int90([(1000, 0.97), (100, 0.95), (300, 0.96)], 0.9) == Estimate(100, "at_most")
    assert estimate_d_int90([], 0.9) == Estimate(None, None)
    assert [describe(*e) for e in (Estimate(609.4, "measured"), Estimate(100, "at_most"), Estimate(4545, "above"))] == \
        ["609", "<= 100", "> 4,545"]


def test_default_storage_sits_beside_the_mlflow_database():
    assert default_storage("sqlite:////data/runs/mlflow.db") == "sqlite:////data/runs/optuna.db"
    assert default_storage("sqlite:///mlflow.db") == "sqlite:///optuna.db"
    assert default_storage("http://tracking:5000") == "sqlite:///optuna.db"
