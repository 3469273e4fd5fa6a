"""Where runs are kept, and what a pipeline does when that place fails.

- Several processes opening a new SQLite database at once (three pipelines started together on a
  fresh `sqlite:///mlflow.db`, or on a fresh Optuna `optuna.db`): MLflow and Optuna create and
  migrate the tables on first use, and two processes doing it together break each other's
  migration ("Online migration expected to match one row"). `schema_lock(url)` holds an exclusive
  lock on a file beside the database (`mlflow.db.lock`) while a client opens it: the first creates
  the tables, the others wait and find them made.
- A tracking server that stops answering mid-run does not stop the pipeline. `client(uri)`, the one
  MlflowClient of this process for `uri` (the pipeline's runs and Lightning's `RunLogger` share it),
  keeps every write the server did not take (runs, metrics, parameters, tags, artifacts, dataset
  inputs) in order, in memory and in `./mlflow-unsent/<run id>/` (`journal.jsonl`, one line per
  write; the artifacts' files under `files/`), and sends them once the server answers again: it asks
  again at most every RETRY_S seconds, so the trainings do not wait on it. A run opened meanwhile
  has a temporary id (`unsent-...`) until the server has it. What is still unsent at exit stays in
  that folder, said on stderr, and is sent later with

      python -m pipelines.storage send [FOLDER] [--tracking_uri URI]      (FOLDER: ./mlflow-unsent)

  MLflow's own retries of a request (7, over about 4 minutes) are cut to 2 over a few seconds, and
  its timeout to 30 s, unless MLFLOW_HTTP_REQUEST_MAX_RETRIES, ..._BACKOFF_FACTOR, ..._TIMEOUT are set.
- An artifact location or SQLite database that cannot be written (full, read-only, not a directory):
  `StorageError`, one line naming the path. A local artifact location is checked before each run is
  created, so a wrong one is said before any training.
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import fcntl
import functools
import inspect
import json
import logging
import os
import shutil
import sys
import threading
import time
import uuid

from lightning.pytorch.loggers.logger import Logger
from lightning.pytorch.utilities import rank_zero_only
from mlflow.entities import DatasetInput, Metric, Param, Run, RunData, RunInfo, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipelines.redact import mask_url

UNSENT = "mlflow-unsent"
RETRY_S = 60  # while the server is away, a write asks it again at most this often
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
                 "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}  # its links would show the URL's password
TEMPORARY = "unsent-"  # the prefix of the id of a run the server does not have yet


class StorageError(Exception):
    """A place the pipeline writes to (artifact location, database) that cannot be written."""


def sqlite_file(url: str) -> str | None:
    """The database file of an `sqlite:///...` URL (also `sqlite:///file:PATH?...&uri=true`), else None."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:  # a path, such as an Optuna journal file
        return None
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return os.path.abspath(parsed.database.removeprefix("file:").partition("?")[0])


@contextlib.contextmanager
def schema_lock(url: str):
    """Exclusive, across processes, while a client of a SQLite database opens it (and creates its tables)."""
    path = sqlite_file(url)
    if path is None:
        yield
        return
    try:
        handle = open(path + ".lock", "a")
    except OSError as error:
        raise StorageError(f"cannot write {path}.lock, the lock beside the database: {error.strerror}") from None
    with handle:  # closing it releases the lock
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


_clients: dict[str, "Client"] = {}
_clients_lock = threading.Lock()


def client(uri: str) -> "Client":
    """The `Client` of this process for `uri` (made once: writes of all its users stay in one order)."""
    with _clients_lock:
        if uri not in _clients:
            if uri.startswith(("http://", "https://")):
                for name, value in HTTP_DEFAULTS.items():
                    os.environ.setdefault(name, value)
                # MLflow's system-metrics sampler stops when the server does not answer, with a warning that
                # shows the URL, password included; our own line says the server is away
                logging.getLogger("mlflow.system_metrics.system_metrics_monitor").setLevel(logging.ERROR)
            if not _clients:
                atexit.register(_at_exit)
            _clients[uri] = Client(uri)
        return _clients[uri]


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _unreachable(error: BaseException | None) -> bool:
    """Whether `error` (or what it was raised from) says the server did not answer: refused, reset, timed
    out, or failing with 5xx until MLflow's retries ran out. A refusal (4xx) is not."""
    import requests

    while error is not None:
        if isinstance(error, (requests.ConnectionError, requests.Timeout, requests.exceptions.RetryError,
                              ConnectionError, TimeoutError)):
            return True
        error = error.__cause__ or error.__context__
    return False


def _writable(location: str) -> str | None:
    """Why a local artifact location cannot be written (None when it can, or when it is not local)."""
    if "://" in location and not location.startswith("file://") or location.startswith("mlflow-artifacts:"):
        return None
    path = os.path.abspath(location.removeprefix("file://"))
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        return f"{path} is not a directory"
    if not os.access(path, os.W_OK | os.X_OK):
        return f"{path} is not writable"
    return None


def _kept(method):
    """A write of MlflowClient that is kept for later while the server does not answer."""
    signature = inspect.signature(method)

    @functools.wraps(method)
    def write(self, *args, **kwargs):
        if getattr(self._local, "busy", False):  # made by another write (log_dict logs its file with log_artifact)
            return method(self, *args, **kwargs)
        call = signature.bind(self, *args, **kwargs).arguments
        del call["self"]
        with self._own():
            if self.unsent and not self._send_unsent():  # still away: after what waits, in order
                return self._keep(method.__name__, call)
            call = self._mapped(call)
            try:
                if method.__name__ == "create_run":  # a wrong artifact location is said before any training
                    self._check_artifact_location(call["experiment_id"])
                return method(self, **call)
            except Exception as error:
                if not (self.remote and _unreachable(error)):
                    raise self._storage_error(error, call.get("run_id")) or error
                return self._keep(method.__name__, call, error)

    return write


class Client(MlflowClient):
    """An MlflowClient whose writes wait, in order, while the tracking server does not answer, and whose
    writes to a place that cannot take them raise `StorageError`."""

    def __init__(self, uri: str):
        with schema_lock(uri):
            super().__init__(tracking_uri=uri)
        # MLflow logs each database error with its traceback, then raises it: what is raised is said once
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
        self.uri, self.remote = uri, uri.startswith(("http://", "https://"))
        self.unsent: list[dict] = []  # the writes the server did not take yet, oldest first
        self.ids: dict[str, str] = {}  # temporary run id -> the server's
        self.folder: str | None = None  # where `unsent` is kept on disk
        self.next_try = 0.0
        self._checked: set[str] = set()  # experiments whose artifact location was found writable
        self._lock, self._local = threading.RLock(), threading.local()  # also the heartbeat and system metrics threads write

    @contextlib.contextmanager
    def _own(self):
        with self._lock:
            self._local.busy = True
            try:
                yield
            finally:
                self._local.busy = False

    def create_experiment(self, name: str, artifact_location: str | None = None, tags: dict | None = None) -> str:
        """The new experiment's id, or that of the one another process just created under the same name."""
        try:
            return super().create_experiment(name, artifact_location, tags)
        except MlflowException as error:
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            return self.get_experiment_by_name(name).experiment_id

    create_run = _kept(MlflowClient.create_run)
    log_batch = _kept(MlflowClient.log_batch)
    set_tag = _kept(MlflowClient.set_tag)
    set_terminated = _kept(MlflowClient.set_terminated)
    log_artifact = _kept(MlflowClient.log_artifact)
    log_table = _kept(MlflowClient.log_table)
    log_inputs = _kept(MlflowClient.log_inputs)

    def _mapped(self, call: dict) -> dict:
        """`call` with the server's ids of runs it created from temporary ones."""
        call = dict(call)
        if "run_id" in call:
            call["run_id"] = self.ids.get(call["run_id"], call["run_id"])
        if call.get("tags") and isinstance(call["tags"], dict):
            parent = call["tags"].get("mlflow.parentRunId")
            call["tags"] = {**call["tags"], **({"mlflow.parentRunId": self.ids[parent]} if parent in self.ids else {})}
        return call

    def _check_artifact_location(self, experiment_id: str) -> None:
        if experiment_id in self._checked:
            return
        location = MlflowClient.get_experiment(self, experiment_id).artifact_location
        problem = _writable(location)
        if problem:
            raise StorageError(f"cannot write artifacts to {location}: {problem}")
        self._checked.add(experiment_id)

    def _storage_error(self, error: Exception, run_id: str | None) -> StorageError | None:
        """A disk that cannot take a write (full, read-only, not a directory) as one line naming the path."""
        if isinstance(error, StorageError):
            return error
        if isinstance(error, OSError) and error.errno is not None:  # a file system's refusal (not an HTTP client's)
            path = error.filename2 or error.filename
            if not path:
                try:
                    path = MlflowClient.get_run(self, run_id).info.artifact_uri
                except Exception:  # noqa: BLE001 (the message is what matters here)
                    path = "the artifact location"
            return StorageError(f"cannot write {path}: {error.strerror or error}")
        import sqlite3

        database = sqlite_file(self.uri)
        while database and error is not None:
            reason = str(error.orig) if isinstance(getattr(error, "orig", None), sqlite3.Error) else ""
            if any(s in reason for s in ("disk is full", "readonly database", "unable to open database file", "disk I/O")):
                return StorageError(f"cannot write {database}: {reason}")
            error = error.__cause__ or error.__context__
        return None

    # The outbox

    def _keep(self, name: str, call: dict, error: Exception | None = None):
        """Keeps `call` for later (in memory and on disk); a run created here gets a temporary id."""
        if name == "create_run":
            call = {**call, "run_id": TEMPORARY + uuid.uuid4().hex, "start_time": call.get("start_time") or _now()}
        if name == "set_terminated" and not call.get("end_time"):
            call = {**call, "end_time": _now()}
        if self.folder is None:
            self.folder = os.path.abspath(os.path.join(UNSENT, call["run_id"]))
            os.makedirs(self.folder, exist_ok=True)
            self.next_try = time.monotonic() + RETRY_S
            reason = type(_root(error)).__name__ if error else "not answering"
            say(f"tracking server {mask_url(self.uri)} does not answer ({reason}): the pipeline goes on; what it "
                f"logs waits in {self.folder} until the server answers again")
            self._save([])
        entry = _to_json(name, call, self.folder)
        self.unsent.append(entry)
        with open(os.path.join(self.folder, "journal.jsonl"), "a") as journal:
            journal.write(json.dumps(entry) + "\n")
        if name == "create_run":
            info = RunInfo(call["run_id"], call["experiment_id"], "", "RUNNING", call["start_time"], None, "active",
                           run_name=call.get("run_name"))
            return Run(info, RunData(tags=[RunTag(k, str(v)) for k, v in (call.get("tags") or {}).items()]))
        return None

    def _send_unsent(self, force: bool = False) -> bool:
        """Sends what waits, oldest first; False when the server still does not answer (asked at most
        every RETRY_S seconds unless `force`)."""
        if not force and time.monotonic() < self.next_try:
            return False
        while self.unsent:
            entry = self.unsent[0]
            try:
                _send(self, entry)
            except Exception as error:
                if not _unreachable(error):
                    raise self._storage_error(error, entry.get("run_id")) or error
                self.next_try = time.monotonic() + RETRY_S
                self._save(self.unsent)
                return False
            self.unsent.pop(0)
        say(f"tracking server {mask_url(self.uri)} answers again: what waited in {self.folder} is sent")
        shutil.rmtree(self.folder, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.rmdir(os.path.dirname(self.folder))  # mlflow-unsent/ itself, once nothing else waits there
        self.folder = None
        return True

    def _save(self, entries: list[dict]) -> None:
        """The journal on disk: a header (the server, masked), then `entries` with the ids the server gave."""
        path = os.path.join(self.folder, "journal.jsonl")
        with open(path + ".new", "w") as journal:
            journal.write(json.dumps({"tracking_uri": mask_url(self.uri)}) + "\n")
            for entry in entries:
                journal.write(json.dumps({**entry, **self._mapped({k: entry[k] for k in ("run_id", "tags") if k in entry})})
                              + "\n")
        os.replace(path + ".new", path)


def _now() -> int:
    return int(time.time() * 1000)


def _root(error: BaseException) -> BaseException:
    while error.__cause__ or error.__context__:
        error = error.__cause__ or error.__context__
    return error


def _to_json(name: str, call: dict, folder: str) -> dict:
    """A kept write as one JSON line; the file of an artifact is copied under `folder`/files (its caller
    may delete it), its path kept relative to `folder`."""
    entry = {"call": name, **{k: v for k, v in call.items() if k not in ("synchronous", "models")}}
    if name == "log_batch":
        entry["metrics"] = [[m.key, m.value, m.timestamp, m.step] for m in call.get("metrics", ())]
        entry["params"] = [[p.key, p.value] for p in call.get("params", ())]
        entry["tags"] = [[t.key, t.value] for t in call.get("tags", ())]
    elif name == "set_tag":
        entry["value"] = str(call["value"])
    elif name == "log_artifact":
        spool = os.path.join(folder, "files", uuid.uuid4().hex[:12])  # a folder each: the file keeps its name
        os.makedirs(spool)
        entry["local_path"] = os.path.relpath(shutil.copy(call["local_path"], spool), folder)
    elif name == "log_table":
        import pandas as pd

        entry["data"] = json.loads(pd.DataFrame(call["data"]).to_json(orient="split", index=False))
    elif name == "log_inputs":
        entry["datasets"] = [dataset.to_dictionary() for dataset in call.get("datasets") or ()]
    return entry


def _send(c: Client, entry: dict) -> None:
    """Makes a kept write (its run ids mapped to the server's)."""
    entry = {**entry, **c._mapped({k: entry[k] for k in ("run_id", "tags") if k in entry})}
    name, run_id = entry["call"], entry.get("run_id")
    if name == "create_run":
        run = MlflowClient.create_run(c, entry["experiment_id"], entry["start_time"], entry.get("tags"), entry.get("run_name"))
        c.ids[run_id] = run.info.run_id
    elif name == "log_batch":
        MlflowClient.log_batch(c, run_id, [Metric(*m) for m in entry["metrics"]], [Param(*p) for p in entry["params"]],
                               [RunTag(*t) for t in entry["tags"]])
    elif name == "set_tag":
        MlflowClient.set_tag(c, run_id, entry["key"], entry["value"])
    elif name == "set_terminated":
        MlflowClient.set_terminated(c, run_id, entry.get("status"), entry["end_time"])
    elif name == "log_artifact":
        MlflowClient.log_artifact(c, run_id, os.path.join(c.folder, entry["local_path"]), entry.get("artifact_path"))
    elif name == "log_table":
        import pandas as pd

        MlflowClient.log_table(c, run_id, pd.DataFrame(entry["data"]["data"], columns=entry["data"]["columns"]),
                               entry["artifact_file"])
    elif name == "log_inputs":
        MlflowClient.log_inputs(c, run_id, [DatasetInput.from_dictionary(d) for d in entry["datasets"]])


def _at_exit() -> None:
    """One more try for what waits; what stays is said, with where it is and how to send it."""
    for c in list(_clients.values()):
        with c._own():
            if c.unsent and not c._send_unsent(force=True):
                say(f"{len(c.unsent)} writes to {mask_url(c.uri)} were not sent: they are kept in {c.folder}; "
                    f"`python -m pipelines.storage send` sends them once the server answers")


class RunLogger(Logger):
    """Lightning's metrics into an existing MLflow run, through `client(uri)`: Lightning's MLFlowLogger
    without its run handling (the pipeline's tracking opens and ends every run)."""

    def __init__(self, tracking_uri: str, run_id: str):
        super().__init__()
        self.tracking_uri, self.run_id = tracking_uri, run_id

    @property
    def name(self) -> str:
        return "mlflow"

    @property
    def version(self) -> str:
        return self.run_id

    @rank_zero_only
    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass  # the run has the training's parameters already

    @rank_zero_only
    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        now = _now()
        rows = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        client(self.tracking_uri).log_batch(self.run_id, metrics=rows)


def send(folder: str = UNSENT, tracking_uri: str = "") -> int:
    """Sends every journal under `folder` (oldest first); 0 when all went, 1 when the server still does not answer."""
    if not os.path.isdir(folder):
        say(f"nothing to send: no folder {folder}")
        return 0
    journals = sorted((os.path.join(folder, name, "journal.jsonl") for name in os.listdir(folder)
                       if os.path.exists(os.path.join(folder, name, "journal.jsonl"))), key=os.path.getmtime)
    code = 0
    for path in journals:
        with open(path) as journal:
            header, *entries = [json.loads(line) for line in journal]
        uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or header["tracking_uri"]
        if "***" in uri:
            say(f"{path}: the server's URL has a password: pass it with --tracking_uri")
            return 2
        c = client(uri)
        with c._own():
            c.unsent, c.folder = entries, os.path.abspath(os.path.dirname(path))
            if not c._send_unsent(force=True):
                say(f"{mask_url(uri)} does not answer: {len(c.unsent)} writes are still kept in {c.folder}")
                c.unsent, code = [], 1  # kept on disk; nothing for the exit hook to do
    return code


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m pipelines.storage", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=("send",))
    parser.add_argument("folder", nargs="?", default=UNSENT)
    parser.add_argument("--tracking_uri", default="", help="the server (default: $MLFLOW_TRACKING_URI, else the journal's)")
    arguments = parser.parse_args()
    sys.exit(send(arguments.folder, arguments.tracking_uri))
