"""The d_int90 search without training: the bisection sampler on a synthetic pass/fail predicate,
its storages and resumption, and the monotone d_int90 estimate on non-monotone trials."""
from __future__ import annotations

import math

import optuna
import pytest

from pipelines.bisection import (BisectionSampler, Estimate, bracket, default_storage, describe, estimate_d_int90,
                                 next_d, open_storage)

optuna.logging.set_verbosity(optuna.logging.WARNING)
D_MIN, D_MAX, RESOLUTION = 100, 5000, 0.1


def search(storage, study_name: str, passes, seed: int = 0, max_trials: int | None = None) -> list[int]:
    """Runs the bisection with ask/tell as the pipeline does; returns the d of every new trial."""
    sampler = BisectionSampler(D_MIN, D_MAX, RESOLUTION, seed)
    study = optuna.create_study(study_name=study_name, storage=storage, sampler=sampler, load_if_exists=True,
                                direction="maximize")
    tried = []
    while sampler.proposal(study) is not None and (max_trials is None or len(tried) < max_trials):
        trial = study.ask()
        d = trial.suggest_int("d", D_MIN, D_MAX, log=True)
        trial.set_user_attr("seed", seed)
        trial.set_user_attr("passed", passes(d))
        study.tell(trial, float(passes(d)))
        tried.append(d)
    return tried


@pytest.mark.parametrize("true_d", [101, 737, 4999])
def test_bisection_brackets_a_monotone_predicate_to_the_resolution(true_d):
    tried = search(None, "s", lambda d: d >= true_d)
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
    uninterrupted = search(None, "whole", passes)
    first = search(open_storage(url), "s", passes, max_trials=2)  # stopped after two trials
    second = search(open_storage(url), "s", passes)  # a new process: a fresh storage object and sampler
    assert first + second == uninterrupted
    assert search(open_storage(url), "s", passes) == []  # converged: nothing left to train


def test_each_seed_bisects_on_its_own_trials():
    storage = optuna.storages.InMemoryStorage()
    seed0 = search(storage, "s", lambda d: d >= 300, seed=0)
    seed1 = search(storage, "s", lambda d: d >= 3000, seed=1)
    assert seed1[0] == seed0[0]  # seed 1 starts from the full range, not from seed 0's bracket
    study = optuna.load_study(study_name="s", storage=storage)
    assert BisectionSampler(D_MIN, D_MAX, RESOLUTION, 0).bracket(study)[1] < 330
    assert BisectionSampler(D_MIN, D_MAX, RESOLUTION, 1).bracket(study)[0] > 2700


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
