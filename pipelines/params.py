"""One dataclass of parameters per pipeline generates its command-line flags and its MLproject entry.

Flags are `--name value`, which is what `mlflow run -P name=value` passes. Booleans accept
true/false (and MLflow's True/False); tuple fields are comma-separated lists. Every pipeline's
dataclass extends `CommonParams`, so the common flags of DESIGN.md exist everywhere.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import typing
from dataclasses import dataclass, field


class UsageError(Exception):
    """Bad input: reported as one line naming the flag, exit code 2, before any run is created."""

    def __init__(self, flag: str | None, message: str):
        message = " ".join(message.split())  # one line, whatever the message quotes (a library's own error)
        super().__init__(f"--{flag}: {message}" if flag else message)
        self.flag = flag


class _OneLineParser(argparse.ArgumentParser):
    """argparse's own errors (an unknown flag, a flag without its value) as bad input too: one line, exit 2."""

    def error(self, message: str):
        named = re.search(r"--(\w+)", message)
        if "expected one argument" in message:  # argparse reads a value such as -inf or -1e-3 as a flag
            raise UsageError(named.group(1), f"expected a value (one that starts with '-' is written "
                                             f"--{named.group(1)}=-1e-3)")
        if message.startswith("unrecognized arguments"):
            if named:
                raise UsageError(named.group(1), f"unknown flag (`{self.prog} --help` lists the flags)")
            message += " (every value follows its --flag)"
        raise UsageError(None, message)


def param(default, help: str, choices: tuple | None = None):
    """A dataclass field that also carries its flag's help text (and allowed values)."""
    kwargs = {"default_factory": lambda: default} if isinstance(default, (list, dict)) else {"default": default}
    return field(metadata={"help": help, "choices": choices}, **kwargs)


def parse_bool(text: str) -> bool:
    lowered = str(text).strip().lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # float() takes nan and inf, which no flag means
        raise ValueError(f"expected a finite number, got {text!r}")
    return value


def _scalar_parser(kind) -> typing.Callable[[str], object]:
    return parse_bool if kind is bool else parse_float if kind is float else kind


def _field_type(cls, f: dataclasses.Field):
    return typing.get_type_hints(cls)[f.name]


def _parser_for(cls, f: dataclasses.Field) -> typing.Callable[[str], object]:
    kind = _field_type(cls, f)
    if typing.get_origin(kind) is tuple:
        item = _scalar_parser(typing.get_args(kind)[0])
        return lambda text: tuple(item(part.strip()) for part in str(text).split(",") if part.strip())
    return _scalar_parser(kind)


def format_value(value) -> str:
    """The string a flag takes for `value`: the inverse of the parser (used for MLproject defaults)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return ",".join(format_value(v) for v in value)
    return str(value)


def parse(cls, argv: list[str], prog: str):
    """Parse `argv` into an instance of the dataclass `cls`, then run its `validate()` (value checks; the
    checks that load data or build nets are `preflight()`, which the caller runs before any run exists)."""
    # No abbreviations: a flag is its field's name (MLflow passes those), and a new flag cannot make an old one ambiguous.
    parser = _OneLineParser(prog=prog, description=(cls.__doc__ or "").strip(), allow_abbrev=False)
    converters = {}
    for f in dataclasses.fields(cls):
        converters[f.name] = _parser_for(cls, f)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        text = f"{f.metadata.get('help', '')} (default: {format_value(default)})"
        parser.add_argument(f"--{f.name}", default=None, metavar="VALUE", help=text.replace("%", "%%"))  # argparse formats %
    try:
        namespace = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse already printed its one-line usage error
        raise SystemExit(2 if exit_.code else 0) from None
    values = {}
    for f in dataclasses.fields(cls):
        raw = getattr(namespace, f.name)
        if raw is None:
            continue
        try:
            values[f.name] = converters[f.name](raw)
        except ValueError as error:
            raise UsageError(f.name, str(error)) from None
    params = cls(**values)
    for f in dataclasses.fields(cls):
        choices = f.metadata.get("choices")
        value = getattr(params, f.name)
        for item in value if isinstance(value, tuple) else (value,):
            if choices and item not in choices:
                raise UsageError(f.name, f"unknown value {item!r}; choose from {', '.join(map(str, choices))}")
    params.validate()
    return params


def defaults(cls) -> dict[str, str]:
    """Flag name -> default as the flag's string, in declaration order (for MLproject)."""
    out = {}
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        out[f.name] = format_value(default)
    return out


def fc_options(params, **extra) -> dict:
    """The options --model takes: the fc model's --widths (and `extra`); the zoo's other nets take none."""
    return {"widths": params.widths, **extra} if params.model == "fc" else {}


def require(condition: bool, flag: str, message: str) -> None:
    if not condition:
        raise UsageError(flag, message)


def require_fraction(values, flag: str, low_open: bool = False) -> None:
    for v in values if isinstance(values, tuple) else (values,):
        ok = (0 < v <= 1) if low_open else (0 <= v <= 1)
        require(ok, flag, f"{v} is outside {'(0, 1]' if low_open else '[0, 1]'}")


@dataclass
class CommonParams:
    """Flags that every pipeline has."""

    dataset: str = param("mnist5k", "dataset name (embedded: mnist5k, digits, mnist1d; torchvision: mnist, fashion_mnist, "
                                    "cifar10)")
    data_dir: str = param("data", "folder holding torchvision datasets")
    download: bool = param(False, "download torchvision datasets into --data_dir when missing")
    seed: int = param(0, "random seed (data corruption, initialization, batching)")
    max_epochs: int = param(30, "epoch budget of each training")
    batch_size: int = param(128, "mini-batch size (global, across devices)")
    lr: float = param(0.01, "learning rate")
    optimizer: str = param("sgd", "optimizer", choices=("sgd", "adam"))
    accelerator: str = param("auto", "Lightning accelerator: auto (a GPU where there is one, else the CPU), cpu or gpu")
    devices: int = param(1, "devices (processes) per node")
    strategy: str = param("auto", "Lightning strategy: auto or ddp (one process per device for the whole pipeline; "
                          "also under torchrun or srun)")
    num_nodes: int = param(1, "number of nodes")
    precision: str = param("32-true", "Lightning precision: 32-true, 16-mixed, bf16-mixed")
    tracking_uri: str = param("", "MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    experiment_name: str = param("", "MLflow experiment (default: the pipeline's name, or the one `mlflow run` chose)")
    resume: bool = param(True, "continue the newest unfinished run of the same command (same parameters, tracking URI "
                         "and experiment): trainings that FINISHED there are reused, not trained again; false: start afresh")
    system_metrics: bool = param(True, "log the machine's CPU, memory, disk, network and GPU use as system/ metrics "
                                 "of the parent run, every $MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL seconds (default 10)")

    def validate(self) -> None:
        """Checks of the values alone (fast; `parse` runs it)."""
        from datamodules.sources import SOURCES  # late: keeps --help fast

        require(self.dataset in SOURCES, "dataset", f"unknown dataset {self.dataset!r}; choose from {', '.join(SOURCES)}")
        for name in ("max_epochs", "batch_size", "devices", "num_nodes"):
            require(getattr(self, name) >= 1, name, f"must be a positive integer, got {getattr(self, name)}")
        require(self.lr > 0, "lr", f"must be positive, got {self.lr}")
        last_seed = self.seed + getattr(self, "seeds", 1) - 1  # a pipeline with --seeds also uses seed + 1, ...
        require(self.seed >= 0 and last_seed < 2 ** 32, "seed", f"must lie in [0, 2^32 - 1] (NumPy's range), got "
                f"{self.seed}" + (f" and --seeds reaches {last_seed}" if last_seed != self.seed else ""))
        require(self.precision in PRECISIONS, "precision",
                f"unknown precision {self.precision!r}; choose from {', '.join(PRECISIONS)}")
        self._check_tracking_uri()
        require(self.accelerator in ("cpu", "gpu", "cuda", "auto"), "accelerator",
                f"unknown accelerator {self.accelerator!r}; choose from cpu, gpu, auto")
        # ddp_spawn would start processes per training, inside ranks that the pipeline's launch already started.
        require(self.strategy in ("auto", "ddp", "ddp_find_unused_parameters_true"), "strategy",
                f"unknown strategy {self.strategy!r}; choose from auto, ddp (the pipeline starts its ranks once; "
                f"ddp_spawn is not needed)")
        require(self.devices <= available_devices(self.accelerator), "devices",
                f"{self.devices} requested but this machine has {available_devices(self.accelerator)} "
                f"{'CPU cores' if resolved_accelerator(self.accelerator) == 'cpu' else 'GPUs'}")

    def _check_tracking_uri(self) -> None:
        uri = self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")  # neither: the default SQLite database
        if not uri or "://" in uri and not uri.startswith("file:"):
            return
        from mlflow.environment_variables import MLFLOW_ALLOW_FILE_STORE  # late: MLflow is slow to import

        require(MLFLOW_ALLOW_FILE_STORE.get(), "tracking_uri", f"{uri!r} is a folder, MLflow's file store, which "
                "MLflow refuses (unless MLFLOW_ALLOW_FILE_STORE=true); give a database such as sqlite:///mlflow.db")

    def preflight(self) -> None:
        """Checks that need the data, a net or a storage: run once, before any MLflow run exists, so that
        what cannot work is bad input (a pipeline extends it; `arrays()` loads the dataset once)."""
        from datamodules.sources import EMBEDDED

        if self.dataset not in EMBEDDED:  # missing files are bad input
            self.arrays()

    def arrays(self):
        """The dataset's arrays (cached: several preflight checks look at them)."""
        from datamodules.sources import DataUnavailable, load

        if getattr(self, "_arrays", None) is None:
            try:
                self._arrays = load(self.dataset, self.data_dir, self.download, self.seed)
            except DataUnavailable as error:
                raise UsageError("download" if self.download else "data_dir", str(error)) from None
            except OSError as error:  # a download without a network, a --data_dir that cannot be written
                raise UsageError("download" if self.download else "data_dir", f"cannot get {self.dataset} into "
                                 f"{self.data_dir!r}: {getattr(error, 'reason', None) or error}") from None
        return self._arrays

    def check_validation_split(self, fraction: float, flag: str, n: int = 0) -> None:
        """The validation split that `fraction` of the n training examples makes (rounded, as the datamodule cuts
        it) must hold at least one example and leave at least one to train on (n: 0 for the whole training set)."""
        n = n or len(self.arrays().y_train)
        held = round(fraction * n)
        require(1 <= held < n, flag, f"{fraction} of {n:,} training examples holds {held} out for validation and "
                f"leaves {n - held} to train on: each needs at least one")

    def checked_net(self, model: str, size_flag: str | None = None, **options):
        """`model` built for the dataset's inputs on the meta device (no memory, no time), for preflight checks:
        a net that cannot take the inputs is bad input of --model; one too large for the device, of `size_flag`
        (default: --widths when the options give widths, else --model)."""
        import torch

        from modules.nets import build_net, count_parameters

        arrays = self.arrays()
        try:
            with torch.device("meta"):
                net = build_net(model, arrays.input_shape, arrays.num_classes, **options)
        except ValueError as error:  # e.g. a conv net on 1-D features, lenet on 8x8 digits
            raise UsageError("model", f"{error} ({self.dataset})") from None
        require_fits(count_parameters(net), size_flag or ("widths" if "widths" in options else "model"),
                     self.accelerator, f"the net {model} on {self.dataset}")
        return net


PRECISIONS = ("32-true", "16-mixed", "bf16-mixed")


def require_distinct(values: tuple, flag: str) -> None:
    """A sweep names each of its trainings once: a repeated value would train one twice, or silently merge."""
    require(len(set(values)) == len(values), flag, f"{format_value(values)} repeats a value")


def require_fits(numbers: int, flag: str, accelerator: str, what: str, bytes_each: int = 4) -> None:
    """`numbers` (a net's parameters, float32 by default) must fit in the memory of the device that holds them:
    a lower bound of what the computation needs, so only what cannot work is refused."""
    need, (have, device) = numbers * bytes_each, device_memory(accelerator)
    require(need <= have, flag, f"{what} holds {numbers:,} numbers, {need / 2 ** 30:,.1f} GiB: more than the "
            f"{have / 2 ** 30:,.1f} GiB of this {device}")


def device_memory(accelerator: str) -> tuple[int, str]:
    """(bytes, what) of the memory of one device that trains: a GPU's, else the machine's."""
    import psutil
    import torch

    if resolved_accelerator(accelerator) == "gpu" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory, "GPU"
    return psutil.virtual_memory().total, "machine"


def resolved_accelerator(accelerator: str) -> str:
    import torch

    if accelerator == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    return "gpu" if accelerator == "cuda" else accelerator


def available_devices(accelerator: str) -> int:
    import torch

    if resolved_accelerator(accelerator) == "gpu":
        return torch.cuda.device_count()
    return os.cpu_count() or 1
