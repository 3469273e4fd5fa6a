"""Blier & Ollivier (2018): the prequential description length of the labels, given the inputs.

    mlflow run . -e description_length --env-manager local
    python -m pipelines description_length --dataset digits --labels true,random

The training set, in a seeded random order, is cut at the boundaries t_1 < t_2 < ... < t_s = n
(--chunks, fractions of n). The first t_1 labels are sent with the uniform code, t_1 log2 K bits.
Each later chunk (t_i, t_i+1] is sent with the code of a model trained from scratch (fresh
initialization, fresh optimizer) on the t_i labels already sent: it costs its cross-entropy in bits,
sum of -log2 p(y | x). The model early-stops on a held-out tenth of those t_i examples (without it
a model trained on random labels is overconfident and codes worse than uniform) and codes with its
weights of least held-out loss. A chunk whose earlier data cannot be split into a training and a
held-out part (t_i = 1) is sent uniformly. The total is compared with the uniform code n log2 K.
Every cost is in bits, never nats. Each chunk's training is a child run.

`--labels true,random`: real labels compress far below the uniform code, random labels do not.
Figure: cumulative bits against examples sent, per labels, with the uniform code's line.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping

from datamodules.corruption import Corruption
from datamodules.datamodule import ArrayDataModule
from modules.classifier import ClassifierModule
from modules.nets import NETS, build_net
from pipelines.figures import line_plot
from pipelines.params import CommonParams, fc_options, format_value, param, require, require_distinct, require_fraction
from pipelines.training import datamodule, recipe, train

LABELS = {"true": Corruption(), "random": Corruption("random_labels")}
DOUBLING = tuple(round(0.001 * 2 ** i, 3) for i in range(10)) + (1.0,)  # 0.001, 0.002, ..., 0.512, 1.0


@dataclass
class Params(CommonParams):
    """Blier & Ollivier 2018: prequential code length of true and random labels."""

    dataset: str = param("digits", "dataset name (embedded: mnist5k, digits, mnist1d; torchvision: mnist, fashion_mnist, "
                                   "cifar10)")
    max_epochs: int = param(200, "epoch budget of each chunk's training (early stopping usually ends it first)")
    batch_size: int = param(64, "mini-batch size")
    lr: float = param(0.001, "learning rate")
    optimizer: str = param("adam", "optimizer", choices=("sgd", "adam"))
    model: str = param("fc", "network from the zoo", choices=tuple(NETS))
    widths: tuple[int, ...] = param((256,), "hidden widths of the fc model")
    chunks: tuple[float, ...] = param(DOUBLING, "chunk boundaries as increasing fractions of the training set, ending at 1.0")
    labels: tuple[str, ...] = param(tuple(LABELS), "labels to code: true, random (uniformly redrawn once)", choices=tuple(LABELS))
    examples: int = param(0, "code only the first this many training examples (0: all)")
    holdout: float = param(0.1, "share of the earlier data held out for early stopping")
    patience: int = param(10, "epochs without a lower held-out loss before a chunk's training stops")

    def validate(self) -> None:
        super().validate()
        require(bool(self.chunks), "chunks", "give at least one boundary")
        require_fraction(self.chunks, "chunks", low_open=True)
        require(all(a < b for a, b in zip(self.chunks, self.chunks[1:])), "chunks",
                f"boundaries must increase strictly, got {','.join(map(str, self.chunks))}")
        require(self.chunks[-1] == 1.0, "chunks",
                f"the last boundary must be 1.0 (the whole training set), got {self.chunks[-1]}")
        require(bool(self.labels), "labels", "nothing to run: give true, random or both")
        require(self.examples >= 0, "examples", f"must be 0 (all) or a positive count, got {self.examples}")
        require(0 < self.holdout < 1, "holdout", f"{self.holdout} is outside (0, 1)")
        require(self.patience >= 1, "patience", f"must be a positive integer, got {self.patience}")
        require(all(w >= 1 for w in self.widths), "widths", f"widths must be positive, got {format_value(self.widths)}")
        require_distinct(self.labels, "labels")

    def preflight(self) -> None:
        super().preflight()
        self.checked_net(self.model, **fc_options(self))
        n = len(self.arrays().y_train)
        require(self.examples <= n, "examples", f"{self.examples:,} is more than the {n:,} training examples of "
                f"{self.dataset}")


class SentPrefix(ArrayDataModule):
    """The `seen` labels already sent, split into training data and a held-out part, plus the chunk to send next.

    The whole training set is loaded, labelled (true or random) and standardized once, in its seeded
    order (the inputs are known to the receiver, so their statistics are free); then it is cut.
    """

    def __init__(self, params: Params, labels: str, seen: int, end: int):
        super().__init__(params.dataset, params.data_dir, params.download, params.batch_size, params.seed,
                         corruption=LABELS[labels], train_subset=params.examples, eval_splits=("val",))
        self.seen, self.end, self.n_val = seen, end, max(1, round(params.holdout * seen))

    def _build(self) -> None:
        super()._build()
        x, y = self.splits["train"]
        order = torch.randperm(self.seen, generator=torch.Generator().manual_seed(self.seed * 7919 + self.seen))
        fit_part, held_out = order[self.n_val:], order[:self.n_val]
        self.splits = {"train": (x[fit_part], y[fit_part]), "val": (x[held_out], y[held_out]),
                       "next": (x[self.seen:self.end], y[self.seen:self.end])}


class KeepBest(Callback):
    """Keeps (as a plain attribute) the weights of the epoch of least held-out loss."""

    def __init__(self, monitor: str = "val_loss"):
        self.monitor, self.best, self.best_state = monitor, math.inf, None

    def on_validation_end(self, trainer, pl_module) -> None:
        value = trainer.callback_metrics.get(self.monitor)
        if value is not None and float(value) < self.best:
            self.best = float(value)
            self.best_state = {k: v.detach().cpu().clone() for k, v in pl_module.net.state_dict().items()}


def boundaries(fractions: tuple[float, ...], n: int) -> list[int]:
    """Chunk ends in examples: at least 1, strictly increasing (fractions that round alike merge), ending at n."""
    return sorted({min(n, max(1, round(f * n))) for f in fractions} | {n})


def code_length_bits(module: ClassifierModule, x: torch.Tensor, y: torch.Tensor) -> float:
    """Bits to send labels y given inputs x with the model's predictive distribution: sum of -log2 p(y | x)."""
    nats_per_label, _ = module.evaluate(x, y)
    return nats_per_label * len(y) / math.log(2)


def code_chunk(params: Params, labels: str, seen: int, end: int, child) -> dict:
    """Bits to send labels seen+1..end with a model trained (early-stopped) on the first `seen`."""
    data = SentPrefix(params, labels, seen, end)
    data.setup()
    net = lambda: build_net(params.model, data.input_shape, data.num_classes, **fc_options(params))
    stop = EarlyStopping("val_loss", patience=params.patience, mode="min", check_finite=False)
    trained = train(recipe(params, data, net, callbacks=[KeepBest(), stop]), child)
    kept = trained.callback(KeepBest)
    trained.net.load_state_dict(kept.best_state)
    _, accuracy = trained.module.evaluate(*data.splits["next"])
    return {"bits": code_length_bits(trained.module, *data.splits["next"]), "next_acc": accuracy,
            "held_out_loss": kept.best, "epochs": len(trained.history), "num_classes": data.num_classes}


def headline(summary: dict) -> str:
    """Prequential bits against the uniform code, per label set."""
    return "; ".join(f"{labels} labels {row['prequential_bits']:,.0f} bits vs {row['uniform_bits']:,.0f} uniform "
                     f"(ratio {row['ratio']:.3f})" for labels, row in summary.items())


def run(params: Params, tracking) -> dict:
    reference = datamodule(params, train_subset=params.examples)
    n, num_classes = len(reference.splits["train"][1]), reference.num_classes
    ends = boundaries(params.chunks, n)
    uniform_bits = lambda count: count * math.log2(num_classes)
    summary, curves = {}, {}
    for labels in params.labels:
        cumulative = [uniform_bits(ends[0])]  # the first chunk: uniform code
        for index, (seen, end) in enumerate(zip(ends, ends[1:]), start=1):
            if seen < 2:  # nothing to hold out: no model to train, the chunk is sent uniformly
                cumulative.append(cumulative[-1] + uniform_bits(end - seen))
                print(f"[{labels} {index}/{len(ends) - 1}] labels {seen + 1}..{end}: uniform code "
                      f"{uniform_bits(end - seen):.1f} bits", flush=True)
                continue
            with tracking.child(f"{labels} labels: code {seen + 1}..{end}",
                                {"labels_kind": labels, "seen": seen, "chunk_end": end}) as child:
                result = code_chunk(params, labels, seen, end, child)
                child.log_metrics({"chunk_bits": result["bits"], "bits_per_label": result["bits"] / (end - seen),
                                   "next_acc": result["next_acc"], "best_held_out_loss": result["held_out_loss"]})
            cumulative.append(cumulative[-1] + result["bits"])
            print(f"[{labels} {index}/{len(ends) - 1}] labels {seen + 1}..{end}: {result['bits']:.1f} bits "
                  f"({result['bits'] / (end - seen):.3f} per label, uniform {math.log2(num_classes):.3f}), "
                  f"accuracy {result['next_acc']:.3f}, {result['epochs']} epochs", flush=True)
        total = cumulative[-1]
        summary[labels] = {"prequential_bits": total, "uniform_bits": uniform_bits(n), "ratio": total / uniform_bits(n)}
        curves[labels] = cumulative
        tracking.log_metrics(None, {f"prequential_bits_{labels}": total, f"ratio_{labels}": total / uniform_bits(n)})
        print(f"{labels} labels: {total:.1f} bits prequential vs {uniform_bits(n):.1f} uniform "
              f"(ratio {total / uniform_bits(n):.3f})", flush=True)

    series = {f"{labels} labels (prequential)": (ends, curve) for labels, curve in curves.items()}
    series["uniform code"] = (ends, [uniform_bits(e) for e in ends])
    tracking.log_figure(line_plot(series, "examples sent", "cumulative code length (bits)",
                                  f"Prequential code length on {params.dataset} (n={n}, K={num_classes})",
                                  logx=True, logy=True, styles={"uniform code": {"linestyle": "--", "color": "gray"}}),
                        "cumulative_bits")
    return summary
