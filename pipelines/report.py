"""The reading group's report, from runs stored in MLflow (nothing is trained):

    python -m pipelines report --experiment_name reading_group   (the newest FINISHED parent run of each pipeline)
    python -m pipelines report --run_id <id>                     (a reading_group run: the runs it used; or one
                                                                  pipeline's parent run)

writes report.md, report.html (self-contained: the figures embedded as base64 PNGs) and figures/ into
--output_dir, and prints which runs it used. `python -m pipelines reading_group` writes the same report
on its own run. For each paper, in the notes' order: its claim, the figures its run drew, the paper's
numbers beside ours with the setting and the command that reproduces them, and a verdict computed
from the run's summary.json by `pipelines.verdicts`; a summary table at the top (verdict and wall time
per paper) and the runs used at the end. Runs made elsewhere (full MNIST on a GPU, more seeds) give
the report of their numbers.
"""
from __future__ import annotations

import base64
import datetime
import html as html_lib
import json
import os
import re
import shlex
import sys
import tempfile
from dataclasses import dataclass, field

from mlflow.tracking import MlflowClient

from pipelines import load
from pipelines.params import UsageError, defaults, param, parse, require
from pipelines.tracking import NOT_IN_DIGEST, check_reachable, resolve_tracking_uri
from pipelines.verdicts import BY_PIPELINE, PAPERS, verdict

NOTE_LIMIT = 8000  # MLflow cuts a tag (the run's description) at 8,000 characters


@dataclass
class Evidence:
    """What the report reads of one pipeline's parent run."""

    pipeline: str
    run_id: str
    run_name: str
    ended: int  # ms since the epoch
    wall_s: float
    params: dict[str, str]
    summary: dict
    figures: dict[str, bytes] = field(default_factory=dict)  # name -> PNG


def finished_run(client: MlflowClient, experiment_id: str, pipeline: str, digest: str | None = None) -> str | None:
    """The newest FINISHED parent run of `pipeline` in the experiment (with that `params_digest`, if given).
    Parent runs carry the tag params_digest; the trainings under them do not."""
    digest_filter = f"= '{digest}'" if digest else "LIKE '%'"
    runs = client.search_runs([experiment_id], f"tags.pipeline = '{pipeline}' and attributes.status = 'FINISHED' "
                                               f"and tags.params_digest {digest_filter}",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


def evidence(client: MlflowClient, run_id: str) -> Evidence:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per file: noise here
    run = client.get_run(run_id)
    require(run.data.tags.get("pipeline") in BY_PIPELINE, "run_id", f"run {run_id} is not the parent run of a "
            f"reading-group pipeline ({', '.join(BY_PIPELINE)})")
    with tempfile.TemporaryDirectory() as folder:
        try:
            with open(client.download_artifacts(run_id, "summary.json", folder)) as handle:
                summary = json.load(handle)
        except Exception:  # noqa: BLE001 (MLflow raises several kinds for a missing artifact)
            raise UsageError("run_id", f"run {run_id} has no summary.json: not a FINISHED pipeline run") from None
        figures = {}
        for item in client.list_artifacts(run_id, "figures"):
            if item.path.endswith(".png"):
                with open(client.download_artifacts(run_id, item.path, folder), "rb") as handle:
                    figures[os.path.basename(item.path)[:-4]] = handle.read()
    return Evidence(run.data.tags["pipeline"], run_id, run.info.run_name, run.info.end_time or 0,
                    ((run.info.end_time or run.info.start_time) - run.info.start_time) / 1000, dict(run.data.params),
                    summary, figures)


class _Missing(dict):
    def __missing__(self, key):
        return "?"


def setting(e: Evidence) -> str:
    return BY_PIPELINE[e.pipeline].setting.format_map(_Missing(e.params))


def reproduce(e: Evidence) -> str:
    """The command that reproduces the run: the flags whose stored value differs from the default. (From the
    stored strings, not a Params object: a GPU run's parameters need not validate on this machine.)"""
    default = defaults(load(e.pipeline).Params)
    flags = [f"--{k} {shlex.quote(e.params[k])}" for k in default
             if k in e.params and k not in NOT_IN_DIGEST and e.params[k] != default[k]]
    return " ".join(["python -m pipelines", e.pipeline, *flags])


def assess(evidence: list[Evidence]) -> list[dict]:
    """Per paper run: its verdict, the checks with their outcomes, its run and wall time (the reading group's
    summary.json and description)."""
    out = []
    for e in evidence:
        paper, checks = BY_PIPELINE[e.pipeline], BY_PIPELINE[e.pipeline].checks(e.summary, e.params)
        out.append({"pipeline": e.pipeline, "paper": f"{paper.cite}: {paper.title}", "verdict": verdict(checks),
                    "checks": [{"criterion": c.criterion, "outcome": c.outcome} for c in checks],
                    "run_id": e.run_id, "wall_s": round(e.wall_s, 1)})
    return out


def clock(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


def _date(ms: int) -> str:
    return datetime.datetime.fromtimestamp(ms / 1000, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


INTRO = ("Each paper of the reading group's notes (N. Denis, 2019), in their order: its claim in our words, the "
         "figures our run drew, the paper's numbers beside ours with the setting and the command that reproduces "
         "them, and a verdict computed from the run's `summary.json`. Each check states its criterion with the "
         "numbers compared; the first is the paper's headline claim. **holds**: every check holds; **holds with "
         "departures**: the headline holds and another check does not (each departure is listed); **does not "
         "hold**: the headline fails; **not measured**: the run lacks the numbers (a flag left them out).")


def _summary_table(papers: list[dict]) -> tuple:
    ran = {p["pipeline"]: p for p in papers}
    rows = [[str(i), f"{paper.cite}: {paper.title} (`{paper.pipeline}`)",
             ran[paper.pipeline]["verdict"] if paper.pipeline in ran else "not run",
             clock(ran[paper.pipeline]["wall_s"]) if paper.pipeline in ran else "-"]
            for i, paper in enumerate(PAPERS, start=1)]
    rows.append(["", "total", "", clock(sum(p["wall_s"] for p in papers))])
    return ("table", ["#", "paper", "verdict", "wall time"], rows)


def blocks(evidence: list[Evidence]) -> list[tuple]:
    """The report as blocks: ("h1"|"h2"|"p", text), ("ul", items), ("table", header, rows), ("img", path, png)."""
    papers = assess(evidence)
    out = [("h1", "Why do over-parameterized networks generalize? The reading group, reproduced"), ("p", INTRO),
           _summary_table(papers)]
    for e, assessed in zip(evidence, papers):
        paper = BY_PIPELINE[e.pipeline]
        number = [p.pipeline for p in PAPERS].index(e.pipeline) + 1
        out += [("h2", f"{number}. {paper.cite}: {paper.title}"), ("p", f"**Claim.** {paper.claim}"),
                ("p", f"**Verdict: {assessed['verdict']}.**"),
                ("ul", [f"{c['criterion']}: **{c['outcome']}**" for c in assessed["checks"]])]
        out += [("img", f"figures/{e.pipeline}/{name}.png", png) for name, png in sorted(e.figures.items())]
        command, where = f"`{reproduce(e)}`", setting(e)
        out.append(("table", ["compared", "paper", "ours", "setting", "command"],
                    [[r.what, r.paper, r.ours, where, command] for r in paper.rows(e.summary, e.params)]))
    out += [("h2", "Runs used"), ("table", ["pipeline", "run", "run id", "finished", "wall time"],
                                  [[e.pipeline, e.run_name, f"`{e.run_id}`", _date(e.ended), clock(e.wall_s)]
                                   for e in evidence])]
    return out


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(report: list[tuple]) -> str:
    lines = []
    for kind, *body in report:
        if kind == "h1":
            lines += [f"# {body[0]}", ""]
        elif kind == "h2":
            lines += [f"## {body[0]}", ""]
        elif kind == "p":
            lines += [body[0], ""]
        elif kind == "ul":
            lines += [f"- {item}" for item in body[0]] + [""]
        elif kind == "table":
            header, rows = body
            lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows] + [""]
        elif kind == "img":
            lines += [f"![{os.path.basename(body[0])}]({body[0]})", ""]
    return "\n".join(lines)


def _inline(text: str) -> str:
    """Markdown's `code` and **bold** in HTML (after escaping)."""
    text = re.sub(r"`([^`]*)`", r"<code>\1</code>", html_lib.escape(text, quote=False))
    return re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)


STYLE = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;line-height:1.4}"
         "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top;"
         "text-align:left}code{background:#f4f4f4;font-size:90%}img{max-width:100%;display:block;margin:1em 0}")


def html(report: list[tuple]) -> str:
    """The report as one HTML file: the figures inside it (MLflow's artifact viewer previews it)."""
    parts = ["<!doctype html>", '<html><head><meta charset="utf-8">', f"<style>{STYLE}</style>"]
    for kind, *body in report:
        if kind in ("h1", "h2", "p"):
            if kind == "h1":
                parts.append(f"<title>{html_lib.escape(body[0])}</title></head><body>")
            parts.append(f"<{kind}>{_inline(body[0])}</{kind}>")
        elif kind == "ul":
            parts.append("<ul>" + "".join(f"<li>{_inline(item)}</li>" for item in body[0]) + "</ul>")
        elif kind == "table":
            header, rows = body
            parts.append("<table><tr>" + "".join(f"<th>{_inline(h)}</th>" for h in header) + "</tr>" + "".join(
                "<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in rows) + "</table>")
        elif kind == "img":
            data = base64.b64encode(body[1]).decode()
            parts.append(f'<img src="data:image/png;base64,{data}" alt="{html_lib.escape(body[0])}">')
    return "\n".join(parts + ["</body></html>", ""])


def note(papers: list[dict]) -> str:
    """The markdown of the verdicts (the summary table, each paper's checks) within MLflow's 8,000 characters
    for a description: when they do not fit, only the checks that do not hold are listed."""
    def render(keep) -> str:
        report = [("h1", "The reading group, reproduced: verdicts"), _summary_table(papers)]
        for p in papers:
            report += [("p", f"**{p['paper']}: {p['verdict']}**"),
                       ("ul", [f"{c['criterion']}: {c['outcome']}" for c in p["checks"] if keep(c)])]
        return markdown(report + [("p", "Figures, the paper's numbers beside ours and the commands: report.html "
                                        "under Artifacts.")])

    text = render(lambda c: True)
    if len(text) > NOTE_LIMIT:
        text = render(lambda c: c["outcome"] != "holds")
    return text[:NOTE_LIMIT]


def write(evidence: list[Evidence], folder: str) -> list[str]:
    """report.md, report.html and figures/<pipeline>/<name>.png (report.md's images) into `folder`."""
    report = blocks(evidence)
    written = []
    for kind, *body in report:
        if kind == "img":
            path = os.path.join(folder, body[0])
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as handle:
                handle.write(body[1])
    for name, text in (("report.md", markdown(report)), ("report.html", html(report))):
        written.append(os.path.join(folder, name))
        with open(written[-1], "w") as handle:
            handle.write(text)
    return written


def publish(client: MlflowClient, run_id: str, evidence: list[Evidence]) -> None:
    """The report as artifacts of `run_id` (the reading group's run)."""
    with tempfile.TemporaryDirectory() as folder:
        write(evidence, folder)
        client.log_artifacts(run_id, folder)


@dataclass
class Params:
    """Writes the reading group's report from runs stored in MLflow, without training."""

    experiment_name: str = param("", "experiment whose newest FINISHED parent run of each pipeline is used")
    run_id: str = param("", "a reading_group run (the pipeline runs it used) or one pipeline's parent run")
    tracking_uri: str = param("", "MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    output_dir: str = param(".", "folder that receives report.md, report.html and figures/")

    def validate(self) -> None:
        require(bool(self.experiment_name) != bool(self.run_id), "experiment_name",
                "give either --experiment_name or --run_id")


def chosen_runs(client: MlflowClient, params: Params) -> list[str]:
    """The runs the report uses, in the notes' order."""
    if params.run_id:
        try:
            run = client.get_run(params.run_id)
        except Exception:  # noqa: BLE001 (MLflow raises its own kinds for an unknown id)
            raise UsageError("run_id", f"no run {params.run_id} in this tracking store") from None
        if run.data.tags.get("pipeline") != "reading_group":
            return [params.run_id]
        with tempfile.TemporaryDirectory() as folder:
            try:
                with open(client.download_artifacts(params.run_id, "summary.json", folder)) as handle:
                    return [p["run_id"] for p in json.load(handle)["papers"]]
            except Exception:  # noqa: BLE001
                raise UsageError("run_id", f"reading_group run {params.run_id} has no summary.json: it did not "
                                           f"finish (use --experiment_name)") from None
    experiment = client.get_experiment_by_name(params.experiment_name)
    require(experiment is not None, "experiment_name", f"no experiment {params.experiment_name!r}")
    runs = [finished_run(client, experiment.experiment_id, paper.pipeline) for paper in PAPERS]
    require(any(runs), "experiment_name", f"no FINISHED pipeline run in {params.experiment_name!r}")
    return [r for r in runs if r]


def main(argv: list[str] | None = None) -> int:
    prog = "python -m pipelines report"
    try:
        params = parse(Params, sys.argv[1:] if argv is None else argv, prog=prog)
        uri = resolve_tracking_uri(params.tracking_uri)
        check_reachable(uri)
        if uri.startswith("sqlite:///"):  # MLflow would create an empty store: a missing one is bad input
            require(os.path.exists(uri[len("sqlite:///"):]), "tracking_uri", f"no MLflow store at {uri}")
        client = MlflowClient(tracking_uri=uri)
        used = [evidence(client, run_id) for run_id in chosen_runs(client, params)]
    except UsageError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    for e in used:
        print(f"used {e.pipeline} run {e.run_id} ({e.run_name}, finished {_date(e.ended)})")
    os.makedirs(params.output_dir, exist_ok=True)
    for path in write(used, params.output_dir):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
