"""Stop a training the moment a metric reaches a threshold (fit the training set, pass a d_int90 trial).

Built on Lightning's EarlyStopping, whose threshold test runs after the module has logged the
epoch's metrics and agrees across DDP ranks; patience is unbounded so only the threshold stops, unless
a stall limit is asked for (then `stopped_by_threshold` tells the two stops apart).
"""
from __future__ import annotations

from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason

# EarlyStopping compares strictly; reaching the threshold exactly counts as reaching it. The tie must exceed
# float32 resolution (metrics are float32 tensors: 1 - 1e-9 rounds to 1.0, and then 1.0 > 1.0 never stops).
_TIE = 1e-6


def stop_when(monitor: str, reaches: float, mode: str = "max", stall_epochs: int | None = None,
              stall_delta: float = 0.0) -> EarlyStopping:
    """Stops once `monitor` >= `reaches` (mode max) or <= `reaches` (mode min), checked every epoch;
    with `stall_epochs`, also once it has not improved by `stall_delta` in that many epochs (a stalled training)."""
    threshold = reaches - _TIE if mode == "max" else reaches + _TIE
    return EarlyStopping(monitor=monitor, mode=mode, stopping_threshold=threshold, patience=stall_epochs or 2**62,
                         min_delta=stall_delta, check_finite=False, check_on_train_epoch_end=monitor.startswith("train"),
                         verbose=False)


def stopped_by_threshold(callback: EarlyStopping) -> bool:
    return callback.stopping_reason == EarlyStoppingReason.STOPPING_THRESHOLD
