"""Shared fixtures: a temporary MLflow SQLite store, and a runner for the CLI end to end."""
from __future__ import annotations

import json

import pytest
import torch
from mlflow.tracking import MlflowClient

from pipelines.__main__ import main


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    """Every test runs in its own folder, outside any `mlflow run`, on the CPU."""
    monkeypatch.chdir(tmp_path)
    for name in ("MLFLOW_RUN_ID", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(name, raising=False)
    torch.manual_seed(0)


@pytest.fixture
def tracking_uri(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


class PipelineRun:
    """What one CLI invocation logged: the parent run, its children, and summary.json."""

    def __init__(self, client: MlflowClient, experiment_name: str, exit_code: int):
        self.client, self.exit_code = client, exit_code
        experiment = client.get_experiment_by_name(experiment_name)
        runs = client.search_runs([experiment.experiment_id]) if experiment else []
        self.parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
        self.parent = self.parents[0] if self.parents else None
        self.children = [r for r in runs if self.parent and r.data.tags.get("mlflow.parentRunId") == self.parent.info.run_id]

    def artifact_paths(self, run_id: str | None = None, path: str = "") -> list[str]:
        out = []
        for item in self.client.list_artifacts(run_id or self.parent.info.run_id, path):
            out += self.artifact_paths(run_id, item.path) if item.is_dir else [item.path]
        return out

    def summary(self) -> dict:
        local = self.client.download_artifacts(self.parent.info.run_id, "summary.json")
        with open(local) as handle:
            return json.load(handle)


@pytest.fixture
def refused(tmp_path, capsys):
    """refused(name, *flags) -> the error line, once the contract for bad input holds: exit code 2,
    one line, no traceback, and nothing written (no tracking database, no Optuna study)."""

    def _refused(name: str, *flags: str) -> str:
        code = main([name, *flags])  # the default store: sqlite:///mlflow.db in this test's folder
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert not list(tmp_path.glob("*.db")) and not list(tmp_path.glob("*.journal"))
        return err

    return _refused


@pytest.fixture
def run_pipeline(tracking_uri):
    """run_pipeline(name, *flags) -> PipelineRun, through the real CLI into a temporary SQLite store."""

    def _run(name: str, *flags: str) -> PipelineRun:
        experiment = f"test-{name}"
        code = main([name, "--tracking_uri", tracking_uri, "--experiment_name", experiment, *flags])
        return PipelineRun(MlflowClient(tracking_uri), experiment, code)

    return _run
