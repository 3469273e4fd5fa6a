"""The intrinsic_dim entry point end to end, through the real CLI, on `digits` with a tiny budget."""
from __future__ import annotations

import collections
import json
import subprocess
import sys
import time

import matplotlib.pyplot as plt
import optuna
import pytest

from pipelines.bisection import open_storage
from pipelines.intrinsic_dim import Params, _log_bisect_figure

TINY = ("--dataset", "digits", "--max_epochs", "4", "--d_min", "30", "--d_max", "1000", "--resolution", "1")
SUMMARY_KEYS = {"d_int90", "d_int90_is", "D", "baseline_acc", "threshold_acc", "seeds", "trials"}


def trainings(run) -> list[str]:
    return sorted(child.info.run_name for child in run.children)


def summary_of(run, parent) -> dict:
    with open(run.client.download_artifacts(parent.info.run_id, "summary.json")) as handle:
        return json.load(handle)


def test_bisect_logs_every_trial_and_resumes_without_training_again(run_pipeline, tmp_path):
    storage = f"sqlite:///{tmp_path / 'studies.db'}"
    first = run_pipeline("intrinsic_dim", *TINY, "--seeds", "2", "--storage", storage)
    assert first.exit_code == 0
    summary = first.summary()
    assert set(summary) == SUMMARY_KEYS
    assert summary["D"] == 64 * 200 + 200 + 200 * 200 + 200 + 200 * 10 + 10  # FC 64-200-200-10
    assert summary["threshold_acc"] == pytest.approx(0.9 * summary["baseline_acc"])
    assert summary["baseline_acc"] > 0.8
    assert [s["seed"] for s in summary["seeds"]] == [0, 1]
    assert all(set(s) == {"seed", "d_int90", "d_int90_is"} for s in summary["seeds"])
    # Three bisection steps per seed reach hi / lo <= 2 from 1000 / 30; each is a child, plus the direct net.
    assert len(summary["trials"]) == 6 and len(first.children) == 7
    assert "direct" in trainings(first)
    for trial in summary["trials"]:
        assert set(trial) == {"d", "acc", "passed"} and trial["passed"] == (trial["acc"] >= summary["threshold_acc"])
    assert any(t["passed"] for t in summary["trials"]) and any(not t["passed"] for t in summary["trials"])
    assert 30 < summary["d_int90"] < 1000 and summary["d_int90_is"] == "measured"
    metrics = first.parent.data.metrics
    assert metrics["d_int90"] == pytest.approx(summary["d_int90"]) and metrics["D"] == summary["D"]
    assert {"baseline_acc", "threshold_acc"} <= set(metrics)
    assert {"summary.json", "trials.json", "figures/d_int90_bisection.png"} <= set(first.artifact_paths())
    # A passing trial stopped at the first epoch its validation accuracy reached the threshold.
    for child in first.children:
        if child.info.run_name != "direct" and child.data.metrics["acc"] >= summary["threshold_acc"]:
            curve = [m.value for m in sorted(first.client.get_metric_history(child.info.run_id, "val_acc"),
                                             key=lambda m: m.step)]
            assert len(curve) == child.data.metrics["epochs"]
            assert curve[-1] >= summary["threshold_acc"] > max(curve[:-1], default=0)

    again = run_pipeline("intrinsic_dim", *TINY, "--seeds", "2", "--storage", storage)
    assert again.exit_code == 0 and again.parent.info.run_id != first.parent.info.run_id
    assert again.children == []  # neither the direct net nor any trial was trained again
    assert again.summary() == summary
    studies = optuna.get_all_study_summaries(open_storage(storage))
    assert len(studies) == 1 and studies[0].n_trials == 7  # the direct net's, then the six of the bisection
    # What optuna-dashboard shows of a trial: d as its parameter, the rest as user attributes.
    study = optuna.load_study(study_name=studies[0].study_name, storage=open_storage(storage))
    direct, *bisection = study.trials
    assert direct.user_attrs["training"] == "direct" and direct.value == summary["baseline_acc"] == \
        study.user_attrs["baseline_acc"]
    assert {t.state for t in study.trials} == {optuna.trial.TrialState.COMPLETE}
    for trial, row in zip(bisection, summary["trials"]):
        assert trial.params == {"d": row["d"]} and trial.value == row["acc"]
        assert {"seed", "val_acc", "passed", "threshold_acc", "test_acc", "epochs", "mlflow_run_id",
                "worker"} <= set(trial.user_attrs)
        assert trial.user_attrs["val_acc"] == row["acc"] and trial.user_attrs["passed"] == row["passed"]
        assert trial.user_attrs["threshold_acc"] == summary["threshold_acc"]


def test_two_workers_share_the_study_train_nothing_twice_and_give_the_one_worker_answer(run_pipeline, tmp_path):
    # FC 64-32-10, two bisection steps per seed (30-1000 at resolution 3): the direct net and four trials.
    flags = (*TINY, "--widths", "32", "--max_epochs", "3", "--resolution", "3", "--seeds", "2")
    one = run_pipeline("intrinsic_dim", *flags, "--storage", f"sqlite:///{tmp_path / 'one.db'}")
    storage = f"sqlite:///{tmp_path / 'two.db'}"
    two = run_pipeline("intrinsic_dim", *flags, "--storage", storage, "--workers", "2")
    assert one.exit_code == two.exit_code == 0
    parents = [p for p in two.parents if p.info.run_id != one.parent.info.run_id]
    assert len(parents) == 2  # --workers 2: this process and one more, each with its own parent run
    first, second = (summary_of(two, parent) for parent in parents)
    assert first == second  # every worker ends with the whole study's summary
    alone = one.summary()
    assert {k: v for k, v in first.items() if k != "trials"} == {k: v for k, v in alone.items() if k != "trials"}
    assert sorted(map(json.dumps, first["trials"])) == sorted(map(json.dumps, alone["trials"]))  # claimed in another order
    # Nothing trained twice: over both parents, one child per training of the one-worker run, the direct net once.
    ids = {parent.info.run_id for parent in parents}
    children = [r.info.run_name for r in two.client.search_runs([two.parent.info.experiment_id])
                if r.data.tags.get("mlflow.parentRunId") in ids]
    assert sorted(children) == trainings(one) and children.count("direct") == 1
    study = optuna.get_all_study_summaries(open_storage(storage))[0]
    trials = optuna.load_study(study_name=study.study_name, storage=open_storage(storage)).trials
    done = collections.Counter((t.user_attrs.get("seed"), t.params.get("d")) for t in trials
                               if t.state == optuna.trial.TrialState.COMPLETE)
    assert len(done) == 5 and set(done.values()) == {1}
    assert {t.state for t in trials} <= {optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED}


@pytest.mark.parametrize("threshold, kind, shown", [("0.01", "at_most", "d_int90 <= 55"),  # every trial passes
                                                    ("1", "above", "d_int90 > 55")])  # none does
def test_d_int90_outside_the_trials_is_reported_as_a_bound(run_pipeline, capsys, threshold, kind, shown):
    # One trial, at d = 55 (the midpoint of 30-100 at resolution 1), one epoch, against --reference 1.
    run = run_pipeline("intrinsic_dim", *TINY, "--max_epochs", "1", "--d_max", "100", "--seeds", "1",
                       "--reference", "1", "--threshold", threshold)
    assert run.exit_code == 0
    summary = run.summary()
    assert [t["d"] for t in summary["trials"]] == [55]
    assert (summary["d_int90"], summary["d_int90_is"]) == (55, kind)
    assert summary["seeds"] == [{"seed": 0, "d_int90": 55, "d_int90_is": kind}]
    metrics = run.parent.data.metrics
    assert "d_int90" not in metrics and metrics[f"d_int90_{kind}"] == 55  # a bound is never logged as d_int90
    out = capsys.readouterr().out
    assert f"{shown} (D = 55,210; per seed 0: {shown.split(' ', 1)[1]})" in out and "a bound, not a measurement" in out

    figures = []
    tracking = type("Figures", (), {"log_figure": lambda self, figure, name: figures.append(figure)})()
    _log_bisect_figure(Params(dataset="digits"), summary, summary["trials"], tracking, "d_int90_bisection")
    assert shown in [text.get_text() for text in figures[0].axes[0].texts]  # the vertical line's label
    plt.close(figures[0])


def test_other_modes_write_their_figures_and_summaries(run_pipeline):
    sweep = run_pipeline("intrinsic_dim", *TINY, "--mode", "sweep", "--ds", "30,300", "--seeds", "1",
                         "--max_epochs", "2")
    assert sweep.exit_code == 0
    summary = sweep.summary()
    assert set(summary) == SUMMARY_KEYS and [t["d"] for t in summary["trials"]] == [30, 300]
    assert summary["trials"][1]["acc"] > summary["trials"][0]["acc"]  # more dimensions, more accuracy
    assert "figures/fig6_accuracy_vs_d.png" in sweep.artifact_paths()

    efficiency = run_pipeline("intrinsic_dim", *TINY, "--mode", "efficiency", "--direct_widths", "1", "--seeds", "1",
                              "--max_epochs", "2", "--reference", "0.95")
    assert efficiency.exit_code == 0
    points = efficiency.summary()["points"]
    assert [p["params"] for p in points] == [85]  # FC 64-1-10: (64 + 1) + (1 + 1) x 10
    assert set(points[0]) >= {"params", "direct_acc", "subspace_acc"}
    assert "figures/fig9_parameter_efficiency.png" in efficiency.artifact_paths()

    archs = run_pipeline("intrinsic_dim", *TINY, "--mode", "architectures", "--arch_widths", "20,40",
                         "--arch_depths", "1", "--seeds", "1", "--max_epochs", "2", "--d_min", "50", "--d_max", "200")
    assert archs.exit_code == 0
    rows = archs.summary()["architectures"]
    assert [r["widths"] for r in rows] == [[20], [40]] and rows[0]["D"] < rows[1]["D"]
    assert {"figures/fig7_d_int90_vs_D.png", "figures/d_int90_fc_20.png"} <= set(archs.artifact_paths())


@pytest.mark.parametrize("flags, flag", [
    (("--d_min", "500", "--d_max", "100"), "--d_min"),
    (("--d_max", "100000"), "--d_max"),  # digits FC: D = 55,210
    (("--d_min", "100", "--d_max", "105"), "--d_max"),  # within --resolution 0.1: no d to try
    (("--projection", "gaussian"), "--projection"),
    (("--threshold", "0"), "--threshold"),
    (("--threshold", "1.5"), "--threshold"),
    (("--storage", "sqlite:////no/such/folder/optuna.db"), "--storage"),
    (("--storage", "postgresql://nobody@127.0.0.1:1/none"), "--storage"),
    (("--storage", "journal:///no/such/folder/x.journal"), "--storage"),
    (("--workers", "0"), "--workers"),
    (("--workers", "2", "--mode", "sweep"), "--workers"),  # workers share an Optuna study
    (("--workers", "2", "--devices", "2", "--strategy", "ddp"), "--workers"),
    (("--workers", "2", "--storage", "sqlite://"), "--storage"),  # in memory: not shared by processes
])
def test_bad_input_is_one_line_naming_the_flag(refused, flags, flag):
    assert flag in refused("intrinsic_dim", "--dataset", "digits", *flags)


@pytest.mark.slow
def test_the_claim_of_a_killed_worker_is_trained_again_by_the_next_run(run_pipeline, tracking_uri, tmp_path):
    flags = (*TINY, "--seeds", "1", "--study_name", "s")
    alone = run_pipeline("intrinsic_dim", *flags, "--storage", f"sqlite:///{tmp_path / 'alone.db'}").summary()
    storage = f"sqlite:///{tmp_path / 'killed.db'}"
    command = [sys.executable, "-m", "pipelines", "intrinsic_dim", "--tracking_uri", tracking_uri, *flags,
               "--storage", storage]
    worker = subprocess.Popen(command)
    running = []
    while not running and worker.poll() is None:  # until it trains its second bisection step
        time.sleep(0.2)
        studies = optuna.get_all_study_summaries(open_storage(storage)) if (tmp_path / "killed.db").exists() else []
        trials = optuna.load_study(study_name="s", storage=open_storage(storage)).trials if studies else []
        running = [t for t in trials if t.state == optuna.trial.TrialState.RUNNING and t.number == 2]
    worker.kill()  # SIGKILL: no handler runs, the claim stays RUNNING
    worker.wait()
    assert running, "the worker ended before its second step"

    subprocess.run(command, check=True, timeout=600)  # a claim that blocked forever would end here
    trials = optuna.load_study(study_name="s", storage=open_storage(storage)).trials
    assert trials[2].state == optuna.trial.TrialState.FAIL  # the killed claim, given up at once (same host, no process)
    done = [{"d": t.params["d"], "acc": t.value, "passed": t.user_attrs["passed"]} for t in trials
            if t.state == optuna.trial.TrialState.COMPLETE and "d" in t.params]
    assert sorted(map(json.dumps, done)) == sorted(map(json.dumps, alone["trials"]))  # its step trained again, once


@pytest.mark.slow
def test_ddp_gives_one_parent_run_one_study_and_the_single_process_d_int90(run_pipeline, tmp_path):
    # The direct net and three bisection steps, trained by both ranks together; rank 0 alone claims and tells.
    single = run_pipeline("intrinsic_dim", *TINY, "--seeds", "1", "--storage", f"sqlite:///{tmp_path / 'single.db'}")
    storage = f"sqlite:///{tmp_path / 'ddp.db'}"
    ddp = run_pipeline("intrinsic_dim", *TINY, "--seeds", "1", "--storage", storage,
                       "--devices", "2", "--strategy", "ddp", "--accelerator", "cpu")
    assert single.exit_code == 0 and ddp.exit_code == 0
    a, b = single.summary(), ddp.summary()
    assert [p.info.run_id for p in ddp.parents if p.info.run_id != single.parent.info.run_id] == [ddp.parent.info.run_id]
    assert len(b["trials"]) == 3
    assert len(set(trainings(ddp))) == len(ddp.children) == 4 and "direct" in trainings(ddp)  # each training once
    studies = optuna.get_all_study_summaries(open_storage(storage))
    assert len(studies) == 1 and studies[0].n_trials == 4
    assert a["d_int90_is"] == b["d_int90_is"] == "measured"
    assert max(a["d_int90"], b["d_int90"]) / min(a["d_int90"], b["d_int90"]) <= 2  # within --resolution 1
    assert b["baseline_acc"] == pytest.approx(a["baseline_acc"], abs=0.03)  # same global batch, same steps


@pytest.mark.slow
def test_lenet_needs_fewer_dimensions_than_fc_on_mnist5k(run_pipeline):
    # Paper: FC 750, LeNet 290. Measured with the defaults (3 seeds): FC 486-615, LeNet about 200.
    found = {}
    for model in ("fc", "lenet"):
        run = run_pipeline("intrinsic_dim", "--model", model, "--seeds", "1", "--resolution", "0.25")
        assert run.exit_code == 0
        found[model] = run.summary()["d_int90"]
    assert 300 < found["fc"] < 1500 and 80 < found["lenet"] < found["fc"]
