"""Bad input, flag by flag: every flag of every pipeline has a case here that is refused before any run
exists, with one line naming the flag and exit code 2, nothing written (the `refused` fixture).

One table per pipeline of (command-line flags, the flag the error names): a wrong type, a value out of
range, an unknown choice, a value repeated in a sweep, and combinations that cannot work (a net that
cannot take the dataset's inputs, a lottery round that prunes nothing, a checkpoint past --max_epochs, a
d above the net's D, a net or projection larger than the machine's memory). The flags every pipeline
shares (CommonParams) are covered once, in COMMON, on randomization. `test_every_flag_has_a_case`
fails when a pipeline gains a flag without a case here.

    python -m pytest -q tests/test_bad_input.py
"""
from __future__ import annotations

import dataclasses
import shlex

import pytest

from pipelines import NAMES, load
from pipelines.params import CommonParams

COMMON = [  # on randomization
    ("--dataset imagenet", "dataset"),
    ("--dataset mnist --data_dir nowhere", "data_dir"),
    ("--download maybe", "download"),
    ("--dataset cifar10 --download true --data_dir /dev/null", "download"),  # cannot be written
    ("--seed x", "seed"),
    ("--seed -1", "seed"),  # NumPy's and scikit-learn's seeds lie in [0, 2^32 - 1]
    ("--seed 4294967296", "seed"),
    ("--max_epochs 0", "max_epochs"),
    ("--max_epochs 1.5", "max_epochs"),
    ("--batch_size -8", "batch_size"),
    ("--lr fast", "lr"),
    ("--lr 0", "lr"),
    ("--lr nan", "lr"),
    ("--lr inf", "lr"),
    ("--lr -inf", "lr"),  # argparse reads a value that starts with '-' as a flag
    ("--lr=-1e-3", "lr"),
    ("--optimizer rmsprop", "optimizer"),
    ("--accelerator tpu", "accelerator"),
    ("--devices 0", "devices"),
    ("--devices 4096", "devices"),
    ("--strategy ddp_spawn", "strategy"),
    ("--num_nodes 0", "num_nodes"),
    ("--num_nodes 2", "num_nodes"),  # without MASTER_ADDR and MASTER_PORT no other node can join
    ("--precision 8-true", "precision"),
    ("--tracking_uri some/folder", "tracking_uri"),  # MLflow's file store, which MLflow refuses
    ("--tracking_uri http://127.0.0.1:9", "tracking_uri"),  # no server answers
    ("--resume maybe", "resume"),
    ("--system_metrics 2", "system_metrics"),
    ("--no_such_flag 1", "no_such_flag"),
    ("--max_epoch 3", "max_epoch"),  # no abbreviations: a flag is its parameter's name
]
# Flags that take any text: no value of theirs is bad input.
ANY_TEXT = {"experiment_name": "any MLflow experiment name", "study_name": "any Optuna study name"}

RANDOMIZATION = [
    ("--model alexnet", "model"),
    ("--model lenet --dataset mnist1d", "model"),  # a conv net on 1-D features
    ("--model xor_net", "model"),  # two classes of (2d,) inputs only
    ("--widths 0", "widths"),
    ("--widths 512,x", "widths"),
    ("--widths 100000000,100000000", "widths"),  # 10^16 weights: more than any machine's memory
    ("--conditions true_labels,rotated", "conditions"),
    ("--conditions true_labels,true_labels", "conditions"),
    ("--conditions '' --label_noise ''", "conditions"),  # nothing to run
    ("--label_noise 0,1.5", "label_noise"),
    ("--label_noise 0.2,0.2", "label_noise"),
    ("--fit_loss 0", "fit_loss"),
    ("--momentum 1", "momentum"),
    ("--momentum -0.5", "momentum"),
    ("--lr_decay 0", "lr_decay"),
    ("--lr_decay 1.5", "lr_decay"),
    ("--weight_decay=-1", "weight_decay"),
    ("--dropout 1", "dropout"),
    ("--model lenet --dropout 0.5", "dropout"),  # dropout is an option of the fc model
    ("--augment maybe", "augment"),
    ("--augment true --dataset mnist1d", "augment"),  # random crops need images
]

BN_SMOOTHNESS = [
    ("--model resnet18", "model"),
    ("--model small_vgg --dataset mnist1d", "model"),
    ("--variants ''", "variants"),
    ("--variants bn,batchnorm", "variants"),
    ("--variants bn,bn", "variants"),
    ("--lrs ''", "lrs"),
    ("--lrs 0.02,0", "lrs"),
    ("--lrs 0.02,0.02", "lrs"),
    ("--momentum 1", "momentum"),
    ("--noise_scale=-1", "noise_scale"),
    ("--variants shifted_bn --noise_scale 2", "noise_scale"),
    ("--probe_every 0", "probe_every"),
    ("--etas ''", "etas"),
    ("--etas 0", "etas"),
    ("--etas 1,1", "etas"),
    ("--ics_layers 0", "ics_layers"),  # layer 0 has no earlier layer
    ("--ics_layers 99", "ics_layers"),
    ("--ics_layers 2,2", "ics_layers"),
    ("--activation_layer 99", "activation_layer"),
]

LOTTERY_TICKET = [
    ("--model alexnet", "model"),
    ("--model conv2 --dataset mnist1d", "model"),
    ("--model lenet --dataset digits", "model"),  # lenet needs 12x12 inputs
    ("--rounds 0", "rounds"),
    ("--rounds 500", "rounds"),  # after 42 rounds a layer of lenet_300_100 keeps 2 weights: round(0.2 x 2) = 0
    ("--fc_rate 0.9 --rounds 10", "rounds"),  # no weight left in a layer
    ("--conv_rate=-0.1", "conv_rate"),
    ("--conv_rate 1", "conv_rate"),
    ("--fc_rate 0", "fc_rate"),
    ("--fc_rate 1", "fc_rate"),
    ("--output_rate 1.5", "output_rate"),
    ("--pruning random", "pruning"),
    ("--rewind_step -1", "rewind_step"),
    ("--rewind_step 100000", "rewind_step"),  # beyond the trainings' iterations
    ("--controls random_reinit,shuffle", "controls"),
    ("--controls random_reinit,random_reinit", "controls"),
    ("--seeds 0", "seeds"),
    ("--val_fraction 1", "val_fraction"),
    ("--val_fraction 0.0001", "val_fraction"),  # no validation example: early stopping has nothing to read
    ("--val_every 0", "val_every"),
    ("--val_every 100000", "val_every"),
]

MEMORIZATION = [
    ("--model alexnet", "model"),
    ("--model lenet --dataset mnist1d --regularizers ''", "model"),
    ("--widths=-1", "widths"),
    ("--train_subset -1", "train_subset"),
    ("--train_subset 100000", "train_subset"),  # mnist5k has 4,000
    ("--noise_kinds randZ", "noise_kinds"),
    ("--noise_kinds randY,randY", "noise_kinds"),
    ("--noise_levels=-0.1", "noise_levels"),
    ("--noise_levels 0.2,0.2", "noise_levels"),
    ("--noise_kinds '' --regularizers ''", "noise_levels"),  # nothing to run
    ("--fit_acc 0", "fit_acc"),
    ("--fit_acc 1.5", "fit_acc"),
    ("--momentum 1", "momentum"),
    ("--csr_examples -1", "csr_examples"),
    ("--csr_every 0", "csr_every"),
    ("--csr_iterations 0", "csr_iterations"),
    ("--csr_radius=-1", "csr_radius"),
    ("--csr_step=-1", "csr_step"),
    ("--csr_noise=-1", "csr_noise"),
    ("--regularizers dropout,mixup", "regularizers"),
    ("--regularizers dropout,dropout", "regularizers"),
    ("--model lenet --regularizers dropout", "regularizers"),
    ("--dropout_rates 1", "dropout_rates"),
    ("--regularizers dropout --dropout_rates ''", "dropout_rates"),  # a regularizer without a strength
    ("--weight_decays=-1", "weight_decays"),
    ("--weight_decays 0.001,0.001", "weight_decays"),
    ("--input_noise_stds=-1", "input_noise_stds"),
    ("--regularizer_noise randZ", "regularizer_noise"),
    ("--regularizer_epochs 0", "regularizer_epochs"),
    ("--val_fraction 0", "val_fraction"),
    ("--train_subset 2 --val_fraction 0.2", "val_fraction"),  # rounds to no validation example
]

LAYER_ROBUSTNESS = [
    ("--model alexnet", "model"),
    ("--model lenet --dataset digits", "model"),
    ("--widths 0", "widths"),
    ("--widths 100000000,100000000", "widths"),
    ("--norm layernorm", "norm"),
    ("--norm bn", "norm"),  # the fc model takes no norm
    ("--momentum 1", "momentum"),
    ("--checkpoints 0,1,50 --max_epochs 30", "checkpoints"),  # a checkpoint past --max_epochs
    ("--checkpoints 1,2", "checkpoints"),  # no epoch 0
    ("--checkpoints 0,2,1", "checkpoints"),
    ("--probe_every -1", "probe_every"),
    ("--robust_margin=-0.1", "robust_margin"),
    ("--bn_stats keep", "bn_stats"),
    ("--depths 0", "depths"),
    ("--depths 2,2", "depths"),
    ("--depths 100000000", "depths"),  # 10^8 layers of 256 x 256 weights
    ("--depth_width 0", "depth_width"),
]

XOR = [
    ("--dataset mnist5k", "dataset"),
    ("--d 0", "d"),
    ("--d 11", "d"),
    ("--train_size 1", "train_size"),
    ("--ks ''", "ks"),
    ("--ks 0", "ks"),
    ("--ks 2,2", "ks"),
    ("--ks 1000000000000000", "ks"),  # 4 x 10^15 filter weights
    ("--seeds 0", "seeds"),
    ("--init_std 0", "init_std"),
    ("--passes_per_epoch 0", "passes_per_epoch"),
    ("--patience 0", "patience"),
    ("--clustering_init maybe", "clustering_init"),
    ("--large_k 2 --small_k 2", "large_k"),
    ("--small_k 0", "small_k"),
]

DESCRIPTION_LENGTH = [
    ("--model alexnet", "model"),
    ("--model lenet", "model"),  # on 8x8 digits
    ("--widths 0", "widths"),
    ("--chunks ''", "chunks"),
    ("--chunks 0,1", "chunks"),
    ("--chunks 0.5,0.25,1", "chunks"),
    ("--chunks 0.25,0.5", "chunks"),  # must end at the whole training set
    ("--labels ''", "labels"),
    ("--labels true,fake", "labels"),
    ("--labels true,true", "labels"),
    ("--examples -1", "examples"),
    ("--examples 100000", "examples"),  # digits has 1,437
    ("--holdout 0", "holdout"),
    ("--holdout 1", "holdout"),
    ("--patience 0", "patience"),
]

DOUBLE_DESCENT = [
    ("--methods ''", "methods"),
    ("--methods rff,svm", "methods"),
    ("--methods rff,rff", "methods"),
    ("--n 1", "n"),
    ("--n 4001", "n"),
    ("--dataset digits --n 2000", "n"),
    ("--sigma=-1", "sigma"),
    ("--rff_features ''", "rff_features"),
    ("--rff_features 0", "rff_features"),
    ("--rff_features 1,1", "rff_features"),
    ("--rff_features 1000000000", "rff_features"),  # 10^12 features of 2,000 points
    ("--methods nn --nn_parameters ''", "nn_parameters"),
    ("--nn_parameters 0.5,-1", "nn_parameters"),
    ("--nn_parameters 1000000000", "nn_parameters"),  # a net of 10^13 parameters
    ("--weight_reuse maybe", "weight_reuse"),
    ("--forest_leaves 0,0.5", "forest_leaves"),
    ("--forest_leaves 0.1,0.1", "forest_leaves"),
    ("--methods forest --forest_leaves '' --forest_trees ''", "forest_leaves"),
    ("--forest_trees 0", "forest_trees"),
    ("--forest_trees 2,2", "forest_trees"),
    ("--momentum 1", "momentum"),
]

INTRINSIC_DIM = [  # on digits: fc 64-200-200-10, D = 55,210
    ("--mode grid", "mode"),
    ("--model resnet18", "model"),
    ("--model lenet", "model"),  # lenet needs 12x12 inputs
    ("--model lenet --dataset mnist1d", "model"),
    ("--widths 0", "widths"),
    ("--widths 100000000,100000000", "widths"),
    ("--projection gaussian", "projection"),
    ("--projection dense --widths 20000,20000", "projection"),  # d x D = 5,000 x 4 x 10^8 numbers
    ("--corruption noise", "corruption"),
    ("--val_fraction 1", "val_fraction"),
    ("--val_fraction 0", "val_fraction"),  # the criterion is validation accuracy
    ("--val_fraction 0.0001", "val_fraction"),  # rounds to no validation example
    ("--threshold 0", "threshold"),
    ("--threshold 1.5", "threshold"),
    ("--reference 1.5", "reference"),
    ("--baseline_lr 0", "baseline_lr"),
    ("--d_min 0", "d_min"),
    ("--d_min 500 --d_max 100", "d_min"),
    ("--d_max 100000", "d_max"),  # above D
    ("--d_min 100 --d_max 105", "d_max"),  # within --resolution 0.1: no d to try
    ("--mode architectures --arch_widths 10 --d_max 1000", "d_max"),  # above the smallest net's D = 760
    ("--resolution 0", "resolution"),
    ("--seeds 0", "seeds"),
    ("--storage sqlite:////no/such/folder/optuna.db", "storage"),
    ("--workers 0", "workers"),
    ("--workers 2 --mode sweep", "workers"),
    ("--mode sweep --ds ''", "ds"),
    ("--mode sweep --ds 100000", "ds"),  # above D
    ("--ds 100,100", "ds"),
    ("--mode efficiency --direct_widths ''", "direct_widths"),
    ("--mode efficiency --direct_widths 5000", "direct_widths"),  # a direct net larger than D
    ("--direct_widths 0", "direct_widths"),
    ("--mode architectures --arch_widths ''", "arch_widths"),
    ("--arch_widths 50,50", "arch_widths"),
    ("--mode architectures --arch_depths 1 --arch_widths 10000000000", "arch_widths"),
    ("--mode architectures --arch_depths ''", "arch_depths"),
    ("--arch_depths 0", "arch_depths"),
    ("--mode architectures --arch_depths 100000000", "arch_depths"),  # 10^8 layers of 200 x 200 weights
]

TABLES = {"randomization": COMMON + RANDOMIZATION, "bn_smoothness": BN_SMOOTHNESS, "lottery_ticket": LOTTERY_TICKET,
          "memorization": MEMORIZATION, "layer_robustness": LAYER_ROBUSTNESS, "xor": XOR,
          "description_length": DESCRIPTION_LENGTH, "double_descent": DOUBLE_DESCENT,
          "intrinsic_dim": [(f"--dataset digits {flags}", flag) for flags, flag in INTRINSIC_DIM]}
NOT_YET = {"reading_group"}  # written in parallel (session 5): its table comes with it

CASES = [(name, flags, flag) for name, table in TABLES.items() for flags, flag in table]


@pytest.mark.parametrize("name, flags, flag", CASES, ids=[f"{name}: {flags}" for name, flags, _ in CASES])
def test_bad_input_is_one_line_naming_the_flag_exit_2_and_no_run(refused, monkeypatch, name, flags, flag):
    for opt_in in ("MLFLOW_ALLOW_FILE_STORE", "MASTER_ADDR", "MASTER_PORT"):  # what would make a case good input
        monkeypatch.delenv(opt_in, raising=False)
    assert f"error: --{flag}: " in refused(name, *shlex.split(flags))


def test_a_stray_value_is_refused_in_one_line(refused):
    assert "unrecognized arguments: 3" in refused("xor", "--ks", "2", "3")


def test_every_flag_has_a_case():
    """A flag counts as covered when a case's error names it; common flags once, in COMMON."""
    assert set(TABLES) == set(NAMES) - NOT_YET
    named = lambda table: {flag for _, flag in table}
    common = {f.name for f in dataclasses.fields(CommonParams)}
    assert common - named(COMMON) - set(ANY_TEXT) == set()
    every = set()
    for name in TABLES:
        flags = {f.name for f in dataclasses.fields(load(name).Params)}
        assert flags - common - named(TABLES[name]) - set(ANY_TEXT) == set(), name
        every |= flags
    assert set(ANY_TEXT) <= every  # no stale exemption
