"""The reading group: nested runs, the report with computed verdicts, reuse on a second run, the report command."""
from __future__ import annotations

import base64
import copy
import json
import re

import pytest
from mlflow.tracking import MlflowClient

from pipelines import reading_group, report
from pipelines.__main__ import main
from pipelines.report import Evidence
from pipelines.verdicts import BY_PIPELINE, PAPERS, verdict

# Two pipelines at tiny budgets: seconds, yet every verdict is computed from what they measured.
SMALL = ["--only", "xor,description_length", "--xor", "ks=2,4 seeds=1 large_k=4 max_epochs=2 passes_per_epoch=10",
         "--description_length", "examples=60 chunks=0.2,1.0 labels=true max_epochs=2", "--system_metrics", "false"]
PNG = b"\x89PNG\r\n\x1a\n"


def _runs(client: MlflowClient, experiment: str) -> list:
    return client.search_runs([client.get_experiment_by_name(experiment).experiment_id])


def _text(client: MlflowClient, run_id: str, path: str, folder) -> str:
    return open(client.download_artifacts(run_id, path, str(folder))).read()


def test_nested_runs_a_computed_report_and_nothing_trained_twice(tracking_uri, tmp_path, capsys):
    flags = ["reading_group", "--tracking_uri", tracking_uri, "--experiment_name", "rg", *SMALL]
    assert main(flags) == 0
    assert "[reading group 2/2] description_length: running" in capsys.readouterr().out
    client = MlflowClient(tracking_uri)
    runs = _runs(client, "rg")
    (group,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert group.data.tags["pipeline"] == "reading_group" and group.info.run_name == "reading_group"
    parents = {r.data.tags["pipeline"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == group.info.run_id}
    assert set(parents) == {"xor", "description_length"}  # each pipeline's parent, nested under the group's
    trainings = [r for r in runs if r.data.tags.get("mlflow.parentRunId") in {p.info.run_id for p in parents.values()}]
    assert len(trainings) == 3 + 1  # xor: k=2, k=4, k=2 from k=4's clusters; one chunk coded
    for parent in parents.values():  # summary.json and figures stay on the pipeline's own run
        assert {"summary.json", "figures"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}

    # The report: nine rows at the top, verdicts computed from each run's summary, the figures embedded.
    md = _text(client, group.info.run_id, "report.md", tmp_path / "a")
    xor = json.loads(_text(client, parents["xor"].info.run_id, "summary.json", tmp_path / "b"))
    table = md.split("\n## ")[0]
    assert len(re.findall(r"^\| [1-9] \|", table, re.M)) == 9 and table.count("| not run |") == 7
    expected = BY_PIPELINE["xor"].checks(xor, parents["xor"].data.params)
    assert [c.criterion for c in expected][0] == f"the large net generalizes: k=4 mean test accuracy " \
                                                f"{xor['ks']['4']['test_acc']:.3f} >= 0.99"
    for c in expected:
        assert f"- {c.criterion}: **{c.outcome}**" in md
    assert f"**Verdict: {verdict(expected)}.**" in md
    assert "`python -m pipelines xor --max_epochs 2 --ks 2,4 --seeds 1 --passes_per_epoch 10 --large_k 4`" in md
    page = _text(client, group.info.run_id, "report.html", tmp_path / "c")
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    figures = [a for p in parents.values() for a in client.list_artifacts(p.info.run_id, "figures")]
    assert len(images) == len(figures) == 4 and all(base64.b64decode(i).startswith(PNG) for i in images)
    summary = json.loads(_text(client, group.info.run_id, "summary.json", tmp_path / "d"))
    assert all(f"<td>{p['verdict']}</td>" in page for p in summary["papers"])
    assert [p["pipeline"] for p in summary["papers"]] == ["xor", "description_length"]
    assert group.data.tags["mlflow.note.content"] == reading_group.description(summary)
    assert "| 6 | Brutzkus & Globerson 2019" in group.data.tags["mlflow.note.content"]

    # Again: every pipeline FINISHED with the same parameters is reused, nothing trains.
    assert main(flags) == 0
    assert "xor: reused run" in capsys.readouterr().out
    again = _runs(client, "rg")
    assert len(again) == len(runs) + 1  # one new reading_group run, no pipeline run, no training
    newest = max((r for r in again if r.data.tags["pipeline"] == "reading_group"), key=lambda r: r.info.start_time)
    assert _text(client, newest.info.run_id, "report.md", tmp_path / "e") == md

    # The report command writes the same report from the stored runs, and says which it used.
    assert report.main(["--tracking_uri", tracking_uri, "--experiment_name", "rg", "--output_dir", "out"]) == 0
    out = capsys.readouterr().out
    assert all(f"used {name} run {p.info.run_id}" in out for name, p in parents.items())
    assert (tmp_path / "out" / "report.md").read_text() == md
    assert (tmp_path / "out" / "figures" / "xor" / "fig14_filters.png").read_bytes().startswith(PNG)
    assert report.main(["--tracking_uri", tracking_uri, "--run_id", group.info.run_id, "--output_dir", "by_id"]) == 0
    assert (tmp_path / "by_id" / "report.md").read_text() == md


def test_under_mlflow_run_the_group_is_mlflow_runs_run_and_the_pipelines_nest_under_it(tracking_uri, monkeypatch):
    client = MlflowClient(tracking_uri)
    group = client.create_run(client.create_experiment("rg"))
    monkeypatch.setenv("MLFLOW_RUN_ID", group.info.run_id)
    assert main(["reading_group", "--tracking_uri", tracking_uri, "--only", "description_length", *SMALL[4:]]) == 0
    runs = _runs(client, "rg")
    assert [r.info.run_id for r in runs if "mlflow.parentRunId" not in r.data.tags] == [group.info.run_id]
    (pipeline,) = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == group.info.run_id]
    assert pipeline.data.tags["pipeline"] == "description_length" and pipeline.info.run_id != group.info.run_id


# The README's numbers (docs/*.md, default commands) as summaries: the verdict each gives, and a change
# of the headline's number that must turn it into "does not hold".
README = {
    "randomization": ({"conditions": {"true_labels": {"train_acc": 1.0, "test_acc": 0.937, "steps_to_fit": 1024},
                                      "random_labels": {"train_acc": 1.0, "test_acc": 0.117, "steps_to_fit": 2688}},
                       "label_noise": {"0.2": {"train_acc": 1.0, "test_acc": 0.859, "steps_to_fit": 2944}}},
                      "holds", ("conditions", "random_labels", "train_acc"), 0.6),
    "memorization": ({"epochs_to_fit": {"randY": {"0": 9, "0.2": 40, "0.4": 47, "0.6": 52, "0.8": 43},
                                        "randX": {"0": 9, "0.2": 8, "0.4": 8}},
                      "learned_first_epoch_share": {"randY": {"0": {"clean": 0.8, "noisy": None},
                                                              "0.2": {"clean": 0.77, "noisy": 0.008},
                                                              "0.8": {"clean": 0.18, "noisy": 0.007}}}},
                     "holds with departures", ("learned_first_epoch_share", "randY", "0.2", "noisy"), 0.5),
    "layer_robustness": ({"baseline_error": 0.071, "reinit": {"fc1": {"0": 0.361, "30": 0.071}, "fc2": {"0": 0.074},
                                                              "fc3": {"0": 0.086}, "fc4": {"0": 0.094}},
                          "rerandomize": {"fc1": 0.917, "fc2": 0.857, "fc3": 0.91, "fc4": 0.893}},
                         "holds with departures", ("reinit", "fc1", "0"), 0.08),
    "intrinsic_dim": ({"d_int90": 596, "d_int90_is": "measured", "D": 199210, "baseline_acc": 0.96,
                       "seeds": [{"seed": 0, "d_int90": 488, "d_int90_is": "measured"}]},
                      "holds", ("d_int90",), 4000),
    "bn_smoothness": ({"runs": {f"{v}@0.02": {"loss_range_mean": lr, "grad_change_mean": g, "final_test_acc": a,
                                              "died": False}
                                for v, lr, g, a in (("none", 0.29, 3.1, 0.956), ("bn", 0.039, 0.62, 0.994),
                                                    ("noisy_bn", 0.22, 2.8, 0.875))}},
                      "holds with departures", ("runs", "bn@0.02", "loss_range_mean"), 0.5),
    "xor": ({"ks": {"2": {"test_acc": 0.895}, "4": {"test_acc": 1.0}, "100": {"test_acc": 0.998}},
             "clustering_init": {"random_init_test_acc": 0.895, "clustered_init_test_acc": 1.0}},
            "holds", ("ks", "100", "test_acc"), 0.9),
    "double_descent": ({"rff": {"sizes": [250, 1000, 10000], "test_risk": [0.44, 2408, 0.26], "threshold": 1000},
                        "nn": {"sizes": [2395, 10030, 100300], "test_risk": [0.85, 0.38, 0.29], "threshold": 10000},
                        "forest": {"sizes": [5, 54, 271, 5420], "test_risk": [0.9, 0.63, 0.84, 0.29], "threshold": 271}},
                       "holds with departures", ("rff", "test_risk"), [0.44, 0.3, 0.26]),
    "lottery_ticket": ({"dense": {"early_stop_iter": 500, "test_acc_at_early_stop": 0.944},
                        "rounds": [{"weights_remaining": w, "winning": {"early_stop_iter": 400, "test_acc_at_early_stop": t},
                                    "random_reinit": {"early_stop_iter": i, "test_acc_at_early_stop": r}}
                                   for w, t, i, r in ((80.0, 0.932, 350, 0.933), (21.1, 0.94, 750, 0.937),
                                                      (4.5, 0.939, 1000, 0.924))]},
                       "holds", ("rounds", 2, "random_reinit", "early_stop_iter"), 300),
    "description_length": ({"true": {"prequential_bits": 543.3, "uniform_bits": 4773.6, "ratio": 0.114},
                            "random": {"prequential_bits": 4889.0, "uniform_bits": 4773.6, "ratio": 1.024}},
                           "holds", ("true", "ratio"), 0.9),
}


def _set(tree, path, value):
    tree = copy.deepcopy(tree)
    node = tree
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return tree


def _markdown(pipeline: str, summary: dict, params: dict | None = None) -> str:
    e = Evidence(pipeline, "run0", pipeline, 0, 61.0, params or {"noise_scale": "1.0"}, summary, {"fig": PNG})
    return report.markdown(report.blocks([e]))


@pytest.mark.parametrize("pipeline", [p.pipeline for p in PAPERS])
def test_the_readme_numbers_give_the_readme_verdicts_and_a_failed_claim_reads_does_not_hold(pipeline):
    summary, expected, path, failing = README[pipeline]
    paper = BY_PIPELINE[pipeline]
    checks = paper.checks(summary, {"noise_scale": "1.0"})
    assert verdict(checks) == expected, [c.criterion + ": " + c.outcome for c in checks]
    md = _markdown(pipeline, summary)
    assert f"**Verdict: {expected}.**" in md and f"| {expected} | 1 min 01 s |" in md
    assert paper.rows(summary, {"noise_scale": "1.0"})  # the paper's numbers beside ours
    broken = _set(summary, path, failing)
    first = paper.checks(broken, {"noise_scale": "1.0"})[0]
    assert first.holds is False and verdict(paper.checks(broken, {"noise_scale": "1.0"})) == "does not hold"
    assert f"- {first.criterion}: **does not hold**" in _markdown(pipeline, broken)
    assert "**Verdict: does not hold.**" in _markdown(pipeline, broken)


def test_a_criterion_states_its_numbers_and_a_departure_names_what_differs():
    md = _markdown("randomization", _set(README["randomization"][0], ("conditions", "random_labels", "train_acc"), 0.6))
    assert "- random labels are fit: training accuracy 0.600 >= 0.99: **does not hold**" in md
    bn = _markdown("bn_smoothness", README["bn_smoothness"][0])
    assert ("- noisy BN (noise scale 1.0) trains like BN: final test accuracy of BN vs noisy BN within 0.02 at every "
            "lr: lr 0.02: 0.994 vs 0.875: **does not hold**") in bn
    assert "**Verdict: holds with departures.**" in bn


def test_what_a_run_did_not_measure_is_not_a_pass():
    only_true = {"conditions": {"true_labels": {"train_acc": 1.0, "test_acc": 0.94, "steps_to_fit": 1024}}}
    checks = BY_PIPELINE["randomization"].checks(only_true, {})
    assert [c.holds for c in checks] == [None, None, None] and verdict(checks) == "not measured"
    assert "not in this run's summary" in checks[0].criterion


def test_the_note_fits_mlflows_description_and_keeps_every_failed_check():
    papers = [{"pipeline": p.pipeline, "paper": f"{p.cite}: {p.title}", "verdict": "holds with departures",
               "wall_s": 60.0, "checks": [{"criterion": "x" * 800, "outcome": "holds"},
                                          {"criterion": f"{p.pipeline} check", "outcome": "does not hold"}]}
              for p in PAPERS]
    text = report.note(papers)
    assert len(text) <= report.NOTE_LIMIT and "x" * 800 not in text
    assert all(f"{p.pipeline} check: does not hold" in text for p in PAPERS)


@pytest.mark.parametrize("flags, flag", [
    (("--xor", "seeds=0"), "--xor: --seeds"),
    (("--xor", "bogus=1"), "--xor"),
    (("--xor", "seeds"), "--xor"),
    (("--xor", "tracking_uri=x.db"), "--xor"),
    (("--max_epochs", "5"), "--max_epochs"),
    (("--only", "xor", "--skip", "xor"), "--skip"),
    (("--only", "alexnet"), "--only"),
])
def test_bad_flags_are_refused_before_any_run(refused, flags, flag):
    assert flag in refused("reading_group", *flags)


def test_the_report_command_refuses_bad_input_and_writes_nothing(tmp_path, capsys):
    for argv, flag in (([], "--experiment_name"), (["--experiment_name", "rg"], "--tracking_uri")):
        assert report.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and flag in err
    assert not list(tmp_path.iterdir())
