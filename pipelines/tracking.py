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

Resume: the parent is tagged `params_digest` (the parameters that change what is measured), `host`,
`pid` and a `heartbeat`. With `--resume true` (the default) the same command continues the newest
parent of that digest that did not finish and whose process is gone (under `mlflow run`, its finished
children move to the new run); a child of the same name and parameters that FINISHED there is handed
back `reused` (`train()` loads its trained state instead of fitting; its logging calls do nothing)
and only the rest is trained. Under DDP only global rank 0 talks to MLflow; the other ranks get the
same run ids and skip every call.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import math
import os
import shlex
import socket
import tempfile
import threading
import time

from mlflow.entities import Metric, Param, RunTag

from pipelines import load, storage
from pipelines.distributed import broadcast, is_rank_zero, on_rank_zero
from pipelines.params import UsageError, defaults, format_value
from pipelines.redact import mask_url

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
# Flags that say where results go or how to run, not what is measured: a run resumes across them.
NOT_IN_DIGEST = ("tracking_uri", "experiment_name", "resume", "system_metrics", "data_dir", "download", "workers")
HEARTBEAT_S = 60  # a RUNNING parent on another host counts as alive for 3 heartbeats after its last one


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


def params_digest(pipeline: str, params) -> str:
    """A short hash of the pipeline and the parameters that change what it measures (tag `params_digest`)."""
    values = {k: format_value(v) for k, v in dataclasses.asdict(params).items() if k not in NOT_IN_DIGEST}
    return hashlib.sha256(json.dumps([pipeline, values], sort_keys=True).encode()).hexdigest()[:16]


def _alive(run) -> bool:
    """Whether a RUNNING run's process still works: on this host, its pid exists (and is not ours); on another,
    its heartbeat is recent. A run left RUNNING by a killed process is not alive."""
    tags = run.data.tags
    if tags.get("host") == socket.gethostname():
        pid = int(tags.get("pid", "0"))
        try:
            os.kill(pid, 0)
        except (OSError, ValueError):
            return False
        return pid not in (0, os.getpid())
    return time.time() - float(tags.get("heartbeat", "0")) < 3 * HEARTBEAT_S


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

    def __init__(self, pipeline: str, params, nested_in: str | None = None):
        self.pipeline = pipeline
        self.active = is_rank_zero()  # under DDP only global rank 0 talks to MLflow
        self.nested_in = nested_in  # a run this pipeline's parent is nested under (the reading group's)
        self.digest = params_digest(pipeline, params)
        self.resume = params.resume
        self.uri = resolve_tracking_uri(params.tracking_uri)  # with its password: it connects, it is never shown
        self.client = storage.client(self.uri) if self.active else None  # keeps what a server away cannot take
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
        self._finished: dict[str, str] = {}  # training key -> a FINISHED child run of the resumed parent
        self._keys = collections.Counter()  # (name, params) -> how many children had it so far
        self._beating = threading.Event()
        # MLflow prints two links, tracking URI and password included, for every run it ends against a
        # server (Lightning ends each training's run, then we do): ui_hint() prints one, masked.
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a resume downloads each trained state

    def __enter__(self) -> "Tracking":
        try:
            if self.active:
                self._open()
            self.parent_id, self.experiment_id = broadcast((self.parent_id, self.experiment_id))
        except BaseException as error:  # the parent run may exist already: it ends FAILED (or KILLED), not RUNNING
            if self.parent_id:
                self.__exit__(type(error), error, None)
            raise
        return self

    def _open(self) -> None:
        check_reachable(self.uri)
        run_id = None if self.nested_in else os.environ.get("MLFLOW_RUN_ID")  # a nested pipeline gets its own run
        if run_id:
            run = self.client.get_run(run_id)
            self.experiment_id = run.info.experiment_id
        else:
            experiment = self.client.get_experiment_by_name(self.experiment_name)
            self.experiment_id = (experiment.experiment_id if experiment
                                  else self.client.create_experiment(self.experiment_name, tags=EXPERIMENT_KIND))
        previous = self._unfinished() if self.resume else None
        if previous and not run_id:  # continue it
            run, self._owns_parent = previous, True
            self.client.update_run(run.info.run_id, status="RUNNING")
        elif not run_id:
            run, self._owns_parent = self.client.create_run(self.experiment_id, run_name=self.name), True
        self.parent_id = run.info.run_id
        if previous:
            self._take_over(previous)
        tags = {"pipeline": self.pipeline, "mlflow.runName": self.name, "params_digest": self.digest,
                "host": socket.gethostname(), "pid": str(os.getpid()), "heartbeat": str(time.time())}
        if self.nested_in:
            tags["mlflow.parentRunId"] = self.nested_in
        # mlflow.runName also renames the run `mlflow run` created (a random name such as "bold-cat-42").
        self.client.log_batch(self.parent_id, tags=[RunTag(k, v) for k, v in tags.items()])
        logged = run.data.params  # a value is logged once: a resumed run keeps its first (they match but for NOT_IN_DIGEST)
        self.log_params(self.parent_id, {k: v for k, v in self.params.items() if k not in logged})
        threading.Thread(target=self._beat, daemon=True).start()
        if self.system_metrics:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            # Every $MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL seconds (default 10), until __exit__; GPUs need nvidia-ml-py.
            self._monitor = SystemMetricsMonitor(self.parent_id, resume_logging=previous is not None or not self._owns_parent,
                                                 tracking_uri=self.uri)
            self._monitor.mlflow_logger.client = self.client  # its samples wait with the rest while a server is away
            self._monitor.start()

    def _unfinished(self):
        """The newest parent of this command (same digest) that did not finish and whose process is gone."""
        runs = self.client.search_runs(
            [self.experiment_id], f"tags.params_digest = '{self.digest}' and tags.pipeline = '{self.pipeline}'",
            order_by=["attributes.start_time DESC"])
        return next((r for r in runs if r.info.status != "FINISHED" and "resumed_in" not in r.data.tags
                     and not (r.info.status == "RUNNING" and _alive(r))), None)

    def _take_over(self, previous) -> None:
        """Reuse what `previous` finished: its trainings left RUNNING by a killed process end KILLED, its
        FINISHED ones are reused (moved under this parent when it is a new run, as under `mlflow run`)."""
        children = self.client.search_runs([self.experiment_id], f"tags.mlflow.parentRunId = '{previous.info.run_id}'",
                                           max_results=50000)  # MLflow's default page (1,000) is less than a big sweep
        for child in children:
            key = child.data.tags.get("training_key")
            if child.info.status == "RUNNING":
                self.client.set_terminated(child.info.run_id, "KILLED")
            elif child.info.status == "FINISHED" and key:
                self._finished[key] = child.info.run_id
                if previous.info.run_id != self.parent_id:
                    self.client.set_tag(child.info.run_id, "mlflow.parentRunId", self.parent_id)
        if previous.info.run_id != self.parent_id:
            self.client.set_tag(previous.info.run_id, "resumed_in", self.parent_id)
            if previous.info.status == "RUNNING":
                self.client.set_terminated(previous.info.run_id, "KILLED")
        print(f"resuming {self.pipeline} run {previous.info.run_id}: {len(self._finished)} finished trainings "
              f"are reused, the rest is trained (--resume false starts afresh)", flush=True)

    def _beat(self) -> None:
        while not self._beating.wait(HEARTBEAT_S):
            try:
                self.client.set_tag(self.parent_id, "heartbeat", str(time.time()))
            except Exception:  # noqa: BLE001 (a heartbeat that cannot be sent is not worth stopping a training for)
                pass

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.active:
            return
        self._beating.set()
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
        if not self.active:
            return
        self.log_dict(summary, "summary.json")
        description = getattr(load(self.pipeline), "description", None)
        if description:  # the pipeline writes its whole description (reading_group: its report's verdicts)
            self.client.set_tag(self.parent_id, "mlflow.note.content", description(summary))
            return
        headline = getattr(load(self.pipeline), "headline", None)
        self.set_note(headline(summary) if headline else generic_headline(self.name, summary), summary)

    def set_note(self, headline: str, summary: dict) -> None:
        if self.active:
            self.client.set_tag(self.parent_id, "mlflow.note.content", describe(headline, summary, self.command))

    def log_params(self, run_id: str, values: dict) -> None:
        items = list(_as_params(values).items())
        for start in range(0, len(items), 100):
            self.client.log_batch(run_id, params=[Param(k, v) for k, v in items[start:start + 100]])

    def child(self, name: str, params: dict | None = None) -> "ChildRun":
        """A child run of the parent, carrying the pipeline's parameters plus `params`; on a resumed parent,
        the FINISHED child of the same name and parameters, `reused`.

        Use it as `with tracking.child(name, params) as run:`: the run ends FINISHED, or KILLED on an
        interrupt and FAILED on any other exception. Every rank calls it, in the same order.
        """
        what = json.dumps([name, {k: format_value(v) for k, v in (params or {}).items()}], sort_keys=True)
        self._keys[what] += 1  # the n-th training of the same name and parameters is its own
        key = hashlib.sha256(f"{what}#{self._keys[what]}".encode()).hexdigest()[:16]
        run_id, reused = on_rank_zero(self._open_child, name, key, params)
        return ChildRun(run_id, self, reused)

    def _open_child(self, name: str, key: str, params: dict | None) -> tuple[str, bool]:
        if key in self._finished:
            return self._finished.pop(key), True
        tags = {"mlflow.parentRunId": self.parent_id, "pipeline": self.pipeline, "training_key": key}
        run_id = self.client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id
        self._open_children.add(run_id)
        self.log_params(run_id, {**self.params, **(params or {})})
        return run_id, False

    def end_child(self, run_id: str, status: str = "FINISHED") -> None:
        if not self.active:
            return
        self._open_children.discard(run_id)
        self.client.set_terminated(run_id, status)

    def log_metrics(self, run_id: str | None, metrics: dict, step: int = 0) -> None:
        """Logs the finite numbers of `metrics` (None, NaN and non-numbers are skipped)."""
        if not self.active:
            return
        now = int(time.time() * 1000)
        rows = [Metric(k, float(v), now, step) for k, v in metrics.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
        if rows:
            self.client.log_batch(run_id or self.parent_id, metrics=rows)

    def log_dict(self, data: dict, path: str, run_id: str | None = None) -> None:
        if self.active:
            self.client.log_dict(run_id or self.parent_id, data, path)

    def log_table(self, data: dict, path: str, run_id: str | None = None) -> None:
        if self.active:
            self.client.log_table(run_id or self.parent_id, data, path)

    def log_figure(self, figure, name: str, run_id: str | None = None) -> None:
        """Saves a matplotlib figure as `figures/<name>.png` on the parent (or `run_id`) and closes it."""
        import matplotlib.pyplot as plt

        if self.active:
            self.client.log_figure(run_id or self.parent_id, figure, f"figures/{name}.png")
        plt.close(figure)

    def ui_hint(self) -> str:
        page = f"#/experiments/{self.experiment_id}/runs/{self.parent_id}"
        if self.uri.startswith(("http://", "https://")):  # a server: its own page
            return f"View the runs: {mask_url(self.uri).rstrip('/')}/{page}"
        return f"View the runs: mlflow ui --backend-store-uri {mask_url(self.uri)} then open http://127.0.0.1:5000/{page}"


class ChildRun:
    """One training's run (`with tracking.child(name, params) as run:`): its id, what it logs, and how it ends.
    A `reused` run (it FINISHED before a resume) logs nothing: what it holds stays as it was."""

    def __init__(self, run_id: str, tracking: Tracking, reused: bool = False):
        self.id, self.tracking, self.reused = run_id, tracking, reused
        self.logs = tracking.active and not reused
        self.trainings = 0  # how many trainings ran in this run so far: their states are trained/<k>.pt

    @property
    def tracking_uri(self) -> str:
        return self.tracking.uri

    def __enter__(self) -> "ChildRun":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.reused:
            self.tracking.end_child(self.id, run_status(exc_type))

    def log_metrics(self, metrics: dict, step: int = 0) -> None:
        if self.logs:
            self.tracking.log_metrics(self.id, metrics, step)

    def log_dict(self, data: dict, path: str) -> None:
        if self.logs:
            self.tracking.log_dict(data, path, self.id)

    def log_table(self, data: dict, path: str) -> None:
        if self.logs:
            self.tracking.log_table(data, path, self.id)

    def log_artifact(self, path: str, folder: str | None = None) -> None:
        if self.logs:
            self.tracking.client.log_artifact(self.id, path, folder)

    def log_figure(self, figure, name: str) -> None:
        if self.logs:
            self.tracking.log_figure(figure, name, run_id=self.id)
        else:
            import matplotlib.pyplot as plt

            plt.close(figure)

    def set_tag(self, key: str, value) -> None:
        if self.logs:
            self.tracking.client.set_tag(self.id, key, format_value(value))

    def save_trained(self, index: int, state: dict) -> None:
        """A training's state (plain data: `training.load_plain` reads it) as the artifact trained/<index>.pt."""
        import torch

        if self.logs:
            with tempfile.TemporaryDirectory() as folder:
                path = os.path.join(folder, f"{index}.pt")
                torch.save(state, path)
                self.log_artifact(path, "trained")

    def load_trained(self, index: int) -> dict:
        """The state `save_trained` stored (a file that would run code is refused: `training.UnsafeFile`)."""
        from pipelines.training import load_plain

        with tempfile.TemporaryDirectory() as folder:
            return load_plain(self.tracking.client.download_artifacts(self.id, f"trained/{index}.pt", folder))

    def log_dataset(self, data) -> None:
        """The training data as an MLflow dataset input (the runs table's Dataset column): name, a digest
        of the arrays, the corruption; one entry per split, the split as its context."""
        if not self.logs:
            return
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
