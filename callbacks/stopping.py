"""Stop a training the moment a metric reaches a threshold (fit the training set, pass a d_int90 trial).

Built on Lightning's EarlyStopping, whose threshold test runs after the module has logged the
epoch's metrics and agrees across DDP ranks; patience is unbounded so only the threshold stops.
"""
from __future__ import annotations

from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason

_TIE = 1e-9  # EarlyStopping compares strictly; reaching the threshold exactly counts as reaching it


def stop_when(monitor: str, reaches: float, mode: str = "max") -> EarlyStopping:
    """Stops once `monitor` >= `reaches` (mode max) or <= `reaches` (mode min), checked every epoch."""
    threshold = reaches - _TIE if mode == "max" else reaches + _TIE
    return EarlyStopping(monitor=monitor, mode=mode, stopping_threshold=threshold, patience=2**62,
                         check_finite=False, check_on_train_epoch_end=monitor.startswith("train"), verbose=False)


def stopped_by_threshold(callback: EarlyStopping) -> bool:
    return callback.stopping_reason == EarlyStoppingReason.STOPPING_THRESHOLD
