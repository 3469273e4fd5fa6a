"""Layer robustness (Zhang, Bengio & Singer) from the project's pieces under a plain Lightning Trainer.

    python examples/rewind_probe.py                          # DDP on 2 CPU processes
    python examples/rewind_probe.py --devices 1 --epochs 4 --out /tmp/one

FC 3x256 from the zoo, `ClassifierModule` (SGD with momentum), 1,200 of scikit-learn's digits with 20%
label noise, and `RewindProbe`: it keeps every layer at epochs 0, 1 and 2, and every `--probe_every`
epochs and at the end of `fit` measures the test error with each layer alone rewound to each kept
epoch, or re-randomized from its own initializer. With `--devices 2` Lightning starts the second
rank itself (rank 0 runs this script again with LOCAL_RANK=1 at `fit`); the 1,080 training examples
split into whole shards, so 2 ranks train exactly as 1 process does.

Which rank holds what: the probe runs once, on global rank 0 (on a copy of the net, with no
collectives: the other ranks wait for it at their next collective). Only rank 0's `RewindProbe` holds
`probes`, `result`, `distance` and the kept layer states; on the other ranks they stay empty
(`result` is None). The trained net and `history` are the same on every rank.
`--out DIR` saves what each rank holds to DIR/rank<k>.pt (plain data: `torch.load(..., weights_only=True)`).
"""
import argparse
import os

import lightning as L
import torch

from callbacks.rewind_probe import RewindProbe
from datamodules.corruption import Corruption
from datamodules.datamodule import ArrayDataModule
from modules.classifier import ClassifierModule
from modules.nets import build_net

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--devices", type=int, default=2, help="processes (one rank each)")
parser.add_argument("--accelerator", default="cpu", help="cpu, gpu or auto")
parser.add_argument("--epochs", type=int, default=10, help="epochs of training")
parser.add_argument("--probe_every", type=int, default=0, help="also probe every this many epochs (0: only at the end)")
parser.add_argument("--label_noise", type=float, default=0.2, help="share of training labels redrawn at random")
parser.add_argument("--out", default="", help="folder for rank<k>.pt: what each rank holds at the end")
args = parser.parse_args()

L.seed_everything(0, verbose=False)
data = ArrayDataModule("digits", batch_size=60, train_subset=1200, val_fraction=0.1,
                       corruption=Corruption("label_noise", args.label_noise))
data.setup()  # loads the arrays now: the net needs their shape
module = ClassifierModule(build_net("fc", data.input_shape, data.num_classes, widths=(256, 256, 256)), lr=0.01)
probe = RewindProbe(checkpoints=(0, 1, 2), probe_every=args.probe_every)
trainer = L.Trainer(accelerator=args.accelerator, devices=args.devices, strategy="ddp" if args.devices > 1 else "auto",
                    max_epochs=args.epochs, callbacks=[probe], logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False)
trainer.fit(module, datamodule=data)

if trainer.is_global_zero:  # the probe's results live here only
    result = probe.result
    print(f"test error {result['baseline_error']:.3f} after {result['epoch']} epochs; with one layer changed:")
    print("layer  " + "  ".join(f"epoch {tau}" for tau in result["reinit"][probe.layer_names[0]]) + "  re-randomized")
    for name in probe.layer_names:
        errors = "  ".join(f"{error:7.3f}" for error in result["reinit"][name].values())
        print(f"{name:5}  {errors}  {result['rerandomize'][name]:13.3f}")

if args.out:
    os.makedirs(args.out, exist_ok=True)
    torch.save({"world_size": trainer.world_size, "probes": probe.probes, "distance": probe.distance,
                "history": module.history, "net": module.net.state_dict()},
               os.path.join(args.out, f"rank{trainer.global_rank}.pt"))
