"""Tests for the smoothness probe: its math on problems with known answers, and that probing never changes training."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from callbacks.smoothness import LossProbe, RngState, SmoothnessProbe, internal_covariate_shift, landscape
from datamodules.datamodule import ArrayDataModule
from modules.classifier import ClassifierModule
from modules.nets import build_net
from pipelines.training import Hardware, TrainJob, fit


def _squared_loss_problem(seed=0, n=32, d=6, k=3):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, d, generator=g), torch.randint(0, k, (n,), generator=g)
    return x, y, F.one_hot(y, k).float()


def test_landscape_matches_the_closed_form_of_a_quadratic():
    # L(W) = mean_i ||W x_i - t_i||^2 is quadratic: H D = (2/n) D X^T X, so along -g the loss is the parabola
    # L - eta ||g||^2 + eta^2/2 <g, H g>, the gradient changes by eta ||H g||, and beta = ||H g|| / ||g|| for every eta.
    x, y, t = _squared_loss_problem()
    net = nn.Linear(6, 3, bias=False)
    w = net.weight.detach().clone()
    grad = 2 / len(x) * (x @ w.T - t).T @ x
    h_grad = 2 / len(x) * grad @ x.T @ x
    loss0 = ((x @ w.T - t) ** 2).sum(1).mean()
    etas = (0.01, 0.05, 0.2, 0.5)
    losses = [loss0 - e * grad.pow(2).sum() + e**2 / 2 * (grad * h_grad).sum() for e in etas]

    probe = LossProbe(net, "squared", x, y, RngState(x.device))
    result = landscape(probe, {"weight": w}, etas)

    torch.testing.assert_close(result["gradient"]["weight"], grad)
    torch.testing.assert_close(torch.tensor(result["losses"]), torch.stack([loss0, *losses]))
    expected_range = max([loss0, *losses]) - min([loss0, *losses])
    assert result["loss_range"] == pytest.approx(float(expected_range), rel=1e-4)
    assert result["grad_changes"] == pytest.approx([e * float(h_grad.norm()) for e in etas], rel=1e-4)
    assert result["beta"] == pytest.approx(float(h_grad.norm() / grad.norm()), rel=1e-4)
    assert result["beta"] <= float(torch.linalg.eigvalsh(2 / len(x) * x.T @ x).max()) + 1e-6  # beta <= ||H||


def test_internal_covariate_shift_matches_definition_2_1():
    # f(x) = W2 W1 x, squared loss: G = grad_W2 at (W1, W2) and G' = grad_W2 at (W1', W2) in closed form.
    x, y, t = _squared_loss_problem(seed=1)
    net = nn.Sequential(nn.Linear(6, 4, bias=False), nn.Linear(4, 3, bias=False))
    w1, w2 = net[0].weight.detach().clone(), net[1].weight.detach().clone()
    w1_new, w2_new = w1 + 0.3 * torch.randn_like(w1), w2 + 0.3 * torch.randn_like(w2)
    grad_w2 = lambda a, b: 2 / len(x) * (x @ a.T @ b.T - t).T @ (x @ a.T)
    before, after = {"0.weight": w1, "1.weight": w2}, {"0.weight": w1_new, "1.weight": w2_new}
    gradient = {"0.weight": torch.zeros_like(w1), "1.weight": grad_w2(w1, w2)}

    shifts = internal_covariate_shift(LossProbe(net, "squared", x, y, RngState(x.device)), before, after, gradient, net, (1,))

    g, g_shifted = grad_w2(w1, w2), grad_w2(w1_new, w2)  # W2 itself stays at its old value
    l2, cos = shifts[1]
    assert l2 == pytest.approx(float((g - g_shifted).norm()), rel=1e-4)
    assert cos == pytest.approx(float((g * g_shifted).sum() / (g.norm() * g_shifted.norm())), rel=1e-4)
    assert l2 > 0.01


def _snapshot(net):
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def test_probe_restores_weights_running_statistics_and_rng_and_sees_the_steps_noise():
    torch.manual_seed(0)
    net = build_net("small_vgg", (1, 8, 8), 10, norm="noisy_bn")
    module = ClassifierModule(net, lr=0.1)
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    probe = SmoothnessProbe(every=1, etas=(0.1, 0.5), ics_layers=(1, 4), activation_layer=2)
    trainer = SimpleNamespace(global_rank=0, global_step=0)
    state, rng = _snapshot(net), torch.get_rng_state()

    probe.on_train_batch_start(trainer, module, (x, y), 0)

    after_probe = _snapshot(net)
    assert all(torch.equal(state[k], after_probe[k]) for k in state)  # running_mean/var, num_batches_tracked too
    assert torch.equal(rng, torch.get_rng_state())
    assert all(p.grad is None for p in net.parameters())
    # the training step that follows draws the same noise the probe used at theta: the same loss, exactly
    loss = F.cross_entropy(net(x), y)
    assert probe.records[0]["loss"] == loss.item()
    loss.backward()
    with torch.no_grad():
        for p in net.parameters():
            p -= 0.1 * p.grad
    state, rng = _snapshot(net), torch.get_rng_state()

    probe.on_train_batch_end(trainer, module, None, (x, y), 0)

    after_ics = _snapshot(net)
    assert all(torch.equal(state[k], after_ics[k]) for k in state)
    assert torch.equal(rng, torch.get_rng_state())
    record = probe.records[0]
    assert set(record["ics"]) == {1, 4} and all(l2 > 0 and -1 <= cos <= 1 for l2, cos in record["ics"].values())
    assert record["loss_min"] <= record["loss"] <= record["loss_max"] and record["beta"] > 0
    assert len(record["activation_quantiles"]) == 5 and sorted(record["activation_quantiles"]) == record["activation_quantiles"]


def test_probe_only_on_rank_zero_and_every_n_steps():
    net = build_net("deep_linear", (4,), 2, depth=3, width=5)
    module = ClassifierModule(net)
    batch = (torch.randn(8, 4), torch.randint(0, 2, (8,)))
    probe = SmoothnessProbe(every=3, etas=(0.1,))
    for rank, step in [(0, 0), (0, 1), (0, 2), (0, 3), (1, 6)]:
        probe.on_train_batch_start(SimpleNamespace(global_rank=rank, global_step=step), module, batch, 0)
    assert [r["step"] for r in probe.records] == [0, 3]
    with pytest.raises(ValueError):
        SmoothnessProbe(every=0, etas=(0.1,))
    with pytest.raises(ValueError):
        SmoothnessProbe(every=1, etas=(0.1, 0.0))


def _train(probe: SmoothnessProbe | None):
    datamodule = ArrayDataModule("digits", batch_size=64, seed=3, train_subset=256)
    datamodule.setup()
    torch.manual_seed(3)
    module = ClassifierModule(build_net("small_vgg", datamodule.input_shape, 10, norm="noisy_bn"), lr=0.05, eval_splits=("test",))
    job = fit(TrainJob(module, datamodule, Hardware(), max_epochs=2, seed=3, callbacks=[probe] if probe else []))
    return job.module


def test_training_is_identical_with_and_without_the_probe():
    # noisy BN: the probe's forward passes draw noise too, so this also checks that the RNG state is put back
    probe = SmoothnessProbe(every=2, etas=(0.05, 0.2), ics_layers=(2,), activation_layer=1)
    probed, plain = _train(probe), _train(None)
    assert len(probe.records) == 4 and all("ics" in r for r in probe.records)  # 8 steps, probed at 0, 2, 4, 6
    assert probed.history == plain.history
    a, b = probed.state_dict(), plain.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
