"""No password or token of a tracking or storage URL is printed, logged to MLflow or written to a file;
the URL, password included, still connects. Against a real `mlflow server` on 127.0.0.1."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from mlflow.tracking import MlflowClient

from pipelines.__main__ import main
from pipelines.redact import mask_url

SECRET = "s3cret"
TINY_BISECTION = ("--dataset", "digits", "--widths", "16", "--max_epochs", "1", "--d_min", "30", "--d_max", "100",
                  "--resolution", "1", "--seeds", "1", "--reference", "1")  # one trial, d = 55, one epoch


@pytest.mark.parametrize("url, shown", [
    ("postgresql://alice:s3cret@db:5432/optuna", "postgresql://alice:***@db:5432/optuna"),
    ("http://alice:s3cret@127.0.0.1:5000", "http://alice:***@127.0.0.1:5000"),
    ("https://host/mlflow?access_token=s3cret&x=1", "https://host/mlflow?access_token=***&x=1"),
    ("mysql://u@h/db?ssl_key=s3cret&sslpassword=s3cret", "mysql://u@h/db?ssl_key=***&sslpassword=***"),
    ("http://alice:s3@cret@h/x", "http://alice:***@h/x"),  # an unescaped @: HTTP clients split at the last one
    ("sqlite:///mlflow.db", "sqlite:///mlflow.db"),  # nothing to hide: left exactly as written
    ("runs/study.journal", "runs/study.journal"),
    ("200,200", "200,200"),
])
def test_mask_url_hides_passwords_and_secret_query_values(url, shown):
    assert mask_url(url) == shown


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    """A local `mlflow server` (SQLite backend, artifacts under tmp_path/server), stopped afterwards.
    Without its auth app it accepts any basic-auth credentials: the password in the URL goes unchecked."""
    folder, port = tmp_path / "server", free_port()
    folder.mkdir()
    command = [os.path.join(os.path.dirname(sys.executable), "mlflow"), "server", "--host", "127.0.0.1",
               "--port", str(port), "--workers", "1", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
               "--artifacts-destination", str(folder / "artifacts")]
    with open(folder / "server.log", "w") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                  env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})  # half the start-up
    try:
        deadline = time.monotonic() + 300  # its database set-up and imports take a while on a busy machine
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, (folder / "server.log").read_text()
                time.sleep(0.3)
        yield port
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and the workers it started, by its process group
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def files_holding(folder, secret: str) -> list[str]:
    return [str(path) for path in folder.rglob("*") if path.is_file() and secret.encode() in path.read_bytes()]


def test_a_run_against_password_urls_shows_the_password_nowhere(mlflow_server, tmp_path, capfd):
    """The password of --tracking_uri and the token of --storage are used, never printed nor stored:
    not on stdout or stderr, nor in the server's database (parameters, tags, the run description),
    its artifacts (summary.json, tables, figures), the Optuna study."""
    tracking_uri = f"http://alice:{SECRET}@127.0.0.1:{mlflow_server}"
    storage = f"sqlite:///file:{tmp_path / 'optuna.db'}?mode=rwc&password={SECRET}&uri=true"  # SQLite ignores it
    code = main(["intrinsic_dim", *TINY_BISECTION, "--tracking_uri", tracking_uri, "--storage", storage,
                 "--experiment_name", "secrets"])
    out, err = capfd.readouterr()
    assert code == 0, err
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("secrets").experiment_id])
    assert len(runs) == 2  # the parent and its one trial, both through the password URL
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    assert parent.data.params["tracking_uri"] == f"http://alice:***@127.0.0.1:{mlflow_server}"
    assert parent.data.params["storage"].endswith("password=***&uri=true")
    assert "--tracking_uri 'http://alice:***@127.0.0.1" in parent.data.tags["mlflow.note.content"]
    assert f"alice:***@127.0.0.1:{mlflow_server}/#/experiments/" in out  # the one link printed, masked
    assert SECRET not in out and SECRET not in err
    assert files_holding(tmp_path, SECRET) == []  # server database, artifacts, optuna.db, server log


@pytest.mark.parametrize("name, flags", [
    ("intrinsic_dim", ("--storage", f"postgresql://alice:{SECRET}@127.0.0.1:1/none")),
    ("xor", ("--tracking_uri", f"http://alice:{SECRET}@127.0.0.1:{free_port()}")),  # nothing listens there
])
def test_a_refused_password_url_is_named_masked(refused, name, flags):
    error = refused(name, *flags)
    assert flags[0] in error and "alice:***@127.0.0.1" in error and SECRET not in error
