"""The reading group in one command: the nine papers' pipelines, then one report.

    mlflow run . -e reading_group --env-manager local
    python -m pipelines reading_group                                  (the same without `mlflow run`)
    python -m pipelines reading_group --only xor,description_length --xor "seeds=2 ks=2,50"
    python -m pipelines report --experiment_name reading_group         (the report again, from the stored runs)

One `reading_group` parent run; each pipeline's own parent run is nested under it (its trainings under
that, its summary.json and figures on it, as when it runs alone). Each pipeline runs at its own
defaults, the budgets the README's numbers come from (15 minutes for the nine on the 2-core machine),
unless its field gives other flags: `name=value` pairs separated by spaces, as `mlflow run`
passes them (`-P xor="seeds=2"`; a field per pipeline because `-P` cannot carry a dotted
`--xor.seeds`). The hardware and tracking flags of the reading group apply to every pipeline, and so
does `--seed` unless a pipeline's field sets its own.

Running the same command again reuses every pipeline whose parent run FINISHED with the same
parameters in the experiment (tag `params_digest`): nothing is trained again, and a pipeline cut off
half way is continued by the generic resume (`--resume false`: everything afresh). The report
(report.md, report.html with the figures embedded, figures/) goes on the reading group's run, and the
markdown of its verdicts becomes the run's description: `pipelines.report`.
"""
from __future__ import annotations

import dataclasses
import shlex
import time
from dataclasses import dataclass

from pipelines import load, report
from pipelines.distributed import is_rank_zero, on_rank_zero
from pipelines.params import CommonParams, UsageError, format_value, param, parse, require
from pipelines.tracking import Tracking, params_digest
from pipelines.verdicts import PAPERS

RUN_NAME_FIELDS = ()  # the parent run is named `reading_group`
PIPELINES = tuple(paper.pipeline for paper in PAPERS)  # the notes' order
# Where results go and what runs them: the reading group's own flags, the same for every pipeline.
SHARED = ("accelerator", "devices", "strategy", "num_nodes", "precision", "tracking_uri", "resume", "system_metrics",
          "data_dir", "download")
# Each pipeline has its own defaults for these: set them per pipeline, never for all at once.
PER_PIPELINE = ("dataset", "max_epochs", "batch_size", "lr", "optimizer")
# Seconds each pipeline took at its defaults in one run on the 2-core machine, lightly loaded by other work
# (docs/reading_group.md): the estimate of the time left, scaled by this machine's pace so far.
EXPECTED_S = {"randomization": 65, "memorization": 310, "layer_robustness": 15, "intrinsic_dim": 165,
              "bn_smoothness": 30, "xor": 10, "double_descent": 55, "lottery_ticket": 100, "description_length": 120}


def _flags(name: str) -> str:
    return param("", f"flags of the {name} pipeline as `name=value` pairs separated by spaces, e.g. "
                     f"\"seed=1 max_epochs=10\" (empty: its defaults, the budget the README's numbers come from)")


@dataclass
class Params(CommonParams):
    """The reading group: the nine papers' pipelines in one run, and one report with a computed verdict per paper."""

    only: tuple[str, ...] = param((), "run only these pipelines (empty: all nine)", choices=PIPELINES)
    skip: tuple[str, ...] = param((), "pipelines to leave out", choices=PIPELINES)
    randomization: str = _flags("randomization")
    memorization: str = _flags("memorization")
    layer_robustness: str = _flags("layer_robustness")
    intrinsic_dim: str = _flags("intrinsic_dim")
    bn_smoothness: str = _flags("bn_smoothness")
    xor: str = _flags("xor")
    double_descent: str = _flags("double_descent")
    lottery_ticket: str = _flags("lottery_ticket")
    description_length: str = _flags("description_length")

    def validate(self) -> None:
        super().validate()
        common = CommonParams()
        for name in PER_PIPELINE:
            require(getattr(self, name) == getattr(common, name), name,
                    f"each pipeline has its own; set it per pipeline, e.g. --xor \"{name}=...\"")
        require(bool(self.pipelines()), "skip", "nothing to run: every pipeline is skipped")
        self.plan()

    def pipelines(self) -> list[str]:
        return [name for name in (self.only or PIPELINES) if name not in self.skip]

    def plan(self) -> list[tuple[str, CommonParams]]:
        """(name, its parameters) of every pipeline to run, in the notes' order (parsed once)."""
        if getattr(self, "_plan", None) is None:
            self._plan = [(name, self.pipeline_params(name)) for name in self.pipelines()]
        return self._plan

    def pipeline_params(self, name: str):
        """The pipeline's parameters: the reading group's shared flags and seed, then its field's flags."""
        try:
            pairs = [token.partition("=") for token in shlex.split(getattr(self, name))]
        except ValueError as error:  # an unclosed quote
            raise UsageError(name, str(error)) from None
        cls, argv = load(name).Params, ["--seed", str(self.seed)]
        fields = {f.name for f in dataclasses.fields(cls)}
        for key, equals, value in pairs:
            require(bool(equals) and key in fields, name, f"{key!r} is not a `name=value` flag of {name}")
            require(key not in SHARED, name, f"--{key} is set for every pipeline by the reading group's --{key}")
            argv += [f"--{key}", value]
        argv += [token for key in SHARED if key in fields for token in (f"--{key}", format_value(getattr(self, key)))]
        try:
            return parse(cls, argv, prog=f"--{name}")
        except UsageError as error:
            raise UsageError(name, str(error)) from None

    def preflight(self) -> None:
        super().preflight()
        for _, params in self.plan():
            params.preflight()


def run(params: Params, tracking) -> dict:
    """Runs (or reuses) each pipeline nested under the reading group's run, then writes the report on it."""
    experiment = on_rank_zero(lambda: tracking.client.get_experiment(tracking.experiment_id).name)
    plan = [(name, dataclasses.replace(p, experiment_name=experiment)) for name, p in params.plan()]
    reused = {name: on_rank_zero(report.finished_run, tracking.client, tracking.experiment_id, name,
                                 params_digest(name, p)) if params.resume else None for name, p in plan}
    progress = Progress([name for name, _ in plan if not reused[name]])
    run_ids = {}
    for index, (name, p) in enumerate(plan, start=1):
        if reused[name]:
            run_ids[name] = reused[name]
            say(f"[reading group {index}/{len(plan)}] {name}: reused run {reused[name]} (FINISHED, same parameters): "
                f"nothing trained")
            continue
        say(f"[reading group {index}/{len(plan)}] {name}: running, {progress.line(name)}")
        started, cpu = time.monotonic(), time.process_time()
        with Tracking(name, p, nested_in=tracking.parent_id) as nested:
            summary = load(name).run(p, nested)
            nested.log_summary(summary)
        run_ids[name] = nested.parent_id
        progress.done(name, time.monotonic() - started)
        # CPU time beside wall time: on a shared machine it tells the load from the work
        say(f"[reading group {index}/{len(plan)}] {name}: done in {clock(time.monotonic() - started)} "
            f"({clock(time.process_time() - cpu)} of CPU); {progress.line()}")
    evidence = on_rank_zero(lambda: [report.evidence(tracking.client, run_ids[name]) for name, _ in plan])
    if is_rank_zero():
        report.publish(tracking.client, tracking.parent_id, evidence)
    return {"papers": report.assess(evidence), "trained": [n for n, _ in plan if not reused[n]],
            "reused": {n: run_id for n, run_id in reused.items() if run_id}}


def headline(summary: dict) -> str:
    counts = {v: sum(p["verdict"] == v for p in summary["papers"]) for v in
              ("holds", "holds with departures", "does not hold", "not measured")}
    return f"{len(summary['papers'])} papers: " + ", ".join(f"{n} {v}" for v, n in counts.items() if n)


def description(summary: dict) -> str:
    """The run's description: the report's verdicts (the figures and tables are in report.html)."""
    return report.note(summary["papers"])


class Progress:
    """Elapsed time and an estimate of what is left: the expected times of the pipelines still to train,
    scaled by how much slower (or faster) than expected this machine has been so far."""

    def __init__(self, to_train: list[str]):
        self.start, self.left = time.monotonic(), list(to_train)
        self.expected_done = self.actual_done = 0.0

    def done(self, name: str, seconds: float) -> None:
        self.left.remove(name)
        self.expected_done += EXPECTED_S[name]
        self.actual_done += seconds

    def line(self, current: str | None = None) -> str:
        pace = self.actual_done / self.expected_done if self.expected_done else 1.0
        left = pace * sum(EXPECTED_S[n] for n in self.left)
        mine = f"about {clock(pace * EXPECTED_S[current])} for it; " if current else ""
        return f"{mine}{clock(time.monotonic() - self.start)} elapsed, about {clock(left)} left"


def clock(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


def say(line: str) -> None:
    if is_rank_zero():
        print(line, flush=True)
