"""Where runs are kept, when it fails (pipelines/storage.py, issue 15 §2): a fresh SQLite database that
several processes open at once, a tracking server that goes away mid-run (a real `mlflow server`,
killed and started again), an artifact location that cannot be written.

    python -m pytest -q tests/test_storage.py              (the fast ones)
    python -m pytest -q -m slow tests/test_storage.py      (pipelines and servers in subprocesses)
"""
from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from pipelines import storage
from pipelines.__main__ import main

TINY_XOR = ("xor", "--ks", "2", "--seeds", "1", "--clustering_init", "false")
SECRET = "s3cret"


def together(*commands: list[str], cwd) -> list[subprocess.CompletedProcess]:
    """Starts every command at once and waits for all of them."""
    started = [subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for command in commands]
    outputs = [p.communicate() for p in started]
    return [subprocess.CompletedProcess(p.args, p.returncode, *output) for p, output in zip(started, outputs)]


OPEN_STUDY = """
import os, sys, time, optuna
from pipelines.bisection import open_storage
open(f"ready-{os.getpid()}", "w").close()
while not os.path.exists("go"):  # imported: now all at the same moment
    time.sleep(0.01)
time.sleep(max(0.0, float(open("go").read()) - time.time()))
optuna.create_study(study_name="shared", storage=open_storage(sys.argv[1]), load_if_exists=True)
"""


@pytest.mark.slow
def test_three_processes_open_a_fresh_optuna_sqlite_storage_at_once(tmp_path):
    """Each creates the study if it is missing (without the lock one or two died creating the tables)."""
    url = f"sqlite:///{tmp_path / 'optuna.db'}"

    def go():
        while len(list(tmp_path.glob("ready-*"))) < 3:
            time.sleep(0.05)
        (tmp_path / "go.new").write_text(str(time.time() + 0.5))
        (tmp_path / "go.new").rename(tmp_path / "go")

    threading.Thread(target=go, daemon=True).start()
    done = together(*[[sys.executable, "-c", OPEN_STUDY, url]] * 3, cwd=tmp_path)
    assert [p.returncode for p in done] == [0, 0, 0], [p.stderr[-2000:] for p in done]
    import optuna

    assert [s.study_name for s in optuna.get_all_study_summaries(url)] == ["shared"]


@pytest.mark.slow
def test_three_pipelines_started_together_on_a_fresh_database_all_finish(tmp_path):
    """The issue's case: three pipelines, one new `sqlite:///mlflow.db`, one experiment, started at once."""
    runs = [[sys.executable, "-m", "pipelines", *TINY_XOR, "--max_epochs", "1", "--seed", str(seed),
             "--experiment_name", "together"] for seed in range(3)]
    done = together(*runs, cwd=tmp_path)  # the default store: sqlite:///mlflow.db in the working directory
    assert [p.returncode for p in done] == [0, 0, 0], [p.stderr[-2000:] for p in done]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("together").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert sorted(r.data.params["seed"] for r in parents) == ["0", "1", "2"]
    assert {r.info.status for r in runs} == {"FINISHED"} and len(runs) == 6


# ---------------------------------------------------------------------------------------------
# An artifact location that cannot be written


def test_an_artifact_location_that_is_no_directory_is_said_in_one_line_before_any_run(tracking_uri, tmp_path, capsys):
    (tmp_path / "file.txt").write_text("a file, not a folder")
    location = tmp_path / "file.txt" / "artifacts"
    MlflowClient(tracking_uri).create_experiment("unwritable", artifact_location=str(location))
    capsys.readouterr()  # the database's set-up chatter
    code = main([*TINY_XOR, "--max_epochs", "1", "--tracking_uri", tracking_uri, "--experiment_name", "unwritable"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert f"cannot write artifacts to {location}: {tmp_path / 'file.txt'} is not a directory" in err
    client = MlflowClient(tracking_uri)
    assert client.search_runs([client.get_experiment_by_name("unwritable").experiment_id]) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder")
def test_a_read_only_artifact_location_is_said_in_one_line_before_any_run(tracking_uri, tmp_path, capsys):
    folder = tmp_path / "read-only"
    folder.mkdir(mode=0o500)
    MlflowClient(tracking_uri).create_experiment("read-only", artifact_location=str(folder / "artifacts"))
    capsys.readouterr()  # the database's set-up chatter
    code = main([*TINY_XOR, "--max_epochs", "1", "--tracking_uri", tracking_uri, "--experiment_name", "read-only"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and f"{folder} is not writable" in err, err


def test_a_full_disk_mid_run_is_said_in_one_line_and_the_runs_end_failed(run_pipeline, monkeypatch, capsys):
    from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository

    def full(self, local_path, artifact_path=None):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # what a write into a full file system raises

    monkeypatch.setattr(LocalArtifactRepository, "log_artifact", full)
    result = run_pipeline(*TINY_XOR, "--max_epochs", "1")
    err = capsys.readouterr().err.strip()
    assert result.exit_code == 1 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    child = result.children[0]
    assert err.endswith(f"error: cannot write {child.info.artifact_uri}: No space left on device")
    assert result.parent.info.status == "FAILED" and child.info.status == "FAILED"


# ---------------------------------------------------------------------------------------------
# A tracking server that goes away


class Server:
    """A real `mlflow server` on 127.0.0.1 (SQLite store and artifacts under `folder`), which a test kills
    and starts again on the same port and store. Without its auth app it takes any basic-auth password."""

    def __init__(self, folder):
        self.folder, self.process = folder, None
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]

    @property
    def store(self) -> MlflowClient:
        """Its database, read directly (also while it is down)."""
        return MlflowClient(f"sqlite:///{self.folder / 'mlflow.db'}")

    def start(self) -> None:
        command = [os.path.join(os.path.dirname(sys.executable), "mlflow"), "server", "--host", "127.0.0.1",
                   "--port", str(self.port), "--workers", "1", "--backend-store-uri", f"sqlite:///{self.folder / 'mlflow.db'}",
                   "--artifacts-destination", str(self.folder / "artifacts")]
        with open(self.folder / "server.log", "a") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        deadline = time.monotonic() + 300  # imports and database set-up take a while on a busy machine
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2)
                return
            except OSError:
                assert self.process.poll() is None and time.monotonic() < deadline, (self.folder / "server.log").read_text()
                time.sleep(0.3)

    def kill(self) -> None:
        """Gone at once, the way a crashed or preempted server goes: the server and its workers, SIGKILL."""
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


@pytest.fixture
def server(tmp_path):
    folder = tmp_path / "server"
    folder.mkdir()
    started = Server(folder)
    started.start()
    yield started
    started.kill()


def children(client: MlflowClient, experiment: str):
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id]) if found else []
    return [r for r in runs if "mlflow.parentRunId" in r.data.tags]


def epochs_logged(client: MlflowClient, run_id: str) -> set[float]:
    return {m.value for m in client.get_metric_history(run_id, "epoch")}


@pytest.mark.slow
def test_a_server_killed_mid_training_loses_nothing(server, tmp_path):
    """The training goes on; what the server did not take waits in ./mlflow-unsent/<run id>/ (summary
    included, no password); `python -m pipelines.storage send` hands all of it over once the server is back."""
    uri = f"http://alice:{SECRET}@127.0.0.1:{server.port}"
    pipeline = subprocess.Popen([sys.executable, "-m", "pipelines", *TINY_XOR, "--max_epochs", "40", "--patience", "1000",
                                 "--tracking_uri", uri, "--experiment_name", "away"],
                                cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not (children(server.store, "away") and epochs_logged(server.store, children(server.store, "away")[0].info.run_id)):
        assert pipeline.poll() is None, pipeline.communicate()
        time.sleep(0.1)
    server.kill()  # after the training's first epoch reached the server
    before = epochs_logged(server.store, children(server.store, "away")[0].info.run_id)
    out, err = pipeline.communicate(timeout=1800)
    assert pipeline.returncode == 0, err
    summary = json.loads(out[out.index("\n{") + 1:out.rindex("}") + 1])
    [folder] = (tmp_path / "mlflow-unsent").iterdir()
    assert f"does not answer (ConnectionRefusedError): the pipeline goes on; what it logs waits in {folder}" in err
    assert f"were not sent: they are kept in {folder}" in err
    header, *journal = [json.loads(line) for line in (folder / "journal.jsonl").read_text().splitlines()]
    kept = next(e["local_path"] for e in journal if e["call"] == "log_artifact" and e["local_path"].endswith("summary.json"))
    assert json.loads((folder / kept).read_text()) == summary  # the summary is on this machine
    assert SECRET not in out + err and not [p for p in folder.rglob("*") if p.is_file() and SECRET in p.read_text("latin-1")]

    server.start()
    sent = subprocess.run([sys.executable, "-m", "pipelines.storage", "send", "--tracking_uri", uri],
                          cwd=tmp_path, capture_output=True, text=True)
    assert sent.returncode == 0 and not folder.exists(), sent.stderr
    client = MlflowClient(uri)
    [child] = children(client, "away")
    [parent] = [r for r in client.search_runs([child.info.experiment_id]) if r.info.run_id != child.info.run_id]
    assert (parent.info.status, child.info.status) == ("FINISHED", "FINISHED")
    with open(client.download_artifacts(parent.info.run_id, "summary.json", str(tmp_path))) as handle:
        assert json.load(handle) == summary
    epochs = int(child.data.metrics["steps"]) // 50  # --passes_per_epoch 50 gradient steps an epoch
    assert len(before) < epochs and epochs_logged(client, child.info.run_id) == set(range(epochs))  # none missing


@pytest.mark.slow
def test_what_waits_is_sent_in_order_once_the_server_answers_again(server, tmp_path, monkeypatch, capsys):
    """While the server is away writes wait (a run opened meanwhile has a temporary id); the first write
    after it is back sends them first, with the server's ids, and the local copy goes."""
    monkeypatch.setattr(storage, "RETRY_S", 0)  # ask the server again at every write
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    client = storage.Client(f"http://127.0.0.1:{server.port}")
    experiment = client.create_experiment("comeback")
    parent = client.create_run(experiment).info.run_id
    server.kill()
    client.log_batch(parent, metrics=[Metric("loss", 1.0, 0, 0)])
    child = client.create_run(experiment, tags={"mlflow.parentRunId": parent}, run_name="training").info.run_id
    client.log_batch(child, metrics=[Metric("loss", 0.5, 0, 1)])
    client.log_dict(parent, {"accuracy": 0.9}, "summary.json")
    client.set_terminated(child)
    folder = tmp_path / storage.UNSENT / parent
    assert child.startswith(storage.TEMPORARY) and len((folder / "journal.jsonl").read_text().splitlines()) == 1 + 5

    server.start()
    client.set_terminated(parent)
    assert not folder.exists()
    err = capsys.readouterr().err
    assert "does not answer" in err and "answers again" in err
    [training] = children(client, "comeback")
    assert training.info.run_name == "training" and training.data.tags["mlflow.parentRunId"] == parent
    assert training.info.status == "FINISHED" and training.data.metrics == {"loss": 0.5}
    run = client.get_run(parent)
    assert run.info.status == "FINISHED" and run.data.metrics == {"loss": 1.0}
    assert [a.path for a in client.list_artifacts(parent)] == ["summary.json"]
