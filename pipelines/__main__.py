"""Run one experiment pipeline, tracked in MLflow:

    python -m pipelines <name> [--flag value ...]     (the same as: mlflow run . -e <name> -P flag=value)
    python -m pipelines <name> --help                 (its flags and defaults)

Bad input ends with one line naming the flag and exit code 2, before any run is created. With
`--devices N --strategy ddp` (or under torchrun or srun) every rank runs the pipeline once, in one
process group (`pipelines.distributed`); global rank 0 alone logs, prints and writes.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import sys

from pipelines import NAMES, distributed, load
from pipelines.params import UsageError, parse
from pipelines.storage import StorageError
from pipelines.tracking import Tracking, interrupt, interrupted
from pipelines.training import Hardware


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["report"]:  # a command, not a pipeline: the reading group's report from stored runs
        from pipelines.report import main as report

        return report(argv[1:])
    if not argv or argv[0] not in NAMES:
        wanted = argv[0] if argv else ""
        print(f"usage: python -m pipelines {{{','.join(NAMES)}}} [--flag value ...]", file=sys.stderr)
        if wanted in ("-h", "--help"):
            return 0
        print(f"error: unknown pipeline {wanted!r}; choose from {', '.join(NAMES)}", file=sys.stderr)
        return 2
    name, prog = argv[0], f"python -m pipelines {argv[0]}"
    for noisy in ("mlflow", "alembic"):  # database set-up chatter is not the user's business
        logging.getLogger(noisy).setLevel(logging.WARNING)
    pipeline = load(name)
    for stop in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C, or a scheduler's stop: the open runs end KILLED
        signal.signal(stop, interrupt)
    launch, ok = None, False
    try:
        params = parse(pipeline.Params, argv[1:], prog=prog)
        params.preflight()  # what needs the data, a net or a storage: still before any run exists
        launch = distributed.start(Hardware.from_params(params), argv)  # one process group for the whole run
        if not distributed.is_rank_zero():  # every rank runs the pipeline; one prints its progress
            sys.stdout = open(os.devnull, "w")
        with Tracking(name, params) as tracking:
            summary = pipeline.run(params, tracking)
            tracking.log_summary(summary)
        ok, rank_zero = True, distributed.is_rank_zero()
    except UsageError as error:
        if speaks():
            print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, SystemExit):
        if not interrupted():
            raise
        if speaks():
            print(f"{prog}: interrupted; the open runs are marked KILLED; run the same command again to resume",
                  file=sys.stderr)
        return 130
    except StorageError as error:  # a full disk, an artifact location that cannot be written: the runs end FAILED
        if speaks():
            print(f"{prog}: error: {error}", file=sys.stderr)
        return 1
    except Exception:
        failure = launch.failure() if launch else None
        if failure:  # another rank died first: say which, not this rank's broken connection
            print(f"{prog}: failed: {failure}; the open runs are marked FAILED", file=sys.stderr)
            return 1
        raise
    finally:
        if launch:
            distributed.stop(launch, ok)
    if rank_zero:
        print(json.dumps(summary, indent=1)[:4000])
        print(tracking.ui_hint())
    return 0


def speaks() -> bool:
    """Whether this process is its node's first (the ranks of one launch fail alike: one per node says so)."""
    return int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))) == 0


if __name__ == "__main__":
    sys.exit(main())
