"""pipelines.training: the state a training leaves (plain data, loaded without unpickling: what a resume
reads and what rank 0 hands the other ranks), and when mini-batches are grouped."""
import random

import numpy as np
import pytest
import torch

from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason

from callbacks.stopping import stop_when, stopped_by_threshold
from modules.classifier import ClassifierModule
from pipelines.training import Hardware, TrainJob, UnsafeFile, _restore, _state_of, load_plain, steps_per_call


def test_mini_batches_are_grouped_only_where_nothing_can_tell():
    from lightning.pytorch.callbacks import Callback

    from callbacks.smoothness import SmoothnessProbe
    from datamodules.datamodule import ArrayDataModule
    from modules.classifier import ClassifierModule

    class PerEpoch(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            pass

    def job(hardware=Hardware(), **changes):
        return TrainJob(ClassifierModule(torch.nn.Linear(2, 2)), ArrayDataModule("digits"), hardware, 1, **changes)

    assert steps_per_call(job()) == steps_per_call(job(callbacks=[PerEpoch()])) == TrainJob.steps_per_call > 1
    assert steps_per_call(job(steps_per_call=3)) == 3
    assert steps_per_call(job(hardware=Hardware(devices=2, strategy="ddp"))) == 1  # DDP: one backward per forward
    assert steps_per_call(job(max_steps=10)) == 1 and steps_per_call(job(val_check_interval=5)) == 1
    assert steps_per_call(job(callbacks=[SmoothnessProbe(every=1, etas=(0.1,))])) == 1  # probes single batches


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling calls Path.touch(marker): code from the file runs
        return (type(self.marker).touch, (self.marker,))


def test_a_file_that_would_run_code_when_unpickled_is_refused(tmp_path):
    marker = tmp_path / "code-ran"
    torch.save({"weights": {"w": torch.ones(2)}, "payload": _RunsCode(marker)}, tmp_path / "crafted.pt")
    with pytest.raises(UnsafeFile, match=r"crafted\.pt: refused: .*run code"):
        load_plain(str(tmp_path / "crafted.pt"))
    assert not marker.exists()
    torch.save({"weights": {"w": torch.ones(2)}, "history": [{"epoch": 0, "acc": 0.5}]}, tmp_path / "plain.pt")
    assert load_plain(str(tmp_path / "plain.pt"))["history"] == [{"epoch": 0, "acc": 0.5}]


def test_a_training_state_is_plain_and_restores_weights_callbacks_and_random_generators(tmp_path):
    """What a training leaves loads without unpickling and restores what training changed, the random
    generators included (a resumed pipeline draws after a reused training what it drew after the real one)."""
    module, callback = ClassifierModule(torch.nn.Linear(2, 2)), stop_when("train_acc", 1.0)
    module.history = [{"epoch": 0, "train_acc": 0.75}]
    callback.seen, callback.fn = [torch.zeros(1)], lambda: None  # a function is not data: not kept
    callback.stopping_reason = EarlyStoppingReason.STOPPING_THRESHOLD  # an enum: pipelines ask why it stopped
    state = _state_of(module, [callback])
    assert "fn" not in state["callbacks"][0] and not any(k.startswith("_") for k in state["module"])
    draws = (torch.rand(3), random.random(), np.random.rand())
    torch.save(state, tmp_path / "trained.pt")
    fresh, fresh_callback = ClassifierModule(torch.nn.Linear(2, 2)), stop_when("train_acc", 1.0)
    _restore(fresh, [fresh_callback], load_plain(str(tmp_path / "trained.pt")))
    assert fresh.history == module.history and torch.equal(fresh.net.weight, module.net.weight)
    assert torch.equal(fresh_callback.seen[0], torch.zeros(1)) and stopped_by_threshold(fresh_callback)
    again = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(draws[0], again[0]) and draws[1:] == again[1:]
