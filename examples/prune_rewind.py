"""Lottery tickets (Frankle & Carbin 2019) from the project's pieces under a plain Lightning Trainer.

    python examples/prune_rewind.py                          # DDP on 2 CPU processes, 3 pruning rounds
    python examples/prune_rewind.py --devices 1 --rounds 1 --epochs 2 --out /tmp/one

LeNet-300-100 from the zoo, `ClassifierModule` (Adam, the paper's 1.2e-3), 1,200 of scikit-learn's
digits with 20% label noise, and `PruneRewind`: each `fit` ends with the net pruned by magnitude and
rewound to its initialization, so the next `fit` trains the next winning ticket. With `--devices 2`
Lightning starts the second rank itself: at the first `fit`, rank 0 runs this script again with
LOCAL_RANK=1, so everything before it runs on every rank (seeded, it builds the same data and net
everywhere). The 1,080 training examples are a multiple of the batch of 60, so every rank's shard of
every batch is whole and 2 ranks train exactly as 1 process does (an uneven shard is padded with
repeated examples, which changes the last batch of an epoch).

Which rank holds what: every rank holds the same masks (DDP keeps the weights equal, and the pruner
broadcasts rank 0's masks anyway), the same theta_0 and `rank_digests` (one mask digest per rank,
gathered at the start and end of every training), and the same `history` (metrics are reduced).
`--out DIR` saves what each rank holds to DIR/rank<k>.pt (plain data: `torch.load(..., weights_only=True)`).
"""
import argparse
import os

import lightning as L
import torch

from callbacks.prune_rewind import PruneRates, PruneRewind, sparsity_report
from datamodules.corruption import Corruption
from datamodules.datamodule import ArrayDataModule
from modules.classifier import ClassifierModule
from modules.nets import build_net

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--devices", type=int, default=2, help="processes (one rank each)")
parser.add_argument("--accelerator", default="cpu", help="cpu, gpu or auto")
parser.add_argument("--rounds", type=int, default=3, help="pruning rounds after the dense training")
parser.add_argument("--epochs", type=int, default=5, help="epochs per training")
parser.add_argument("--label_noise", type=float, default=0.2, help="share of training labels redrawn at random")
parser.add_argument("--out", default="", help="folder for rank<k>.pt: what each rank holds at the end")
args = parser.parse_args()

L.seed_everything(0, verbose=False)
data = ArrayDataModule("digits", batch_size=60, train_subset=1200, val_fraction=0.1,
                      corruption=Corruption("label_noise", args.label_noise))
data.setup()  # loads the arrays now: the net needs their shape
module = ClassifierModule(build_net("lenet_300_100", data.input_shape, data.num_classes), optimizer="adam", lr=1.2e-3)
pruner = PruneRewind(PruneRates(fc=0.2, output=0.1))

rounds = []
for round in range(args.rounds + 1):  # round 0 trains the dense net
    remaining = sparsity_report(module.net)["total"]["percent_remaining"] if round else 100.0
    trainer = L.Trainer(accelerator=args.accelerator, devices=args.devices, strategy="ddp" if args.devices > 1 else "auto",
                        max_epochs=args.epochs, callbacks=[pruner], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=data)  # ends pruned and rewound: the next round's ticket
    test_acc = module.history[-1]["test_acc"]  # of the trained net, before the pruning
    agree = all(digest == check[0] for check in pruner.rank_digests[-2:] for digest in check)  # at start and end
    rounds.append({"percent_remaining": remaining, "test_acc": test_acc, "masks_agree": agree})
    if trainer.is_global_zero:
        print(f"round {round}: {remaining:5.1f}% of weights, test_acc {test_acc:.3f}, "
              f"masks agree on all {trainer.world_size} ranks: {agree}")

if args.out:
    os.makedirs(args.out, exist_ok=True)
    torch.save({"world_size": trainer.world_size, "rounds": rounds, "rank_digests": pruner.rank_digests,
                "history": module.history, "net": module.net.state_dict()},
               os.path.join(args.out, f"rank{trainer.global_rank}.pt"))
