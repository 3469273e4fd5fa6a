"""Tests for the magnitude-prune-and-rewind callback: mask semantics, rates, rewinding, checkpoints (DDP: test_examples.py)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from callbacks.prune_rewind import (EarlyStopTrace, PruneRates, PruneRewind, apply, layer_kinds, magnitude_masks, masks,
                                    prepare, prunable_layers, random_masks, sparsity_report, theta)
from datamodules.datamodule import ArrayDataModule
from modules.classifier import ClassifierModule
from modules.nets import build_net
from pipelines.training import Hardware, TrainJob, fit, make_trainer


def small_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return prepare(build_net("fc", (1, 8, 8), 10, widths=(40, 30)))  # 2560 + 1200 + 300 weights


def small_conv_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return prepare(build_net("small_vgg", (1, 8, 8), 10))  # conv 288, 9216, 18432, 36864; fc 65536; output 2560


LENET_RATES = PruneRates(fc=0.2, output=0.1)  # Frankle & Carbin's LeNet: fc 20%, output 10% (half)


def counts(mask_dict) -> dict[str, int]:
    return {name: int(m.sum().item()) for name, m in mask_dict.items()}


@pytest.mark.parametrize("fused", [None, True])  # torch's default Adam, and the fused one the pipeline uses
def test_pruned_weights_gradients_and_adam_state_stay_zero(fused):
    net = small_net()
    theta_0 = theta(net)
    apply(net, magnitude_masks(net, 0.5), theta_0)
    pruned = {name: m == 0 for name, m in masks(net).items()}
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2, weight_decay=0.1, fused=fused)  # decay revives nonzeros
    x, y = torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,))
    for _ in range(20):
        optimizer.zero_grad()
        F.cross_entropy(net(x), y).backward()
        optimizer.step()
    net(x)  # recompute the effective weights from the trained parameters
    for name, layer in prunable_layers(net).items():
        where = pruned[name]
        assert where.any() and (~where).any()
        assert torch.equal(layer.weight[where], torch.zeros(int(where.sum())))
        assert torch.equal(layer.weight_orig[where], torch.zeros(int(where.sum())))
        assert torch.equal(layer.weight_orig.grad[where], torch.zeros(int(where.sum())))
        state = optimizer.state[layer.weight_orig]
        assert not state["exp_avg"][where].any() and not state["exp_avg_sq"][where].any()
        assert layer.weight_orig[~where].ne(theta_0[f"{name}.weight_orig"][~where]).all()  # survivors did train
        assert torch.equal(layer.weight_mask == 0, where)  # training never touches the mask


def test_biases_and_batchnorm_are_never_pruned():
    torch.manual_seed(0)
    net = prepare(build_net("small_vgg", (3, 16, 16), 10, norm="bn"))
    masked = {k for k in net.state_dict() if k.endswith("_mask")}
    assert masked == {f"{name}.weight_mask" for name, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    before = theta(net)
    apply(net, magnitude_masks(net, 0.5), before)
    after = net.state_dict()
    for key, value in before.items():
        if not key.endswith("weight_orig"):  # biases, BatchNorm weights, biases and running statistics
            assert torch.equal(after[key], value), key


def test_layerwise_rates_and_output_layer_at_half_rate():
    net = small_net()
    first = magnitude_masks(net, LENET_RATES, "layerwise")
    assert counts(first) == {"1": 2048, "3": 960, "5": 270}  # 20% of 2560 and 1200, 10% of 300 pruned
    for name, layer in prunable_layers(net).items():  # the pruned ones are the smallest by magnitude
        w, keep = layer.weight_orig.abs(), first[name].bool()
        assert w[~keep].max() <= w[keep].min()
    apply(net, first, theta(net))
    second = magnitude_masks(net, LENET_RATES, "layerwise")
    assert counts(second) == {"1": 1638, "3": 768, "5": 243}  # of the survivors, not of the dense layer
    assert all(torch.all(second[n] <= first[n]) for n in first)  # a pruned weight stays pruned
    full = magnitude_masks(small_net(), 0.2, "layerwise")  # one rate for every layer, the output too
    assert counts(full) == {"1": 2048, "3": 960, "5": 240}


def test_layer_kinds_conv_fc_and_the_last_layer_as_output():
    assert layer_kinds(small_conv_net()) == {"0.0": "conv", "0.2": "conv", "0.5": "conv", "0.7": "conv",
                                             "1.1": "fc", "1.3": "output"}
    assert layer_kinds(build_net("resnet18", (3, 8, 8), 10))["fc"] == "output"  # a net with no fc hidden layer
    assert set(layer_kinds(small_net()).values()) == {"fc", "output"}


def test_each_layer_kind_loses_its_own_rate():
    """Frankle & Carbin's Conv-6: conv layers at 15% per round, fully connected at 20%, the output at 10%."""
    net = small_conv_net()
    rates = PruneRates(conv=0.15, fc=0.2, output=0.1)
    kept = counts(magnitude_masks(net, rates))
    assert kept == {"0.0": 245, "0.2": 7834, "0.5": 15667, "0.7": 31334, "1.1": 52429, "1.3": 2304}  # 85/85/85/85/80/90%
    apply(net, magnitude_masks(net, rates), theta(net))
    report = sparsity_report(net, rates)
    assert [report[n]["kind"] for n in ("0.0", "1.1", "1.3")] == ["conv", "fc", "output"]
    assert [report[n]["prune_rate"] for n in ("0.0", "1.1", "1.3")] == [0.15, 0.2, 0.1]
    assert report["0.7"]["percent_remaining"] == pytest.approx(85.0, abs=0.01)
    assert "prune_rate" not in report["total"] and "kind" not in sparsity_report(net)["0.0"]


@pytest.mark.parametrize("kind", ["conv", "fc", "output"])
@pytest.mark.parametrize("rate", [0.0, 1.0, -0.1, 1.5])
def test_rates_outside_0_1_are_refused(kind, rate):
    with pytest.raises(ValueError, match=f"{kind} rate"):
        PruneRates(**{kind: rate})


def test_global_pruning_ranks_hidden_layers_together():
    net = small_net()
    with torch.no_grad():  # a layer of weights all larger than the others' loses none
        big = prunable_layers(net)["3"].weight_orig
        big.copy_(big.sign() * (1 + big.abs()))
    new = magnitude_masks(net, LENET_RATES, "global")
    kept = counts(new)
    assert kept["1"] + kept["3"] == 3760 - 752 and kept["5"] == 270  # 20% of the hidden weights, 10% of the output
    assert kept["3"] == 1200 and kept["1"] == 2560 - 752
    layers = prunable_layers(net)
    pruned = torch.cat([layers[n].weight_orig.abs()[new[n] == 0] for n in ("1", "3")])
    surviving = torch.cat([layers[n].weight_orig.abs()[new[n] == 1] for n in ("1", "3")])
    assert pruned.max() <= surviving.min()  # one threshold across the hidden layers


def test_global_pruning_ranks_each_kind_apart_at_its_rate():
    net = small_conv_net()
    with torch.no_grad():  # conv weights far larger than the fc ones: ranked together, the fc layer would lose it all
        for name, layer in prunable_layers(net).items():
            if name.startswith("0."):
                layer.weight_orig.mul_(100)
    kept = counts(magnitude_masks(net, PruneRates(conv=0.1, fc=0.2, output=0.1), "global"))
    conv = ("0.0", "0.2", "0.5", "0.7")
    assert sum(kept[n] for n in conv) == 64800 - 6480 and kept["1.1"] == 65536 - 13107 and kept["1.3"] == 2304


def test_random_masks_keep_per_layer_sparsity_and_are_seeded():
    net = small_net()
    apply(net, magnitude_masks(net, 0.6), theta(net))
    ticket = {k: m.clone() for k, m in masks(net).items()}
    drawn = random_masks(ticket, seed=7)
    assert counts(drawn) == counts(ticket)
    assert not torch.equal(drawn["1"], ticket["1"])
    assert all(torch.equal(drawn[k], v) for k, v in random_masks(ticket, seed=7).items())
    assert not torch.equal(random_masks(ticket, seed=8)["1"], drawn["1"])


def test_sparsity_report_counts_weights_only():
    net = small_net()
    apply(net, magnitude_masks(net, LENET_RATES), theta(net))
    report = sparsity_report(net)
    assert report["total"] == {"weights": 4060, "remaining": 2048 + 960 + 270,
                               "percent_remaining": pytest.approx(100 * 3278 / 4060)}
    assert report["5"]["percent_remaining"] == pytest.approx(90.0)


def digits_job(module, callbacks, max_epochs=1, max_steps=-1) -> TrainJob:
    datamodule = ArrayDataModule("digits", batch_size=64, seed=0, val_fraction=0.1)
    return TrainJob(module, datamodule, Hardware(), max_epochs, 0, callbacks, max_steps=max_steps)


def test_callback_prunes_and_rewinds_survivors_to_theta_k_exactly():
    pruner = PruneRewind(PruneRates(fc=0.5, output=0.25), rewind_step=3)
    module = ClassifierModule(small_net(), optimizer="adam", lr=1e-2)
    job = fit(digits_job(module, [pruner]))
    # theta_k is the net after exactly 3 iterations: train an identical net for 3 steps
    reference = ClassifierModule(small_net(), optimizer="adam", lr=1e-2)
    fit(digits_job(reference, [], max_steps=3))
    assert all(torch.equal(pruner.theta_k[k], v) for k, v in theta(reference.net).items())
    assert not torch.equal(pruner.theta_k["1.weight_orig"], pruner.theta_0["1.weight_orig"])
    net = job.module.net
    for name, layer in prunable_layers(net).items():
        keep = layer.weight_mask.bool()
        assert 0 < keep.sum() < keep.numel()
        assert torch.equal(layer.weight_orig[keep], pruner.theta_k[f"{name}.weight_orig"][keep])
        assert not layer.weight_orig[~keep].any()
        assert torch.equal(layer.bias, pruner.theta_k[f"{name}.bias"])
    assert counts(masks(net)) == {"1": 1280, "3": 600, "5": 225}  # output layer at half rate


def test_masks_survive_checkpoint_and_resume_into_fresh_module(tmp_path):
    module = ClassifierModule(small_net(), optimizer="adam", lr=1e-2)
    job = digits_job(module, [PruneRewind(PruneRates(fc=0.5))])
    trainer = make_trainer(job)
    trainer.fit(module, datamodule=job.datamodule)
    saved_masks = {k: m.clone() for k, m in masks(module.net).items()}
    path = str(tmp_path / "ticket.ckpt")
    trainer.save_checkpoint(path)

    state = torch.load(path, weights_only=False)["state_dict"]
    plain = ClassifierModule(build_net("fc", (1, 8, 8), 10, widths=(40, 30)))
    with pytest.raises(RuntimeError):  # ECOSYSTEM.md: a pruned state_dict does not load into a plain net
        plain.load_state_dict(state)
    prepare(plain.net)
    plain.load_state_dict(state)
    assert all(torch.equal(masks(plain.net)[k], m) for k, m in saved_masks.items())

    torch.manual_seed(123)  # a fresh, differently initialized, unpruned module resumes from the checkpoint
    fresh = ClassifierModule(build_net("fc", (1, 8, 8), 10, widths=(40, 30)), optimizer="adam", lr=1e-2)
    resumed = PruneRewind(PruneRates(fc=0.5), prune_at_end=False)
    job = digits_job(fresh, [resumed], max_epochs=2)
    make_trainer(job).fit(fresh, datamodule=job.datamodule, ckpt_path=path)
    assert all(torch.equal(masks(fresh.net)[k], m) for k, m in saved_masks.items())
    assert torch.equal(resumed.theta_k["1.weight_orig"], torch.load(path, weights_only=False)["callbacks"]
                       ["PruneRewind"]["theta_k"]["1.weight_orig"])
    for layer in prunable_layers(fresh.net).values():  # trained one more epoch, pruned entries still zero
        assert not layer.weight_orig[layer.weight_mask == 0].any()


def test_early_stop_is_the_minimum_of_validation_loss_not_of_test_error():
    trace = EarlyStopTrace()
    trace.points = [{"iteration": 50, "val_loss": 0.5, "test_acc": 0.80},
                    {"iteration": 100, "val_loss": 0.3, "test_acc": 0.85},
                    {"iteration": 150, "val_loss": 0.4, "test_acc": 0.90}]
    trace.final_test_acc = 0.9
    assert trace.result() == {"early_stop_iter": 100, "val_loss_at_early_stop": 0.3,
                              "test_acc_at_early_stop": 0.85, "final_test_acc": 0.9}

