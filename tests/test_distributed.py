"""One distributed launch per pipeline run: started by us (`--devices 2`), as two nodes on one machine
(NODE_RANK 0 and 1), by torchrun; a rank that dies fails the run on rank 0 with one line; SIGTERM stops
every rank. Real processes over gloo on the CPU: lottery_ticket (many short trainings; its masks must
match one process's) and intrinsic_dim (rank 0 alone talks to Optuna; d_int90 within the resolution)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
from mlflow.tracking import MlflowClient

FLAGS = ["lottery_ticket", "--dataset", "digits", "--rounds", "2", "--max_epochs", "2", "--val_every", "22",
         "--controls", "random_reinit", "--system_metrics", "false", "--accelerator", "cpu"]
DDP = ["--strategy", "ddp"]
D_INT90 = ["intrinsic_dim", "--dataset", "digits", "--max_epochs", "4", "--d_min", "30", "--d_max", "1000",
           "--resolution", "1", "--seeds", "1", "--system_metrics", "false", "--accelerator", "cpu"]


def _free_port() -> str:
    from lightning.fabric.plugins.environments.lightning import find_free_network_port

    return str(find_free_network_port())


def _runs(uri: str) -> tuple[list, list]:
    client = MlflowClient(uri)
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    return [r for r in runs if "mlflow.parentRunId" not in r.data.tags], [r for r in runs if "mlflow.parentRunId" in r.data.tags]


def _summary(uri: str) -> dict:
    client = MlflowClient(uri)
    (parent,), _ = _runs(uri)
    with open(client.download_artifacts(parent.info.run_id, "summary.json")) as handle:
        return json.load(handle)


def _start(argv: list[str], uri: str, cwd, launcher: list[str] | None = None, **env) -> subprocess.Popen:
    command = [*(launcher or [sys.executable, "-m"]), "pipelines", *argv, "--tracking_uri", uri]
    return subprocess.Popen(command, cwd=cwd, env={**os.environ, **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _finished_alike(uri: str, reference: dict) -> None:
    parents, children = _runs(uri)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 5 and {c.info.status for c in children} == {"FINISHED"}  # dense + 2 rounds x 2
    rounds, expected = _summary(uri)["rounds"], reference["rounds"]
    for got, want in zip(rounds, expected):  # the same masks; DDP sums the gradients in another order
        assert got["winning"]["weights_remaining"] == want["winning"]["weights_remaining"]
        assert abs(got["winning"]["final_test_acc"] - want["winning"]["final_test_acc"]) < 0.03


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("single")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    assert _start(FLAGS, uri, folder).wait() == 0
    return _summary(uri)


def _same_d_int90(uri: str, storage: str, reference: dict) -> None:
    import optuna

    from pipelines.bisection import open_storage

    parents, children = _runs(uri)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 4 and {c.info.status for c in children} == {"FINISHED"}  # direct + 3 bisection steps
    (study,) = optuna.get_all_study_summaries(open_storage(storage))
    assert study.n_trials == 4  # every trial told once, by rank 0
    got = _summary(uri)
    assert got["d_int90_is"] == reference["d_int90_is"] == "measured"
    assert max(got["d_int90"], reference["d_int90"]) / min(got["d_int90"], reference["d_int90"]) <= 2  # resolution 1


@pytest.fixture(scope="module")
def single_d_int90(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("single_d_int90")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    assert _start([*D_INT90, "--storage", f"sqlite:///{folder / 'optuna.db'}"], uri, folder).wait() == 0
    return _summary(uri)


@pytest.mark.slow
def test_devices_2_starts_its_ranks_once_and_gives_one_parent_run(tmp_path, single):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = _start([*FLAGS, *DDP, "--devices", "2"], uri, tmp_path)
    out, err = run.communicate(timeout=600)
    assert run.returncode == 0, err
    assert out.count("View the runs") == 1  # rank 1 ran the pipeline too, silently
    _finished_alike(uri, single)


@pytest.mark.slow
def test_two_nodes_on_one_machine(tmp_path, single_d_int90):
    uri, storage = f"sqlite:///{tmp_path / 'mlflow.db'}", f"sqlite:///{tmp_path / 'optuna.db'}"
    rendezvous = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": _free_port()}
    nodes = [_start([*D_INT90, *DDP, "--storage", storage, "--num_nodes", "2", "--devices", "1"], uri, tmp_path,
                    NODE_RANK=str(rank), **rendezvous) for rank in (0, 1)]
    assert [node.wait(timeout=600) for node in nodes] == [0, 0], [node.stderr.read()[-2000:] for node in nodes]
    _same_d_int90(uri, storage, single_d_int90)


@pytest.mark.slow
def test_torchrun(tmp_path, single_d_int90):
    uri, storage = f"sqlite:///{tmp_path / 'mlflow.db'}", f"sqlite:///{tmp_path / 'optuna.db'}"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", _free_port(), "-m"]
    run = _start([*D_INT90, *DDP, "--storage", storage, "--devices", "2"], uri, tmp_path, launcher=torchrun)
    out, err = run.communicate(timeout=600)
    assert run.returncode == 0, err[-3000:]
    assert out.count("View the runs") == 1
    _same_d_int90(uri, storage, single_d_int90)


def _when_training(run: subprocess.Popen, uri: str) -> None:
    """Waits until the launched ranks train (a child run exists)."""
    deadline = time.time() + 300
    while time.time() < deadline and run.poll() is None:
        try:
            if _runs(uri)[1]:
                return
        except Exception:  # noqa: BLE001 (the database may not exist yet)
            pass
        time.sleep(0.5)
    pytest.fail("no training started")


@pytest.mark.slow
def test_a_rank_that_dies_fails_the_run_with_one_line_and_nothing_left_running(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = _start([*FLAGS, *DDP, "--devices", "2", "--rounds", "6"], uri, tmp_path)
    _when_training(run, uri)
    (rank_1,) = psutil.Process(run.pid).children()
    rank_1.send_signal(signal.SIGKILL)
    _, err = run.communicate(timeout=300)
    assert run.returncode == 1
    assert "failed: rank 1 exited with code -9; the open runs are marked FAILED" in err.splitlines()[-1]
    parents, children = _runs(uri)
    assert parents[0].info.status == "FAILED" and "RUNNING" not in {c.info.status for c in children}


@pytest.mark.slow
def test_sigterm_stops_every_rank_and_marks_the_runs_killed(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = _start([*FLAGS, *DDP, "--devices", "2", "--rounds", "6"], uri, tmp_path)
    _when_training(run, uri)
    (rank_1,) = psutil.Process(run.pid).children()
    run.send_signal(signal.SIGTERM)
    _, err = run.communicate(timeout=300)
    assert run.returncode == 130 and "run the same command again to resume" in err.splitlines()[-1]
    assert not rank_1.is_running() or rank_1.status() == psutil.STATUS_ZOMBIE
    parents, children = _runs(uri)
    assert parents[0].info.status == "KILLED" and "RUNNING" not in {c.info.status for c in children}
