"""MLflow runs of one pipeline invocation: a parent run, a child run per training.

The parent is the run `mlflow run` created when `MLFLOW_RUN_ID` is set, else a new run in
`--experiment_name` (default: the pipeline's name; an experiment created here is of kind "custom
model development", which the MLflow UI opens on its runs). It is tagged `pipeline=<name>`, named
after what it measures (`run_name`), samples the machine's CPU, memory and GPU as `system/` metrics
(`--system_metrics`), and ends with `summary.json`, the figures under `figures/` and a description
(`mlflow.note.content`: a headline, the summary's numbers, the command that reproduces it).
On an exception every open run is marked FAILED (KILLED on Ctrl-C or SIGTERM) and what was logged stays. Parameters `mlflow run`
already logged are never logged again (MLflow refuses a second, differently spelled value).
No password of a tracking or storage URL is logged or printed: `pipelines.redact.mask_url`.
"""
from __future__ import annotations

import dataclasses
import math
import os
import shlex
import time

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from pipelines import load
from pipelines.params import UsageError, defaults, format_value
from pipelines.redact import mask_url

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def resolve_tracking_uri(flag: str = "") -> str:
    return flag or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def _as_params(values: dict) -> dict[str, str]:
    return {k: mask_url(format_value(v))[:6000] for k, v in values.items()}


def check_reachable(uri: str) -> None:
    """A tracking server that does not answer is bad input, said at once (MLflow retries for minutes)."""
    if not uri.startswith(("http://", "https://")):
        return
    import requests

    try:
        requests.head(uri, timeout=10)  # any answer will do, even 401 or 404
    except requests.exceptions.SSLError:
        pass  # it answered; certificates are MLflow's to judge (MLFLOW_TRACKING_INSECURE_TLS, ..._CERT_PATH)
    except (requests.ConnectionError, requests.Timeout) as error:
        raise UsageError("tracking_uri", f"cannot reach {mask_url(uri)} ({type(error).__name__}): "
                                         f"is the MLflow server running?") from None


def run_name(pipeline: str, params) -> str:
    """What the parent run measures: the pipeline and the values of the pipeline module's
    `RUN_NAME_FIELDS` (default: model, where there is one, and dataset), e.g. `intrinsic_dim fc mnist5k`."""
    words = [pipeline]
    for field in getattr(load(pipeline), "RUN_NAME_FIELDS", ("model", "dataset")):
        value = format_value(getattr(params, field, ""))
        if value and value not in words:  # `xor`, not `xor xor`
            words.append(value)
    return " ".join(words)


def command(pipeline: str, params) -> str:
    """`python -m pipelines <name> --flag value ...`, with the flags that differ from their defaults (secrets masked)."""
    default = defaults(type(params))
    flags = [(name, format_value(value)) for name, value in dataclasses.asdict(params).items()]
    return " ".join(["python -m pipelines", pipeline, *(f"--{name} {shlex.quote(mask_url(value))}"
                                                        for name, value in flags if value != default[name])])


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return mask_url(format_value(value)).replace("|", "\\|")


def describe(headline: str, summary: dict, how: str) -> str:
    """The parent run's description (markdown): the headline, the summary's scalar entries, the command."""
    rows = [f"| {key} | {_cell(value)} |" for key, value in summary.items()
            if value is None or isinstance(value, (bool, int, float, str))]
    table = ["| summary.json | |", "|---|---|", *rows, ""] if rows else []
    return "\n".join([f"**{headline}**", "", *table, "Reproduce:", "", "```", how, "```"])


def generic_headline(name: str, summary: dict) -> str:
    """`<run name>: key = value, ...` from the first three scalar entries, for a pipeline without `headline()`."""
    numbers = [f"{key} = {_cell(value)}" for key, value in summary.items()
               if isinstance(value, (int, float)) and not isinstance(value, bool)][:3]
    return f"{name}: {', '.join(numbers)}" if numbers else f"{name}: finished"


_interrupted = False


def interrupt(signum, frame) -> None:
    """The handler of SIGINT and SIGTERM: remembers the interrupt, then raises KeyboardInterrupt. Inside
    a fit Lightning turns that into exit(1), so the flag, not the exception, says the runs were killed."""
    global _interrupted
    _interrupted = True
    raise KeyboardInterrupt


def interrupted() -> bool:
    return _interrupted


def run_status(exc_type) -> str:
    """How a run ends: FINISHED, KILLED when interrupted (Ctrl-C, SIGTERM), FAILED on any other exception."""
    if exc_type is None:
        return "FINISHED"
    return "KILLED" if _interrupted or issubclass(exc_type, KeyboardInterrupt) else "FAILED"


class Tracking:
    """Context manager owning the parent run; `child()` opens a run per training."""

    def __init__(self, pipeline: str, params):
        self.pipeline = pipeline
        self.uri = resolve_tracking_uri(params.tracking_uri)  # with its password: it connects, it is never shown
        self.client = MlflowClient(tracking_uri=self.uri)
        self.params = dataclasses.asdict(params)
        self.experiment_name = params.experiment_name or pipeline
        self.name = run_name(pipeline, params)
        self.command = command(pipeline, params)
        self.system_metrics = params.system_metrics
        self.parent_id: str | None = None
        self.experiment_id: str | None = None
        self._open_children: set[str] = set()
        self._owns_parent = False
        self._monitor = None
        # MLflow prints two links, tracking URI and password included, for every run it ends against a
        # server (Lightning ends each training's run, then we do): ui_hint() prints one, masked.
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

    def __enter__(self) -> "Tracking":
        check_reachable(self.uri)
        run_id = os.environ.get("MLFLOW_RUN_ID")
        if run_id:
            run = self.client.get_run(run_id)
            self.experiment_id = run.info.experiment_id
            logged = run.data.params
        else:
            experiment = self.client.get_experiment_by_name(self.experiment_name)
            self.experiment_id = (experiment.experiment_id if experiment
                                  else self.client.create_experiment(self.experiment_name, tags=EXPERIMENT_KIND))
            run = self.client.create_run(self.experiment_id, run_name=self.name, tags={"pipeline": self.pipeline})
            run_id, logged, self._owns_parent = run.info.run_id, {}, True
        self.parent_id = run_id
        # mlflow.runName also renames the run `mlflow run` created (a random name such as "bold-cat-42").
        self.client.log_batch(run_id, tags=[RunTag("pipeline", self.pipeline), RunTag("mlflow.runName", self.name)])
        self.log_params(run_id, {k: v for k, v in self.params.items() if k not in logged})
        if self.system_metrics:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            # Every $MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL seconds (default 10), until __exit__; GPUs need nvidia-ml-py.
            self._monitor = SystemMetricsMonitor(run_id, resume_logging=not self._owns_parent, tracking_uri=self.uri)
            self._monitor.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        status = run_status(exc_type)
        if self._monitor:
            self._monitor.finish()
            # and one sample at the end: MLflow's loop publishes only after a full interval, so a run
            # shorter than it would have none
            self._monitor.collect_metrics()
            self._monitor.publish_metrics(self._monitor.aggregate_metrics())
            self._monitor.mlflow_logger.flush()
        for run_id in list(self._open_children):
            self.end_child(run_id, status)
        if exc_type is not None:
            self.set_note(f"failed ({exc_type.__name__})", {})
        if self._owns_parent or exc_type is not None:
            self.client.set_terminated(self.parent_id, status)

    def log_summary(self, summary: dict) -> None:
        """`summary.json` on the parent, and the description the MLflow UI shows on the run's page:
        the pipeline module's `headline(summary)` (one line) when it has one, else a generic one."""
        self.log_dict(summary, "summary.json")
        headline = getattr(load(self.pipeline), "headline", None)
        self.set_note(headline(summary) if headline else generic_headline(self.name, summary), summary)

    def set_note(self, headline: str, summary: dict) -> None:
        self.client.set_tag(self.parent_id, "mlflow.note.content", describe(headline, summary, self.command))

    def log_params(self, run_id: str, values: dict) -> None:
        items = list(_as_params(values).items())
        for start in range(0, len(items), 100):
            self.client.log_batch(run_id, params=[Param(k, v) for k, v in items[start:start + 100]])

    def child(self, name: str, params: dict | None = None) -> "ChildRun":
        """A child run of the parent, carrying the pipeline's parameters plus `params`.

        Use it as `with tracking.child(name, params) as run:`: the run ends FINISHED, or KILLED on an
        interrupt and FAILED on any other exception.
        """
        tags = {"mlflow.parentRunId": self.parent_id, "pipeline": self.pipeline}
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        run_id = run.info.run_id
        self._open_children.add(run_id)
        self.log_params(run_id, {**self.params, **(params or {})})
        return ChildRun(run_id, self)

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

    def log_table(self, data: dict, path: str, run_id: str | None = None) -> None:
        self.client.log_table(run_id or self.parent_id, data, path)

    def log_figure(self, figure, name: str, run_id: str | None = None) -> None:
        """Saves a matplotlib figure as `figures/<name>.png` on the parent (or `run_id`) and closes it."""
        import matplotlib.pyplot as plt

        self.client.log_figure(run_id or self.parent_id, figure, f"figures/{name}.png")
        plt.close(figure)

    def ui_hint(self) -> str:
        page = f"#/experiments/{self.experiment_id}/runs/{self.parent_id}"
        if self.uri.startswith(("http://", "https://")):  # a server: its own page
            return f"View the runs: {mask_url(self.uri).rstrip('/')}/{page}"
        return f"View the runs: mlflow ui --backend-store-uri {mask_url(self.uri)} then open http://127.0.0.1:5000/{page}"


class ChildRun:
    """One training's run (`with tracking.child(name, params) as run:`): its id, what it logs, and how it ends."""

    def __init__(self, run_id: str, tracking: Tracking):
        self.id, self.tracking = run_id, tracking

    @property
    def tracking_uri(self) -> str:
        return self.tracking.uri

    def __enter__(self) -> "ChildRun":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.tracking.end_child(self.id, run_status(exc_type))

    def log_metrics(self, metrics: dict, step: int = 0) -> None:
        self.tracking.log_metrics(self.id, metrics, step)

    def log_dict(self, data: dict, path: str) -> None:
        self.tracking.log_dict(data, path, self.id)

    def log_table(self, data: dict, path: str) -> None:
        self.tracking.log_table(data, path, self.id)

    def log_artifact(self, path: str, folder: str | None = None) -> None:
        self.tracking.client.log_artifact(self.id, path, folder)

    def log_figure(self, figure, name: str) -> None:
        self.tracking.log_figure(figure, name, run_id=self.id)

    def set_tag(self, key: str, value) -> None:
        self.tracking.client.set_tag(self.id, key, format_value(value))

    def log_dataset(self, data) -> None:
        """The training data as an MLflow dataset input (the runs table's Dataset column): name, a digest
        of the arrays, the corruption; one entry per split, the split as its context."""
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.data.code_dataset_source import CodeDatasetSource
        from mlflow.entities import DatasetInput, InputTag

        source = CodeDatasetSource({"dataset": data.dataset, "corruption": str(data.corruption)})
        inputs = []
        for split, (x, y) in data.splits.items():
            dataset = MetaDataset(source, name=data.dataset, digest=_digest(x, y))._to_mlflow_entity()
            inputs.append(DatasetInput(dataset, tags=[InputTag("mlflow.data.context", split)]))
        self.tracking.client.log_inputs(self.id, datasets=inputs)


def _digest(x, y) -> str:
    """A short content hash of a split's tensors (the same arrays give the same digest on every run)."""
    import hashlib

    h = hashlib.sha256()
    for tensor in (x, y):
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:10]
