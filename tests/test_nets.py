"""Tests for the model zoo: exact parameter counts, forward shapes, errors, determinism."""
import pytest
import torch
from torch import nn

from modules.nets import NETS, build_net, count_parameters

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
]


def test_forward_cases_cover_registry():
    assert {name for name, _, _ in FORWARD_CASES} == set(NETS)


@pytest.mark.parametrize("name, input_shape, options", FORWARD_CASES)
def test_forward_shape_and_module_order(name, input_shape, options):
    torch.manual_seed(0)
    net = build_net(name, input_shape, 7, **options)
    layers = [m for m in net.modules() if isinstance(m, (nn.Linear, nn.Conv2d, nn.BatchNorm2d))]
    called = []
    for layer in layers:
        layer.register_forward_hook(lambda m, i, o: called.append(m))
    out = net(torch.randn(2, *input_shape))
    assert out.shape == (2, 7)
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
