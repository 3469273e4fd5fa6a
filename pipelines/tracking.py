"""MLflow runs of one pipeline invocation: a parent run, a child run per training.

The parent is the run `mlflow run` created when `MLFLOW_RUN_ID` is set, else a new run in
`--experiment_name` (default: the pipeline's name). It is tagged `pipeline=<name>` and ends with
`summary.json` and the figures under `figures/`. On an exception every open run is marked FAILED
and what was logged stays. Parameters `mlflow run` already logged are never logged again (MLflow
refuses a second, differently spelled value).
"""
from __future__ import annotations

import dataclasses
import math
import os
import time

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from pipelines.params import format_value

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def resolve_tracking_uri(flag: str = "") -> str:
    return flag or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def _as_params(values: dict) -> dict[str, str]:
    return {k: format_value(v)[:6000] for k, v in values.items()}


class Tracking:
    """Context manager owning the parent run; `child()` opens a run per training."""

    def __init__(self, pipeline: str, params):
        self.pipeline = pipeline
        self.uri = resolve_tracking_uri(params.tracking_uri)
        self.client = MlflowClient(tracking_uri=self.uri)
        self.params = dataclasses.asdict(params)
        self.experiment_name = params.experiment_name or pipeline
        self.parent_id: str | None = None
        self.experiment_id: str | None = None
        self._open_children: set[str] = set()
        self._owns_parent = False

    def __enter__(self) -> "Tracking":
        run_id = os.environ.get("MLFLOW_RUN_ID")
        if run_id:
            run = self.client.get_run(run_id)
            self.experiment_id = run.info.experiment_id
            logged = run.data.params
        else:
            experiment = self.client.get_experiment_by_name(self.experiment_name)
            self.experiment_id = (experiment.experiment_id if experiment
                                  else self.client.create_experiment(self.experiment_name))
            run = self.client.create_run(self.experiment_id, run_name=self.pipeline, tags={"pipeline": self.pipeline})
            run_id, logged, self._owns_parent = run.info.run_id, {}, True
        self.parent_id = run_id
        self.client.set_tag(run_id, "pipeline", self.pipeline)
        self.log_params(run_id, {k: v for k, v in self.params.items() if k not in logged})
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        status = "FINISHED" if exc_type is None else "FAILED"
        for run_id in list(self._open_children):
            self.end_child(run_id, status)
        if self._owns_parent or exc_type is not None:
            self.client.set_terminated(self.parent_id, status)

    def log_params(self, run_id: str, values: dict) -> None:
        items = list(_as_params(values).items())
        for start in range(0, len(items), 100):
            self.client.log_batch(run_id, params=[Param(k, v) for k, v in items[start:start + 100]])

    def child(self, name: str, params: dict | None = None) -> str:
        """A child run of the parent, carrying the pipeline's parameters plus `params`."""
        tags = {"mlflow.parentRunId": self.parent_id, "pipeline": self.pipeline}
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        run_id = run.info.run_id
        self._open_children.add(run_id)
        self.log_params(run_id, {**self.params, **(params or {})})
        return run_id

    def end_child(self, run_id: str, status: str = "FINISHED") -> None:
        self._open_children.discard(run_id)
        self.client.set_terminated(run_id, status)

    def log_metrics(self, run_id: str | None, metrics: dict, step: int = 0) -> None:
        """Logs the finite numbers of `metrics` (None, NaN and non-numbers are skipped)."""
        now = int(time.time() * 1000)
        rows = [Metric(k, float(v), now, step) for k, v in metrics.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
        if rows:
            self.client.log_batch(run_id or self.parent_id, metrics=rows)

    def log_dict(self, data: dict, path: str, run_id: str | None = None) -> None:
        self.client.log_dict(run_id or self.parent_id, data, path)

    def log_figure(self, figure, name: str, run_id: str | None = None) -> None:
        """Saves a matplotlib figure as `figures/<name>.png` on the parent (or `run_id`) and closes it."""
        import matplotlib.pyplot as plt

        self.client.log_figure(run_id or self.parent_id, figure, f"figures/{name}.png")
        plt.close(figure)

    def ui_hint(self) -> str:
        return (f"View the runs: mlflow ui --backend-store-uri {self.uri} then open "
                f"http://127.0.0.1:5000/#/experiments/{self.experiment_id}/runs/{self.parent_id}")
