"""pipelines.training: the DDP launch (every rank of the node at once, no rank left waiting), what rank 0
hands back (plain data, loaded without unpickling), and when mini-batches are grouped."""
import subprocess
import sys
import time

import pytest
import torch

from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason

from callbacks.stopping import stop_when, stopped_by_threshold
from modules.classifier import ClassifierModule
from pipelines.training import (Hardware, TrainJob, UnsafeFile, _launch_ranks, _restore, _state, _wait, load_plain,
                                steps_per_call)


def test_ranks_start_with_their_own_local_rank_and_one_shared_address(tmp_path):
    script = ("import os; e = os.environ; open(os.path.join(%r, e['LOCAL_RANK']), 'w').write("
              "' '.join(e[k] for k in ('WORLD_SIZE', 'NODE_RANK', 'MASTER_ADDR', 'MASTER_PORT')))" % str(tmp_path))
    ranks = _launch_ranks([sys.executable, "-c", script], {}, Hardware(devices=3, num_nodes=2))
    assert _wait(ranks) == [0, 0, 0]
    seen = {path.name: path.read_text().split() for path in tmp_path.iterdir()}
    assert set(seen) == {"0", "1", "2"}
    world_size, node_rank, address, port = seen["0"]
    assert (world_size, node_rank, address) == ("6", "0", "127.0.0.1") and int(port) > 0
    assert seen["1"] == seen["2"] == seen["0"]  # one rendezvous for every rank


def test_a_failing_rank_stops_the_others():
    ranks = [subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(3)"]),
             subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])]
    start = time.monotonic()
    codes = _wait(ranks)
    assert codes[0] == 3 and codes[1] != 0 and time.monotonic() - start < 30


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


def test_rank_zero_hands_back_weights_and_plain_state_only(tmp_path):
    """What a DDP rank writes back loads without unpickling, and restores what training changed."""
    module, callback = ClassifierModule(torch.nn.Linear(2, 2)), stop_when("train_acc", 1.0)
    module.history = [{"epoch": 0, "train_acc": 0.75}]
    callback.seen, callback.fn = [torch.zeros(1)], lambda: None  # a function is not data: not handed back
    callback.stopping_reason = EarlyStoppingReason.STOPPING_THRESHOLD  # an enum: pipelines ask why it stopped
    state = {"weights": module.state_dict(), "module": _state(module, public_only=True),
             "callbacks": [_state(callback)]}
    assert "fn" not in state["callbacks"][0] and not any(k.startswith("_") for k in state["module"])
    fresh = TrainJob(ClassifierModule(torch.nn.Linear(2, 2)), None, Hardware(), 1,
                     callbacks=[stop_when("train_acc", 1.0)])
    torch.save(state, tmp_path / "out.pt")
    _restore(fresh, load_plain(str(tmp_path / "out.pt")))
    assert fresh.module.history == module.history and torch.equal(fresh.module.net.weight, module.net.weight)
    assert torch.equal(fresh.callbacks[0].seen[0], torch.zeros(1)) and stopped_by_threshold(fresh.callbacks[0])
