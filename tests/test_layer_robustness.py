"""Tests for the rewind probe and the `layer_robustness` entry point (Zhang, Bengio & Singer)."""
import json
import math

import lightning as L
import pytest
import torch

from callbacks.rewind_probe import (RewindProbe, batchnorms, error_rate, layer_state, layers, load_layer_state,
                                    reestimate_batchnorm, rerandomized_state)
from datamodules.datamodule import ArrayDataModule
from modules.classifier import ClassifierModule, predictions
from modules.nets import build_net
from pipelines.training import Hardware, TrainJob, fit

MNIST = (1, 28, 28)


def _trained(dataset: str, epochs: int, seed: int, checkpoints: tuple, model: str = "fc", **options):
    """(probe, trained net, data splits, initial state) of a net trained in-process with the probe."""
    datamodule = ArrayDataModule(dataset, seed=seed, eval_splits=("test",))
    datamodule.setup()
    L.seed_everything(seed, verbose=False)
    net = build_net(model, datamodule.input_shape, datamodule.num_classes, **options)
    initial = {k: v.clone() for k, v in net.state_dict().items()}
    probe = RewindProbe(checkpoints, seed=seed)
    job = fit(TrainJob(ClassifierModule(net, eval_splits=("test",)), datamodule, Hardware(), epochs, seed, [probe]))
    return probe, job.module.net, datamodule.splits, initial


def test_layers_are_the_parameterized_modules_in_forward_order():
    assert list(layers(build_net("fc", MNIST, 10, widths=(256, 256, 256)))) == ["fc1", "fc2", "fc3", "fc4"]
    assert list(layers(build_net("vgg11", (3, 32, 32), 10))) == [f"conv{i}" for i in range(1, 9)] + ["fc1"]
    resnet = layers(build_net("resnet18", (3, 32, 32), 10))
    names = list(resnet)
    # stem, 2 convs per block x 8 blocks, 3 shortcut convs, classifier
    assert len(names) == 1 + 16 + 3 + 1 and names[0] == "conv1" and names[-1] == "fc"
    assert names[1:4] == ["layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1"]
    assert names.index("layer2.0.shortcut.0") == names.index("layer2.0.conv2") + 1
    # a BatchNorm belongs to the conv before it
    assert [type(m).__name__ for m in resnet["conv1"]] == ["Conv2d", "BatchNorm2d"]
    assert [type(m).__name__ for m in resnet["layer2.0.shortcut.0"]] == ["Conv2d", "BatchNorm2d"]


@pytest.mark.parametrize("name, shape, layer, fan_in", [("fc", MNIST, "fc1", 784), ("fc", MNIST, "fc2", 256),
                                                        ("lenet", MNIST, "conv2", 6 * 5 * 5)])
def test_rerandomization_draws_from_the_layers_own_initializer(name, shape, layer, fan_in):
    torch.manual_seed(0)  # the seed that drew the initial weights, as in the pipeline with --seed 0
    modules = layers(build_net(name, shape, 10, widths=(256, 256)) if name == "fc" else build_net(name, shape, 10))[layer]
    initial = layer_state(modules)[0]
    probe = RewindProbe(seed=0)
    fresh = rerandomized_state(modules, probe.rerandomize_seed(0))[0]
    bound = 1 / math.sqrt(fan_in)  # PyTorch's default: kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    for key in ("weight", "bias"):
        assert fresh[key].abs().max() <= bound and fresh[key].min() < 0 < fresh[key].max()
    assert fresh["weight"].min() < -0.99 * bound and fresh["weight"].max() > 0.99 * bound  # fills the whole range
    assert fresh["weight"].std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert fresh["weight"].mean().abs() < 0.05 * bound  # not uniform [0, 1)
    assert not torch.allclose(fresh["weight"], initial["weight"])  # a new draw, not the epoch-0 values
    assert torch.equal(fresh["weight"], rerandomized_state(modules, probe.rerandomize_seed(0))[0]["weight"])
    assert not torch.equal(fresh["weight"], rerandomized_state(modules, probe.rerandomize_seed(1))[0]["weight"])


def test_rerandomization_resets_the_batchnorm_of_a_layer():
    conv_bn = layers(build_net("resnet18", (3, 32, 32), 10))["conv1"]
    conv_bn[1].running_mean.fill_(3.0)
    conv_bn[1].weight.data.fill_(2.0)
    conv, bn = rerandomized_state(conv_bn, 7)
    assert torch.equal(bn["weight"], torch.ones(64)) and torch.equal(bn["running_mean"], torch.zeros(64))
    assert conv["weight"].abs().max() <= 1 / math.sqrt(3 * 9)


def test_reinit_restores_the_checkpoint_and_probing_never_changes_the_trained_net():
    probe, net, splits, initial = _trained("digits", 3, 0, (0, 1), widths=(32, 32))
    x, y = splits["test"]
    assert sorted(probe.states) == [0, 1, 3]  # + the final epoch
    kept = probe.states[0]
    assert torch.equal(kept["fc1"][0]["weight"], initial["1.weight"])  # epoch 0 = before any update
    assert torch.equal(probe.states[3]["fc2"][0]["weight"], net[3].weight)  # the final epoch = the trained net
    before = {k: v.clone() for k, v in net.state_dict().items()}
    result = probe.probe(net, (x, y), 3)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # the trained net is untouched
    assert result["baseline_error"] == error_rate(net, x, y)
    for name in ("fc1", "fc3"):  # re-init to epoch 0 = exactly the layer's initial values, the others trained
        copy_ = build_net("fc", (1, 8, 8), 10, widths=(32, 32))
        copy_.load_state_dict(before)
        load_layer_state(layers(copy_)[name], kept[name])
        assert torch.equal(layers(copy_)[name][0].weight, kept[name][0]["weight"])
        assert result["reinit"][name][0] == error_rate(copy_, x, y)
        assert result["reinit"][name][3] == result["baseline_error"]  # rewinding to the final epoch changes nothing
    assert probe.distance["fc1"][0] == 0 and probe.distance["fc1"][3] > probe.distance["fc1"][1] > 0


def _bn_net_moved_from_its_kept_epoch_0():
    """(small_vgg with BatchNorm, a probe that kept it at epoch 0); then every parameter and BatchNorm
    statistic moves, a stand-in for training."""
    torch.manual_seed(0)
    net = build_net("small_vgg", (1, 8, 8), 10, norm="bn")
    probe = RewindProbe((0,), bn_stats="rewind")
    probe._keep(net, 0)
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.add_(0.05)
        for module in batchnorms(net):
            module.running_mean.fill_(0.5)
    return net, probe


@pytest.mark.parametrize("bn_stats", ["rewind", "recompute"])
def test_a_conv_and_its_batchnorm_are_rewound_together_on_the_probes_copy(bn_stats):
    net, probe = _bn_net_moved_from_its_kept_epoch_0()
    probe.bn_stats = bn_stats
    assert list(layers(net)) == ["conv1", "conv2", "conv3", "conv4", "fc1", "fc2"]
    x, train_x = torch.randn(64, 1, 8, 8), torch.randn(300, 1, 8, 8) + 1
    y = predictions(net.eval()(x)).detach()  # labels the net gets right: a changed layer shows
    before = {k: v.clone() for k, v in net.state_dict().items()}
    result = probe.probe(net, (x, y), 1, train_x)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # statistics included
    assert result["bn_stats"] == bn_stats
    for name in ("conv2", "fc2"):
        rewound = build_net("small_vgg", (1, 8, 8), 10, norm="bn")
        rewound.load_state_dict(before)
        load_layer_state(layers(rewound)[name], probe.states[0][name])
        bn = layers(rewound)["conv2"][1]
        if bn_stats == "rewind":  # the statistics as loaded: conv2's BatchNorm back to mean 0 with it, else stale
            assert torch.equal(bn.running_mean, torch.full((32,), 0.0 if name == "conv2" else 0.5))
        else:
            reestimate_batchnorm(rewound, train_x)  # neither epoch 0's 0 nor the stale 0.5
            assert bn.running_mean.abs().min() > 0 and (bn.running_mean - 0.5).abs().min() > 0
        assert result["reinit"][name][0] == error_rate(rewound, x, y)


def test_reestimated_batchnorm_statistics_are_those_of_the_training_inputs():
    """One batch: each BatchNorm's running mean and (unbiased) variance are exactly its input's, the
    earlier BatchNorms normalizing by batch statistics; in equal batches the mean is still exact."""
    net, _ = _bn_net_moved_from_its_kept_epoch_0()
    parameters = [p.clone() for p in net.parameters()]
    train_x = 2 * torch.randn(300, 1, 8, 8) + 1
    conv1, bn1 = layers(net)["conv1"]
    conv2, bn2 = layers(net)["conv2"]
    with torch.no_grad():
        h1 = conv1(train_x)
        h2 = conv2(torch.relu(torch.nn.functional.batch_norm(h1, None, None, bn1.weight, bn1.bias, training=True)))
    for batch_size, exact_var in ((300, True), (100, False)):
        net.train()  # the re-estimation must leave the whole net in eval mode, momentum back
        reestimate_batchnorm(net, train_x, batch_size=batch_size)
        for bn, h in ((bn1, h1), (bn2, h2)):
            assert torch.allclose(bn.running_mean, h.mean(dim=(0, 2, 3)), rtol=1e-4)
            if exact_var:
                assert torch.allclose(bn.running_var, h.var(dim=(0, 2, 3)), rtol=1e-4)
        assert not any(m.training for m in net.modules()) and all(bn.momentum == 0.1 for bn in batchnorms(net))
    assert all(torch.equal(p, q) for p, q in zip(parameters, net.parameters()))  # only the statistics change
    noisy = build_net("small_vgg", (1, 8, 8), 10, norm="noisy_bn")  # eval mode has no noise: nor has re-estimation
    means = []
    for _ in range(2):
        reestimate_batchnorm(noisy, train_x)
        means.append(torch.cat([bn.running_mean for bn in batchnorms(noisy)]))
    assert torch.equal(*means)


def test_batchnorm_nets_rewound_to_epoch_0_are_judged_with_recomputed_statistics():
    """small_vgg + BN on digits, 4 epochs: re-initializing conv2 to epoch 0 gives test error 0.036 with
    the statistics recomputed (the default; trained net 0.028) and 0.589 with them rewound (its
    BatchNorm back to mean 0 and variance 1 stops normalizing in eval mode). Seeds 1, 2: 0.036 and
    0.031 against 0.897 and 0.631 (trained 0.017, 0.019)."""
    probe, net, splits, _ = _trained("digits", 4, 0, (0,), model="small_vgg", norm="bn")
    result = probe.result
    assert result["bn_stats"] == "recompute" and result["baseline_error"] < 0.05
    assert result["reinit"]["conv2"][0] - result["baseline_error"] < 0.05, result["reinit"]
    assert min(result["rerandomize"].values()) > 0.5  # recomputed statistics do not rescue a redrawn layer
    probe.bn_stats = "rewind"
    stale = probe.probe(net, splits["test"], 4)
    assert stale["reinit"]["conv2"][0] > 0.3, stale["reinit"]


def test_paper_pattern_first_layer_critical_rerandomization_destroys():
    """FCN 3x256 on mnist5k, 5 epochs, 3 seeds: re-randomizing any layer gives near-chance error
    (0.82-0.97 measured; chance 0.9); re-initializing the first layer to epoch 0 costs 0.29-0.33
    test error, the last hidden layer 0.10-0.12 (baseline 0.11)."""
    for seed in (0, 1, 2):
        probe, _, _, _ = _trained("mnist5k", 5, seed, (0,), widths=(256, 256, 256))
        result = probe.result
        assert result["baseline_error"] < 0.15
        assert min(result["rerandomize"].values()) > 0.7, (seed, result["rerandomize"])
        first, last_hidden = result["reinit"]["fc1"][0], result["reinit"]["fc3"][0]
        assert first - last_hidden > 0.1, (seed, first, last_hidden)
        assert last_hidden - result["baseline_error"] < 0.03, (seed, last_hidden, result["baseline_error"])


def _check_cli_run(outcome, layer_names, checkpoints):
    assert outcome.exit_code == 0
    summary = outcome.summary()
    assert set(summary) >= {"baseline_error", "reinit", "rerandomize", "robust_layers"}
    assert list(summary["reinit"]) == layer_names and list(summary["rerandomize"]) == layer_names
    assert all(list(errors) == checkpoints for errors in summary["reinit"].values())
    for name, errors in summary["reinit"].items():
        assert errors[checkpoints[-1]] == summary["baseline_error"]  # the final epoch is the trained net
    return summary


def test_cli_end_to_end_summary_heatmap_table_and_depth_sweep(run_pipeline):
    outcome = run_pipeline("layer_robustness", "--dataset", "digits", "--max_epochs", "3", "--checkpoints", "0,1",
                           "--probe_every", "2", "--widths", "32,32", "--depth_width", "32", "--depths", "1,2")
    summary = _check_cli_run(outcome, ["fc1", "fc2", "fc3"], ["0", "1", "3"])
    assert set(summary) == {"baseline_error", "reinit", "rerandomize", "robust_layers", "bn_stats", "depth_sweep"}
    assert summary["bn_stats"] == "none"  # no BatchNorm in an FCN: nothing to recompute
    assert summary["robust_layers"] == [n for n, e in summary["reinit"].items() if e["0"] <= summary["baseline_error"] + 0.02]
    assert list(summary["depth_sweep"]) == ["1", "2"]
    assert summary["depth_sweep"]["2"]["robust_layers"] == summary["robust_layers"]  # the default net is reused
    assert len(outcome.children) == 2  # depth 2 with width 32 is the default net: trained once
    assert {"figures/heatmap_fc.png", "figures/fig5_robust_share_vs_depth.png", "summary.json"} <= set(outcome.artifact_paths())
    child = next(c for c in outcome.children if c.info.run_name == "fc widths=32,32")
    assert {"figures/heatmap.png", "layer_robustness_table.json"} <= set(outcome.artifact_paths(child.info.run_id))
    table = json.load(open(outcome.client.download_artifacts(child.info.run_id, "layer_robustness_table.json")))
    assert len(table["data"]) == 3 * (2 + 1) + 3 * (3 + 1)  # probe at epoch 2 (checkpoints 0, 1) and at the end (+3)
    history = outcome.client.get_metric_history(child.info.run_id, "reinit_error/fc1/epoch_0")
    assert [m.step for m in history] == [2, 3]
    assert child.data.metrics["baseline_error"] == summary["baseline_error"]
    assert child.data.metrics["test_acc"] == pytest.approx(1 - summary["baseline_error"])


def test_cli_batchnorm_net_reports_its_statistics_mode(run_pipeline):
    outcome = run_pipeline("layer_robustness", "--dataset", "digits", "--model", "small_vgg", "--norm", "bn",
                           "--max_epochs", "1", "--checkpoints", "0", "--bn_stats", "rewind")
    summary = _check_cli_run(outcome, ["conv1", "conv2", "conv3", "conv4", "fc1", "fc2"], ["0", "1"])
    assert summary["bn_stats"] == "rewind"
    assert "figures/heatmap_small_vgg.png" in outcome.artifact_paths()


def test_cli_ddp_probes_once_on_rank_zero(run_pipeline):
    outcome = run_pipeline("layer_robustness", "--dataset", "digits", "--max_epochs", "2", "--checkpoints", "0,1",
                           "--widths", "32", "--devices", "2", "--strategy", "ddp", "--accelerator", "cpu")
    summary = _check_cli_run(outcome, ["fc1", "fc2"], ["0", "1", "2"])
    (child,) = outcome.children
    assert child.data.metrics["test_acc"] == pytest.approx(1 - summary["baseline_error"])
    assert [m.step for m in outcome.client.get_metric_history(child.info.run_id, "baseline_error")] == [2]


@pytest.mark.parametrize("flags, message", [
    (("--checkpoints", "0,5,3"), "--checkpoints: must be strictly increasing, got 0,5,3"),
    (("--checkpoints", "0,1,1"), "--checkpoints: must be strictly increasing"),
    (("--checkpoints", "0,1,50", "--max_epochs", "30"), "--checkpoints: epochs must lie in [0, --max_epochs=30]"),
    (("--checkpoints", "0,5,10", "--max_epochs", "8"), "--checkpoints: epochs must lie in [0, --max_epochs=8]"),
    (("--checkpoints", "1,2"), "--checkpoints: must include 0"),
    (("--robust_margin", "-0.1"), "--robust_margin"),
    (("--norm", "bn"), "--norm"),
    (("--bn_stats", "stale"), "--bn_stats: unknown value 'stale'; choose from recompute, rewind"),
])
def test_bad_input_is_one_line_naming_the_flag(refused, flags, message):
    assert message in refused("layer_robustness", *flags)
