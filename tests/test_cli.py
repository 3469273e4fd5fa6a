"""The command line and tracking contract: flags vs MLproject, bad input, runs in MLflow, DDP."""
from __future__ import annotations

import dataclasses
import shlex

import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipelines import NAMES, load
from pipelines.__main__ import main
from pipelines.mlproject import render
from pipelines.params import defaults, format_value, parse
from pipelines.tracking import command, describe, generic_headline

REPO = __import__("pathlib").Path(__file__).resolve().parent.parent


def test_mlproject_is_generated_from_the_parameter_dataclasses():
    assert (REPO / "MLproject").read_text() == render(), "run `python -m pipelines.mlproject`"
    entry_points = yaml.safe_load((REPO / "MLproject").read_text())["entry_points"]
    assert list(entry_points) == list(NAMES)
    for name in NAMES:
        declared = {k: str(v["default"]) for k, v in entry_points[name]["parameters"].items()}
        assert declared == defaults(load(name).Params)
        for flag in declared:
            assert f"--{flag} {{{flag}}}" in entry_points[name]["command"]


@pytest.mark.parametrize("name", NAMES)
def test_flags_round_trip_through_their_defaults(name):
    params_cls = load(name).Params
    argv = [token for key, value in defaults(params_cls).items() for token in (f"--{key}", value)]
    assert dataclasses.asdict(parse(params_cls, argv, name)) == dataclasses.asdict(params_cls())


def test_mlflow_style_booleans_and_lists_parse():
    params = parse(load("randomization").Params, ["--augment", "True", "--label_noise", "0, 0.5,1"], "r")
    assert params.augment is True and params.label_noise == (0.0, 0.5, 1.0)


def test_unknown_pipeline_exits_2(capsys):
    assert main(["no_such_pipeline"]) == 2
    assert "unknown pipeline" in capsys.readouterr().err


def test_randomization_reproduces_zhang_et_al_on_digits(run_pipeline):
    """Every condition is fit, random labels test at chance and take longer to fit than true labels."""
    result = run_pipeline("randomization", "--dataset", "digits", "--lr", "0.05", "--max_epochs", "500",
                          "--label_noise", "0,0.5,1")
    assert result.exit_code == 0
    summary = result.summary()
    conditions = summary["conditions"]
    assert set(conditions) == {"true_labels", "random_labels", "shuffled_pixels", "random_pixels", "gaussian"}
    for name, row in conditions.items():
        assert row["train_acc"] >= 0.99 and row["steps_to_fit"] is not None, name
    assert conditions["true_labels"]["test_acc"] > 0.9
    assert conditions["random_labels"]["test_acc"] < 0.2  # chance is 0.1
    assert conditions["random_labels"]["steps_to_fit"] > 2 * conditions["true_labels"]["steps_to_fit"]
    noise = summary["label_noise"]
    assert noise["0"] == conditions["true_labels"] and noise["1"] == conditions["random_labels"]
    assert noise["0"]["test_acc"] > noise["0.5"]["test_acc"] > noise["1"]["test_acc"]

    # One parent tagged with the pipeline, one child per distinct training (p=0 and p=1 reuse conditions).
    assert result.parent.data.tags["pipeline"] == "randomization" and result.parent.info.status == "FINISHED"
    assert len(result.children) == 6
    assert all(child.info.status == "FINISHED" for child in result.children)
    random_child = next(c for c in result.children if c.data.params["corruption"] == "random_labels")
    assert random_child.data.metrics["steps_to_fit"] == conditions["random_labels"]["steps_to_fit"]
    history = result.client.get_metric_history(random_child.info.run_id, "train_loss")
    assert len(history) > 10 and history[-1].value < history[0].value
    assert {"figures/fig1a_training_loss.png", "figures/fig1b_steps_to_fit.png", "figures/fig1c_test_error.png",
            "summary.json"} <= set(result.artifact_paths())


def test_under_mlflow_run_logs_into_its_run_without_relogging_params(run_pipeline, tracking_uri, monkeypatch):
    """`mlflow run` creates the parent and logs every -P value as a string first (here '1e-2' for lr)."""
    client = MlflowClient(tracking_uri)
    experiment_id = client.create_experiment("test-randomization")
    parent = client.create_run(experiment_id)
    client.log_param(parent.info.run_id, "lr", "1e-2")
    monkeypatch.setenv("MLFLOW_RUN_ID", parent.info.run_id)
    result = run_pipeline("randomization", "--dataset", "digits", "--conditions", "true_labels",
                          "--label_noise", "", "--max_epochs", "2", "--lr", "1e-2", "--system_metrics", "false")
    assert result.exit_code == 0
    assert result.parent.info.run_id == parent.info.run_id and len(result.parents) == 1
    assert result.parent.data.params["lr"] == "1e-2" and result.parent.data.tags["pipeline"] == "randomization"
    assert len(result.children) == 1 and "summary.json" in result.artifact_paths()
    # MLflow's random run name gives way to what the run measures; --system_metrics false samples nothing.
    assert parent.info.run_name != "randomization fc digits" == result.parent.info.run_name
    assert not [key for key in result.parent.data.metrics if key.startswith("system/")]


def test_the_parent_run_is_named_described_and_samples_the_machine(run_pipeline, monkeypatch):
    """Its name and headline come from the pipeline module's RUN_NAME_FIELDS and headline(summary)
    when it has them; its description reproduces the run; CPU and memory are sampled on it alone."""
    from pipelines import randomization

    monkeypatch.setattr(randomization, "RUN_NAME_FIELDS", ("dataset", "conditions"), raising=False)
    monkeypatch.setattr(randomization, "headline", lambda summary: f"{len(summary['conditions'])} condition fit",
                        raising=False)
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    flags = ("--dataset", "digits", "--conditions", "true_labels", "--label_noise", "", "--max_epochs", "2")
    result = run_pipeline("randomization", *flags)
    assert result.exit_code == 0
    experiment = result.client.get_experiment(result.parent.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI opens it on its runs
    assert result.parent.info.run_name == "randomization digits true_labels"

    note = result.parent.data.tags["mlflow.note.content"].splitlines()
    assert note[0] == "**1 condition fit**"
    reproduce = shlex.split(note[note.index("```") + 1])
    assert reproduce[:4] == ["python", "-m", "pipelines", "randomization"]
    assert {"--dataset", "--conditions", "--label_noise", "--max_epochs", "--tracking_uri"} <= set(reproduce)
    assert "--lr" not in reproduce  # defaults are left out
    again = dataclasses.asdict(parse(randomization.Params, reproduce[4:], "r"))  # the same run, flag for flag
    assert {key: format_value(value) for key, value in again.items()} == result.parent.data.params

    system = {key for key in result.parent.data.metrics if key.startswith("system/")}
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= system
    assert not [key for key in result.children[0].data.metrics if key.startswith("system/")]


def test_the_description_without_a_headline_hook():
    summary = {"d_int90": 591.25, "D": 199210, "note": "a|b", "seeds": [1, 2], "per_seed": {"0": 1.0}}
    assert generic_headline("intrinsic_dim fc mnist5k", summary) == "intrinsic_dim fc mnist5k: d_int90 = 591.2, D = 199,210"
    assert generic_headline("xor", {"k": {"2": 0.5}}) == "xor: finished"
    text = describe("headline", summary, "python -m pipelines xor")
    assert "| d_int90 | 591.2 |" in text and "| D | 199,210 |" in text and "| note | a\\|b |" in text
    assert "seeds" not in text and "per_seed" not in text  # only scalars make the table
    params = parse(load("xor").Params, ["--tracking_uri", "http://alice:s3cret@h:5000", "--ks", "2,4"], "xor")
    assert command("xor", params) == "python -m pipelines xor --tracking_uri 'http://alice:***@h:5000' --ks 2,4"


def test_a_failing_pipeline_marks_its_runs_failed_and_keeps_what_was_logged(run_pipeline, tracking_uri, monkeypatch):
    from pipelines import randomization

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(randomization, "train_one", broken)
    with pytest.raises(RuntimeError, match="disk on fire"):
        run_pipeline("randomization", "--dataset", "digits", "--conditions", "true_labels", "--label_noise", "")
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("test-randomization").experiment_id])
    assert {r.info.status for r in runs} == {"FAILED"} and len(runs) == 2
    assert all(r.data.params["seed"] == "0" for r in runs)


def test_ddp_on_two_cpu_processes_runs_the_orchestration_once(run_pipeline):
    result = run_pipeline("randomization", "--dataset", "digits", "--conditions", "true_labels,gaussian",
                          "--label_noise", "", "--max_epochs", "2", "--devices", "2", "--strategy", "ddp")
    assert result.exit_code == 0
    assert len(result.parents) == 1 and len(result.children) == 2
    assert set(result.summary()["conditions"]) == {"true_labels", "gaussian"}
    for child in result.children:  # rank 0 alone logged: one value per epoch, not one per rank
        steps = [m.step for m in result.client.get_metric_history(child.info.run_id, "train_loss")]
        assert len(steps) == 2 and steps[0] < steps[1]


def test_help_text_may_hold_a_percent_sign(capsys):
    """argparse formats help strings with %: a literal % (e.g. '10% of the weights') must not crash --help."""
    from dataclasses import dataclass

    from pipelines.params import CommonParams, param

    @dataclass
    class Params(CommonParams):
        rate: float = param(0.1, "prune 10% of the weights per round")

    with pytest.raises(SystemExit) as exit_:
        parse(Params, ["--help"], "p")
    assert exit_.value.code == 0 and "prune 10% of the weights" in capsys.readouterr().out


def test_sigterm_ends_the_open_runs_killed_and_exits_130(tracking_uri):
    """A scheduler's SIGTERM mid-pipeline: the training's child run and the parent end KILLED (nothing
    left RUNNING), the process says so in one line and exits 130."""
    import signal
    import subprocess
    import sys
    import time

    from mlflow.tracking import MlflowClient

    process = subprocess.Popen([sys.executable, "-m", "pipelines", "xor", "--ks", "2", "--seeds", "200",
                                "--clustering_init", "false", "--system_metrics", "false",
                                "--tracking_uri", tracking_uri], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in process.stdout:  # the first training finished; wait until the second one's run is open
        if line.startswith("[1/"):
            break
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("xor").experiment_id
    while not client.search_runs([experiment], "attributes.run_name = 'k=2 seed=1'"):
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130 and "Traceback" not in err
    assert err.strip().splitlines()[-1].endswith(
        "interrupted; the open runs are marked KILLED; run the same command again to resume")
    runs = client.search_runs([experiment])
    statuses = {run.info.run_name: run.info.status for run in runs}
    assert "RUNNING" not in statuses.values() and list(statuses.values()).count("KILLED") == 2, statuses
    assert statuses["k=2 seed=0"] == "FINISHED"
