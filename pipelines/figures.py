"""The figures of every pipeline: one small helper for the line plots the papers draw.

Each figure is logged by `Tracking.log_figure` as `figures/<name>.png` on the parent run.
"""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # headless: figures go to MLflow, never to a window
import matplotlib.pyplot as plt  # noqa: E402


def line_plot(series: dict[str, tuple[list, list]], xlabel: str, ylabel: str, title: str,
              logx: bool = False, logy: bool = False, hlines: dict[str, float] | None = None,
              vlines: dict[str, float] | None = None, styles: dict[str, dict] | None = None,
              bands: dict[str, tuple[list, list, list]] | None = None, ax=None):
    """Curves {label: (x, y)}, optional shaded bands {label: (x, low, high)} and labelled reference lines.

    A band with the label of a series (its spread, e.g. min-max over seeds) takes that series' colour.
    """
    figure = None
    if ax is None:
        figure, ax = plt.subplots(figsize=(6, 4), dpi=120)
    colors = {}
    for label, (xs, ys) in series.items():
        (line,) = ax.plot(xs, ys, label=label, **{"marker": "o", "markersize": 3, **(styles or {}).get(label, {})})
        colors[label] = line.get_color()
    for label, (xs, low, high) in (bands or {}).items():
        # a band named like a series is that series' spread: its colour, no second legend entry
        ax.fill_between(xs, low, high, alpha=0.2, **({"color": colors[label]} if label in colors else {"label": label}))
    for label, y in (hlines or {}).items():
        ax.axhline(y, linestyle="--", color="gray", linewidth=1)
        ax.annotate(label, (0.01, y), xycoords=("axes fraction", "data"), fontsize=8, va="bottom")
    for label, x in (vlines or {}).items():
        ax.axvline(x, linestyle=":", color="black", linewidth=1)
        ax.annotate(label, (x, 0.98), xycoords=("data", "axes fraction"), fontsize=8, va="top", rotation=90)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if series or bands:
        ax.legend(fontsize=8)
    if figure is not None:
        figure.tight_layout()
    return figure if figure is not None else ax.figure
