"""Tests for the model zoo: exact parameter counts, forward shapes, errors, determinism."""
import pytest
import torch
from torch import nn

from modules.nets import NETS, NoisyBatchNorm, ShiftedBatchNorm, build_net, count_parameters

MNIST, CIFAR = (1, 28, 28), (3, 32, 32)


@pytest.mark.parametrize("name, input_shape, options, expected", [
    ("fc", MNIST, {}, 199_210),
    ("fc", CIFAR, {}, 656_810),
    ("fc", MNIST, {"widths": (400,) * 5}, 959_610),
    ("lenet", MNIST, {}, 44_426),
    ("lenet", CIFAR, {}, 62_006),
    ("lenet_300_100", MNIST, {}, 266_610),
    ("mlp_1x512", (3, 28, 28), {}, 1_209_866),
    ("mlp_3x512", (3, 28, 28), {}, 1_735_178),
    ("conv2", CIFAR, {}, 4_301_642),
    ("conv4", CIFAR, {}, 2_425_930),
    ("conv6", CIFAR, {}, 2_262_602),  # Frankle & Carbin's table rounds this to 1.7M
    ("vgg11", CIFAR, {}, 9_225_610),
    ("resnet18", CIFAR, {}, 11_173_962),
    ("deep_linear", MNIST, {}, 311_810),  # 25 Linear layers: 784-100x24-10
])
def test_parameter_counts(name, input_shape, options, expected):
    assert count_parameters(build_net(name, input_shape, 10, **options)) == expected


def test_lenet_300_100_weights_without_biases():
    net = build_net("lenet_300_100", MNIST, 10)
    assert sum(p.numel() for n, p in net.named_parameters() if n.endswith("weight")) == 266_200


def test_count_parameters_skips_frozen():
    net = build_net("fc", (4,), 2, widths=(3,))
    net[1].weight.requires_grad_(False)
    assert count_parameters(net) == 3 + 3 * 2 + 2


# A small input each entry supports; conv nets get images, (1, 8, 8) where the net allows it.
FORWARD_CASES = [
    ("fc", (40,), {"dropout": 0.5}),
    ("lenet", MNIST, {}),
    ("lenet_300_100", MNIST, {}),
    ("mlp_1x512", (1, 8, 8), {"dropout": 0.1}),
    ("mlp_3x512", (40,), {}),
    ("conv2", (1, 8, 8), {}),
    ("conv4", (1, 8, 8), {}),
    ("conv6", (1, 8, 8), {}),
    ("vgg11", MNIST, {}),  # 28x28: the fifth pool is skipped
    ("vgg11", CIFAR, {"norm": "bn"}),
    ("small_vgg", MNIST, {"norm": "bn"}),
    ("small_vgg", CIFAR, {}),
    ("resnet18", (3, 16, 16), {}),
    ("deep_linear", (40,), {}),
    ("xor_net", (8,), {"k": 3, "init_std": 0.01}),
]
SINGLE_OUTPUT = {"xor_net"}  # binary classifiers with one output (its sign is the class), built for 2 classes


def test_forward_cases_cover_registry():
    assert {name for name, _, _ in FORWARD_CASES} == set(NETS)


@pytest.mark.parametrize("name, input_shape, options", FORWARD_CASES)
def test_forward_shape_and_module_order(name, input_shape, options):
    torch.manual_seed(0)
    net = build_net(name, input_shape, 2 if name in SINGLE_OUTPUT else 7, **options)
    layers = [m for m in net.modules() if isinstance(m, (nn.Linear, nn.Conv2d, nn.BatchNorm2d))]
    called = []
    for layer in layers:
        layer.register_forward_hook(lambda m, i, o: called.append(m))
    out = net(torch.randn(2, *input_shape))
    assert out.shape == (2, 1 if name in SINGLE_OUTPUT else 7)
    # modules() visits the parameterized layers exactly in the order the forward pass uses them
    assert [id(m) for m in called] == [id(m) for m in layers]
    has_bn = any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    assert has_bn == (options.get("norm") == "bn" or name == "resnet18")


def test_resnet18_block_names():
    names = dict(build_net("resnet18", (3, 8, 8), 10).named_modules())
    assert isinstance(names["layer1.0.conv1"], nn.Conv2d)
    assert isinstance(names["layer4.1.conv2"], nn.Conv2d)
    assert isinstance(names["layer2.0.shortcut.0"], nn.Conv2d)


def test_unknown_model_names_choices():
    with pytest.raises(ValueError, match="unknown model 'nope'; choose from fc, lenet"):
        build_net("nope", MNIST, 10)


@pytest.mark.parametrize("name", ["lenet", "conv2", "conv4", "conv6", "vgg11", "small_vgg", "resnet18"])
def test_conv_nets_reject_flat_input(name):
    with pytest.raises(ValueError, match="C, H, W"):
        build_net(name, (40,), 10)


def test_lenet_rejects_too_small_input_and_unknown_norm():
    with pytest.raises(ValueError, match="at least"):
        build_net("lenet", (1, 8, 8), 10)
    with pytest.raises(ValueError, match="unknown norm"):
        build_net("small_vgg", MNIST, 10, norm="ln")


@pytest.mark.parametrize("name", ["lenet", "small_vgg", "resnet18"])
def test_same_seed_same_weights(name):
    def init(seed):
        torch.manual_seed(seed)
        return build_net(name, (3, 16, 16), 10).state_dict()

    first, second, other = init(1), init(1), init(2)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


@pytest.mark.parametrize("name, input_shape, norm", [
    ("small_vgg", MNIST, "noisy_bn"), ("vgg11", CIFAR, "noisy_bn"), ("deep_linear", MNIST, "bn"),
    ("deep_linear", (40,), "noisy_bn"), ("small_vgg", MNIST, "shifted_bn")])
def test_norm_variants_follow_every_hidden_layer(name, input_shape, norm):
    net = build_net(name, input_shape, 7, norm=norm)
    assert net(torch.randn(4, *input_shape)).shape == (4, 7)
    kind = {"noisy_bn": NoisyBatchNorm, "shifted_bn": ShiftedBatchNorm}.get(norm, nn.BatchNorm1d)
    modules = list(net.modules())
    # every conv (VGG) or every hidden linear layer (deep linear) is directly followed by the norm
    hidden = [i for i, m in enumerate(modules) if isinstance(m, nn.Conv2d if name != "deep_linear" else nn.Linear)]
    hidden = hidden if name != "deep_linear" else hidden[:-1]
    assert len(hidden) == {"small_vgg": 4, "vgg11": 8, "deep_linear": 24}[name]
    assert all(isinstance(modules[i + 1], kind) for i in hidden)
    assert sum(isinstance(m, kind) for m in modules) == len(hidden)


def test_deep_linear_is_linear():
    torch.manual_seed(0)
    net = build_net("deep_linear", (6,), 3, depth=5, width=4)
    assert sum(isinstance(m, nn.Linear) for m in net.modules()) == 5
    x, z = torch.randn(2, 6), torch.randn(2, 6)
    bias = net(torch.zeros(1, 6))
    torch.testing.assert_close(net(x + z) - bias, (net(x) - bias) + (net(z) - bias))


def _noise(noisy: NoisyBatchNorm, x: torch.Tensor) -> torch.Tensor:
    """What one training-mode forward adds to BN(x)."""
    z = nn.functional.batch_norm(x, None, None, noisy.batchnorm.weight, noisy.batchnorm.bias, training=True)
    return noisy(x) - z


def test_noisy_batchnorm_draws_iid_noise_per_example_from_a_per_step_per_activation_distribution():
    torch.manual_seed(0)
    scale = 0.8
    noisy = NoisyBatchNorm(nn.BatchNorm2d(8), scale)
    half = torch.randn(1000, 8, 4, 4) * 3 + 1
    x = torch.cat([half, half])  # every example twice: BN(x) is the same for both copies, the noise must not be
    noise = _noise(noisy, x)
    assert (noise[:1000] - noise[1000:]).abs().min() > 0
    # per activation (channel x position, 128 of them), the noise's mean ~ U(-scale, scale) and std ~ U(scale/2, 3 scale/2),
    # estimated over 2,000 examples (standard error of a mean <= 1.2 / sqrt(2000) = 0.03)
    mean, std = noise.mean(0), noise.std(0)
    assert mean.shape == (8, 4, 4) and mean.abs().max() < scale + 0.1
    assert std.min() > scale / 2 - 0.1 and std.max() < 1.5 * scale + 0.1
    assert abs(mean.mean()) < 0.15 and abs(mean.var() - scale**2 / 3) < 0.08
    assert abs(std.mean() - scale) < 0.1 and abs(std.var() - scale**2 / 12) < 0.03
    # a non-zero mean and a non-unit variance for most activations (U(-0.8, 0.8): 88% beyond 0.1; 75% of variances off 1 by 0.2)
    assert (mean.abs() > 0.1).float().mean() > 0.7 and ((std**2 - 1).abs() > 0.2).float().mean() > 0.6
    # given its activation's distribution, each example's noise is independent of the others'
    standardized = ((noise - mean) / std).flatten(1)
    correlation = standardized @ standardized.T / standardized.shape[1]
    off_diagonal = correlation[~torch.eye(len(x), dtype=torch.bool)]
    assert abs(off_diagonal.mean()) < 0.01 and off_diagonal.abs().mean() < 0.1  # 128 products each: |r| ~ 0.07
    # the next step draws a new distribution
    mean2 = _noise(noisy, x).mean(0)
    assert abs(torch.corrcoef(torch.stack([mean.flatten(), mean2.flatten()]))[0, 1]) < 0.3


def _affine_noise(noisy: ShiftedBatchNorm, x: torch.Tensor):
    """(spread, shift) per activation, recovered from y = spread * BN(x) + shift by least squares over the batch."""
    z = nn.functional.batch_norm(x, None, None, noisy.batchnorm.weight, noisy.batchnorm.bias, training=True)
    y = noisy(x)
    zc, yc = z - z.mean(0), y - y.mean(0)
    spread = (zc * yc).sum(0) / (zc * zc).sum(0)
    shift = y.mean(0) - spread * z.mean(0)
    torch.testing.assert_close(y, spread * z + shift, atol=1e-4, rtol=1e-4)  # one affine map per activation
    return spread, shift


def test_shifted_batchnorm_draws_one_affine_map_per_step_and_activation():
    torch.manual_seed(0)
    scale = 0.8
    noisy = ShiftedBatchNorm(nn.BatchNorm2d(16), scale)
    x = torch.randn(64, 16, 8, 8) * 3 + 1
    spread, shift = _affine_noise(noisy, x)
    spread2, shift2 = _affine_noise(noisy, x)
    n = spread.numel()  # 1,024 activations, each with its own draw
    assert spread.shape == shift.shape == (16, 8, 8)
    assert shift.unique().numel() > 0.99 * n and spread.unique().numel() > 0.99 * n
    assert not torch.allclose(shift, shift2) and not torch.allclose(spread, spread2)  # redrawn every step
    # shift ~ U(-scale, scale): mean 0, variance scale^2 / 3; spread ~ U(1 - scale/2, 1 + scale/2)
    assert shift.abs().max() <= scale + 1e-4 and (spread - 1).abs().max() <= scale / 2 + 1e-4
    assert abs(shift.mean()) < 0.05 and abs(shift.var() - scale**2 / 3) < 0.03
    assert abs(spread.mean() - 1) < 0.03 and abs(spread.var() - scale**2 / 12) < 0.01
    assert abs(torch.corrcoef(torch.stack([shift.flatten(), spread.flatten()]))[0, 1]) < 0.1
    # each activation's distribution over the batch: non-zero mean, non-unit variance
    y = noisy(x)
    assert (y.mean(0).abs() > 1e-3).float().mean() > 0.95 and ((y.var(0) - 1).abs() > 1e-3).float().mean() > 0.9



@pytest.mark.parametrize("kind", [NoisyBatchNorm, ShiftedBatchNorm])
def test_noisy_batchnorm_is_plain_batchnorm_in_eval_and_at_scale_zero(kind):
    torch.manual_seed(0)
    noisy = kind(nn.BatchNorm1d(5), 1.0)
    x = torch.randn(32, 5)
    noisy(x)  # one training step updates the running statistics
    noisy.eval()
    torch.testing.assert_close(noisy(x), noisy.batchnorm(x))
    state = torch.get_rng_state()
    noisy(x)
    assert torch.equal(state, torch.get_rng_state())  # no noise drawn in eval
    quiet = kind(nn.BatchNorm1d(5), 0.0)
    torch.testing.assert_close(quiet(x), nn.functional.batch_norm(x, None, None, quiet.batchnorm.weight,
                                                                  quiet.batchnorm.bias, training=True))


def test_xor_net_parameters_and_fixed_output_weights():
    torch.manual_seed(0)
    net = build_net("xor_net", (8,), 2, k=5, init_std=0.01)
    assert count_parameters(net) == 4 * 5  # 2k filters of width 2; the output weights are not parameters
    assert net.filters.weight.shape == (10, 2) and net.filters.bias is None
    assert net.output_weights.tolist() == [1.0] * 5 + [-1.0] * 5
    assert 0.003 < net.filters.weight.std().item() < 0.03  # the paper's small Gaussian initialization
    # f(x) = sum_i max_j relu(w_i . x_j) - sum_i max_j relu(u_i . x_j), by hand on one input
    x = torch.tensor([[1.0, 1.0, -1.0, 1.0, 1.0, -1.0, -1.0, -1.0]])
    pairs = x.reshape(4, 2)
    pooled = torch.relu(pairs @ net.filters.weight.T).amax(dim=0)
    torch.testing.assert_close(net(x), (pooled[:5].sum() - pooled[5:].sum()).reshape(1, 1))
    with pytest.raises(ValueError, match="2 classes"):
        build_net("xor_net", (8,), 10)
    with pytest.raises(ValueError, match=r"\(2d,\)"):
        build_net("xor_net", (7,), 2)
