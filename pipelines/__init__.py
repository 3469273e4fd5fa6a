"""Experiment pipelines: one module per MLproject entry point.

A pipeline module defines `Params` (a dataclass extending `CommonParams`, which generates its
flags) and `run(params, tracking) -> summary`; `python -m pipelines <name> --flag value ...` runs it.
"""
import importlib

NAMES = ("intrinsic_dim", "randomization", "bn_smoothness", "lottery_ticket", "memorization", "layer_robustness", "xor",
         "description_length", "double_descent", "reading_group")


def load(name: str):
    """The pipeline module registered under `name`."""
    return importlib.import_module(f"pipelines.{name}")
