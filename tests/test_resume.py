"""Resume (issue 15 §1): a pipeline killed mid-way and started again with the same command ends with the
summary of an uninterrupted run, and no training that finished before the kill is trained again.

The slow tests kill each pipeline for real (SIGKILL: its runs stay RUNNING, nothing is cleaned up) beside
an uninterrupted run of the same command; every summary is reproduced exactly (none holds run ids or times).
The default one stops xor in this process once a training is fit but before its state is saved, its runs
left as a kill leaves them.
"""
from __future__ import annotations

import collections
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipelines import NAMES, training
from pipelines.__main__ import main
from pipelines.tracking import ChildRun, Tracking

# A tiny configuration of every pipeline that still has at least 3 trainings (child runs).
CASES = {
    "xor": ["--ks", "2,4,8", "--seeds", "1", "--clustering_init", "false", "--d", "3", "--train_size", "24",
            "--max_epochs", "3", "--passes_per_epoch", "20"],
    "description_length": ["--dataset", "digits", "--examples", "200", "--chunks", "0.1,0.3,0.6,1.0",
                           "--labels", "true", "--max_epochs", "5", "--patience", "2", "--widths", "32"],
    "randomization": ["--dataset", "digits", "--conditions", "true_labels,random_labels,gaussian", "--label_noise", "",
                      "--max_epochs", "2", "--widths", "64"],
    "bn_smoothness": ["--dataset", "digits", "--max_epochs", "1", "--batch_size", "512", "--probe_every", "2",
                      "--etas", "1", "--ics_layers", "2", "--lrs", "0.05"],
    "lottery_ticket": ["--dataset", "digits", "--rounds", "2", "--max_epochs", "1", "--val_every", "10",
                       "--controls", "random_prune"],
    "memorization": ["--dataset", "digits", "--widths", "64", "--batch_size", "64", "--max_epochs", "3",
                     "--noise_kinds", "randY", "--noise_levels", "0,0.5", "--csr_examples", "20",
                     "--regularizers", "dropout", "--regularizer_epochs", "2"],
    "layer_robustness": ["--dataset", "digits", "--max_epochs", "2", "--checkpoints", "0,1", "--widths", "32",
                         "--depth_width", "16", "--depths", "1,2"],
    "double_descent": ["--n", "200", "--methods", "rff,nn,forest", "--rff_features", "0.5,1,2",
                       "--nn_parameters", "0.5,0.9,2", "--max_epochs", "3", "--forest_leaves", "0.1,0.5",
                       "--forest_trees", "2,10"],
    "intrinsic_dim": ["--dataset", "digits", "--max_epochs", "2", "--d_min", "30", "--d_max", "1000",
                      "--resolution", "1", "--seeds", "1", "--widths", "32"],
}
# When to kill: after this many FINISHED trainings, and only while the next one is RUNNING (default: 2, True).
# double_descent's child runs are its methods: killed after rff and nn, its nn trainings must be reloaded.
KILL_AFTER = {"double_descent": (2, False)}


def test_every_pipeline_has_a_case():
    assert set(CASES) == set(NAMES) - {"reading_group"}  # the reading group only runs the others


# --- what a database holds ---

def _children(db: Path) -> dict[str, list[str]]:
    """{status: [run name, ...]} of the child runs in `db`, read with sqlite3 while the pipeline writes
    (MLflow would create the database if it does not exist yet; empty until the pipeline did)."""
    found = collections.defaultdict(list)
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)) as connection:
            rows = connection.execute("select r.status, r.name from runs r join tags t on t.run_uuid = r.run_uuid "
                                      "where t.key = 'training_key'").fetchall()
    except sqlite3.OperationalError:  # no database, or no runs table yet
        return found
    for status, name in rows:
        found[status].append(name)
    return found


class Outcome:
    """The runs of one database once the pipeline ended: its parent runs and their children."""

    def __init__(self, db: Path, pipeline: str):
        self.client = MlflowClient(f"sqlite:///{db}")
        experiment = self.client.get_experiment_by_name(pipeline)
        runs = self.client.search_runs([experiment.experiment_id], max_results=1000)
        self.parents = [r for r in runs if "training_key" not in r.data.tags]
        self.children = [r for r in runs if "training_key" in r.data.tags]
        self.names = {r.info.run_id: r.info.run_name for r in self.children}

    def finished(self, parent) -> list[str]:
        """The names of the parent's FINISHED children (a pipeline names its trainings apart)."""
        return sorted(r.info.run_name for r in self.children if r.info.status == "FINISHED"
                      and r.data.tags["mlflow.parentRunId"] == parent.info.run_id)

    def summary(self, parent) -> dict:
        with open(self.client.download_artifacts(parent.info.run_id, "summary.json")) as handle:
            return json.load(handle)


# --- the slow tests: SIGKILL, for real, in a subprocess ---

# `python -m pipelines ...`, which also prints the run of every training it fits (a reused training is not fit)
COUNTING_FITS = """
import sys
from pipelines import training
from pipelines.__main__ import main
fit = training.fit
def counted(job):
    print("fit in run", job.run_id, flush=True)
    return fit(job)
training.fit = counted
sys.exit(main(sys.argv[1:]))
"""


def _fits(output: str, outcome: Outcome) -> collections.Counter:
    """{child run name: trainings fit in it} from the output of a COUNTING_FITS run."""
    runs = [line.split()[-1] for line in output.splitlines() if line.startswith("fit in run ")]
    return collections.Counter(outcome.names.get(run, "no child run") for run in runs)


def _start(pipeline: str, folder: Path) -> subprocess.Popen:
    folder.mkdir(exist_ok=True)  # its own folder: artifacts (./mlruns) and an Optuna storage go beside its database
    command = [sys.executable, "-c", COUNTING_FITS, pipeline, *CASES[pipeline], "--tracking_uri",
               f"sqlite:///{folder / 'mlflow.db'}", "--accelerator", "cpu", "--system_metrics", "false"]
    return subprocess.Popen(command, cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _kill(process: subprocess.Popen, db: Path, finished: int, while_training: bool, timeout: float = 900) -> None:
    """SIGKILL once `finished` trainings FINISHED (and, `while_training`, the next one is RUNNING)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"ended before the kill:\n{process.stdout.read()}"
        children = _children(db)
        if len(children["FINISHED"]) >= finished and (children["RUNNING"] or not while_training):
            process.send_signal(signal.SIGKILL)
            process.communicate()
            return
        time.sleep(0.1)
    process.kill()
    pytest.fail(f"no {finished} finished trainings in {timeout} s")


def _finish(process: subprocess.Popen, timeout: float = 900) -> str:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output
    return output


@pytest.mark.slow
@pytest.mark.parametrize("pipeline", list(CASES))
def test_killed_pipeline_resumes_where_it_stopped(pipeline, tmp_path):
    reference = _start(pipeline, tmp_path / "reference")  # uninterrupted, alongside the one killed
    db = tmp_path / "killed" / "mlflow.db"
    finished_at_kill, while_training = KILL_AFTER.get(pipeline, (2, True))
    _kill(_start(pipeline, db.parent), db, finished_at_kill, while_training)
    before = _children(db)
    assert len(before["RUNNING"]) <= 1 and (before["RUNNING"] or not while_training)

    rerun = _start(pipeline, db.parent)  # the same command again
    output = _finish(rerun)
    assert f": {len(before['FINISHED'])} finished trainings are reused" in output
    expected, resumed = Outcome(tmp_path / "reference" / "mlflow.db", pipeline), Outcome(db, pipeline)
    reference_fits = _fits(_finish(reference), expected)
    assert "no child run" not in reference_fits  # every training is in a child run, which a resume can reuse

    (parent,) = resumed.parents  # the killed parent, continued: no second one
    (uninterrupted,) = expected.parents
    assert parent.info.status == "FINISHED"
    assert resumed.summary(parent) == expected.summary(uninterrupted)
    # the same trainings finished, each once; the rerun fit only those that had not finished before the kill
    assert resumed.finished(parent) == expected.finished(uninterrupted) == sorted(set(expected.finished(uninterrupted)))
    assert _fits(output, resumed) == {name: n for name, n in reference_fits.items() if name not in before["FINISHED"]}
    # the training the kill stopped ended KILLED, not RUNNING
    assert sorted(r.info.status for r in resumed.children if r.info.status != "FINISHED") == ["KILLED"] * len(
        before["RUNNING"])


# --- the default test: xor stopped in this process, as a kill would leave it ---

class Killed(BaseException):
    """The process died: nothing below catches it, and no run is ended."""


def _die():
    raise Killed


def _unless_killed(exit_):
    return lambda self, exc_type, exc, tb: None if exc_type is Killed else exit_(self, exc_type, exc, tb)


def _run_xor(tmp_path: Path, *flags: str) -> int:
    tmp_path.mkdir(exist_ok=True)
    return main(["xor", *CASES["xor"], "--tracking_uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--accelerator", "cpu",
                 "--system_metrics", "false", *flags])


def test_a_stopped_run_resumes_and_resume_false_starts_afresh(tmp_path, monkeypatch, capsys):
    assert _run_xor(tmp_path / "reference") == 0
    expected = Outcome(tmp_path / "reference" / "mlflow.db", "xor")
    (uninterrupted,) = expected.parents
    trainings = expected.finished(uninterrupted)
    assert len(trainings) == 3
    fits = []
    monkeypatch.setattr(training, "fit", lambda job, fit=training.fit: fits.append(job) or fit(job))

    with monkeypatch.context() as dying:  # the 2nd training dies once fit, as its state is saved; no run is ended
        dying.setattr(ChildRun, "save_trained", lambda run, index, state, save=ChildRun.save_trained:
                      save(run, index, state) if len(fits) < 2 else _die())
        for kind in (Tracking, ChildRun):
            dying.setattr(kind, "__exit__", _unless_killed(kind.__exit__))
        with pytest.raises(Killed):
            _run_xor(tmp_path)
    db = tmp_path / "mlflow.db"
    before = _children(db)
    assert (len(before["FINISHED"]), len(before["RUNNING"])) == (1, 1)  # fit is not finished: it was not saved
    (stopped,) = Outcome(db, "xor").parents
    capsys.readouterr()

    # --resume false: a new parent that trains everything
    fits.clear()
    assert _run_xor(tmp_path, "--resume", "false") == 0
    assert "resuming" not in capsys.readouterr().out and len(fits) == 3
    outcome = Outcome(db, "xor")
    (fresh,) = [p for p in outcome.parents if p.info.run_id != stopped.info.run_id]
    assert outcome.finished(fresh) == trainings

    # the same command: the stopped parent goes on, and trains only the two trainings it had not finished
    fits.clear()
    assert _run_xor(tmp_path) == 0
    assert f"resuming xor run {stopped.info.run_id}: 1 finished trainings are reused" in capsys.readouterr().out
    assert len(fits) == 2
    resumed = Outcome(db, "xor")
    (parent,) = [p for p in resumed.parents if p.info.run_id == stopped.info.run_id]
    assert parent.info.status == "FINISHED" and len(resumed.parents) == 2
    assert resumed.finished(parent) == trainings
    assert resumed.summary(parent) == expected.summary(uninterrupted)
    assert [r.info.status for r in resumed.children if r.info.status != "FINISHED"] == ["KILLED"]
