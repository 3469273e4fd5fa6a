"""Random projections (dense, sparse, Fastfood), the Walsh-Hadamard transform and SubspaceNet."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modules.projections import PROJECTIONS, FastfoodProjection, build_projection, fwht
from modules.subspace import SubspaceNet

NAMES = list(PROJECTIONS)


def sylvester_hadamard(n: int) -> torch.Tensor:
    """H_n by Sylvester's construction H_2k = [[H_k, H_k], [H_k, -H_k]], independent of the module."""
    hadamard = torch.ones(1, 1, dtype=torch.float64)
    while hadamard.shape[0] < n:
        hadamard = torch.kron(torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64), hadamard)
    return hadamard


def columns(projection: nn.Module, dtype=torch.float64) -> torch.Tensor:
    """The (D, d) matrix of a projection, one unit vector at a time."""
    projection = projection.to(dtype)
    return torch.stack([projection(e) for e in torch.eye(projection.d, dtype=dtype)], dim=1)


# --- Walsh-Hadamard transform ------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 8, 64, 512, 2048])
@pytest.mark.parametrize("max_factor_log2", [1, 3, 4, 6])
def test_fwht_matches_explicit_hadamard(n, max_factor_log2):
    hadamard = sylvester_hadamard(n)
    x = torch.randn(n, dtype=torch.float64)
    torch.testing.assert_close(fwht(x, max_factor_log2), hadamard @ x)
    batch = torch.randn(3, 2, n, dtype=torch.float64)
    torch.testing.assert_close(fwht(batch, max_factor_log2), batch @ hadamard.T)


def test_fwht_rejects_other_lengths():
    with pytest.raises(ValueError, match="power-of-2"):
        fwht(torch.zeros(12))


# --- projections -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_zero_maps_to_zero_and_map_is_linear(name):
    projection = build_projection(name, 20, 300, seed=0).double()
    zero = torch.zeros(20, dtype=torch.float64)
    assert torch.equal(projection(zero), torch.zeros(300, dtype=torch.float64))
    u, v = torch.randn(20, dtype=torch.float64), torch.randn(20, dtype=torch.float64)
    torch.testing.assert_close(projection(2.5 * u - 0.7 * v), 2.5 * projection(u) - 0.7 * projection(v))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("d, D", [(1, 1), (5, 37), (20, 10), (7, 3), (64, 64), (65, 100), (40, 1000)])
def test_every_coordinate_reaches_theta(name, d, D):
    matrix = columns(build_projection(name, d, D, seed=1))
    assert matrix.shape == (D, d)
    assert (matrix.norm(dim=0) > 0).all()


@pytest.mark.parametrize("name", NAMES)
def test_mean_column_norm_is_about_one(name):
    norms = columns(build_projection(name, 50, 5000, seed=2)).norm(dim=0)
    assert abs(norms.mean().item() - 1) < 0.05


def test_sparse_density_per_layer_block():
    projection = build_projection("sparse", 40, 10_100, seed=3, layer_sizes=[10_000, 100])
    matrix = projection.to_dense()
    big, small = (matrix[:10_000] != 0).float().mean(), (matrix[10_000:] != 0).float().mean()
    assert abs(big.item() - 0.01) < 0.002 and abs(small.item() - 0.1) < 0.02
    with pytest.raises(ValueError, match="sum to D"):
        build_projection("sparse", 4, 10, seed=0, layer_sizes=[3, 3])


@pytest.mark.parametrize("name", NAMES)
def test_each_block_gets_its_size_share_of_a_column(name):
    # A weight block, two biases and a tiny output bias, like a net's tensors: in expectation each
    # block holds size / D of a column's squared norm, as for dense, whatever the sparse density.
    sizes = [10_000, 400, 100, 10]
    matrix = columns(build_projection(name, 200, sum(sizes), seed=8, layer_sizes=sizes))
    squared = matrix.pow(2)
    for block, size in zip(squared.split(sizes), sizes):
        share = block.sum(dim=0).mean().item()
        assert share == pytest.approx(size / sum(sizes), rel=0.15), (size, share)


@pytest.mark.parametrize("d, D", [(5, 37), (40, 37), (8, 64)])
def test_fastfood_equals_explicit_matrix(d, D):
    projection = FastfoodProjection(d, D, seed=4).double()
    L = projection.L
    hadamard = sylvester_hadamard(L)
    permutation = torch.zeros(L, L, dtype=torch.float64)
    permutation[torch.arange(L), projection.perm] = 1  # (Pi v)_i = v[perm[i]]
    full = hadamard @ torch.diag(projection.G) @ permutation @ hadamard
    explicit = projection.scale * full[:D, :d] @ torch.diag(projection.B)
    torch.testing.assert_close(columns(projection), explicit)


@pytest.mark.parametrize("name", NAMES)
def test_gradient_matches_finite_differences(name):
    projection = build_projection(name, 6, 45, seed=5).double()
    theta_d = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(projection, (theta_d,))


@pytest.mark.parametrize("name", NAMES)
def test_state_lives_in_buffers_and_follows_the_seed(name):
    first, same = build_projection(name, 10, 200, seed=6), build_projection(name, 10, 200, seed=6)
    other = build_projection(name, 10, 200, seed=7)
    state = first.state_dict()
    assert state and not list(first.parameters()) and set(state) <= dict(first.named_buffers()).keys()
    assert all(torch.equal(state[key], value) for key, value in same.state_dict().items())
    theta_d = torch.randn(10)
    assert torch.equal(first(theta_d), same(theta_d))
    assert not torch.allclose(first(theta_d), other(theta_d))
    other.load_state_dict(state)
    assert torch.equal(other(theta_d), first(theta_d))
    assert first.memory_bytes() == sum(b.numel() * b.element_size() for b in first.buffers())


def test_dense_memory_is_4dD():
    assert build_projection("dense", 30, 1000, seed=0).memory_bytes() == 4 * 30 * 1000


def test_unknown_projection_names_the_choices():
    with pytest.raises(ValueError, match="dense, sparse, fastfood"):
        build_projection("gaussian", 3, 10, seed=0)


# --- SubspaceNet -------------------------------------------------------------------------------

def small_fc() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3))


def small_conv_bn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 4 * 4, 3))


@pytest.mark.parametrize("name", NAMES)
def test_subspace_net_trains_only_theta_d_and_starts_at_theta0(name):
    torch.manual_seed(0)
    net = small_fc()
    reference = copy.deepcopy(net)
    model = SubspaceNet(net, d=10, projection=name, seed=0)
    parameters = list(model.parameters())
    assert len(parameters) == 1 and parameters[0] is model.theta_d and model.theta_d.shape == (10,)
    assert model.D == 12 * 16 + 16 + 16 * 3 + 3 and model.d == 10
    x = torch.randn(5, 12)
    torch.testing.assert_close(model(x), reference(x))


@pytest.mark.parametrize("name", NAMES)
def test_subspace_theta_stays_float32_under_mixed_precision(name):
    """theta is the net's parameters: autocast (--precision bf16-mixed, 16-mixed) must not round it to 16 bits."""
    torch.manual_seed(0)
    model = SubspaceNet(small_fc(), d=10, projection=name, seed=0)
    with torch.no_grad():
        model.theta_d.normal_()
    exact = model.theta()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # CPU autocast runs Fastfood's Hadamard GEMMs in bf16
        mixed = model.theta()
    assert mixed.dtype == torch.float32 and torch.equal(mixed, exact)


@pytest.mark.parametrize("name", NAMES)
def test_subspace_net_adam_reduces_the_loss(name):
    torch.manual_seed(1)
    model = SubspaceNet(small_fc(), d=20, projection=name, seed=1)
    x = torch.randn(32, 12)
    y = x[:, :3].argmax(dim=1)  # learnable labels
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    losses = []
    for _ in range(20):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_subspace_net_with_batchnorm_updates_running_stats():
    torch.manual_seed(2)
    net = small_conv_bn()
    reference = copy.deepcopy(net)
    model = SubspaceNet(net, d=8, projection="fastfood")
    assert [name for name, _ in model.named_parameters()] == ["theta_d"]
    assert "net.1.running_mean" in model.state_dict()
    x = torch.randn(6, 1, 6, 6)
    torch.testing.assert_close(model(x), reference(x))  # train mode: batch statistics
    torch.testing.assert_close(model.net[1].running_mean, reference[1].running_mean)
    assert model.net[1].running_mean.abs().sum() > 0 and model.net[1].num_batches_tracked == 1
    model.eval(), reference.eval()
    torch.testing.assert_close(model(x), reference(x))
    F.cross_entropy(model.train()(x), torch.zeros(6, dtype=torch.long)).backward()
    assert model.theta_d.grad.abs().sum() > 0


def test_subspace_net_state_dict_round_trip():
    torch.manual_seed(3)
    model = SubspaceNet(small_fc(), d=6, seed=3)
    with torch.no_grad():
        model.theta_d.normal_()
    copy_of = SubspaceNet(small_fc(), d=6, seed=4)
    copy_of.load_state_dict(model.state_dict())
    x = torch.randn(4, 12)
    torch.testing.assert_close(copy_of(x), model(x))


def test_subspace_net_shares_tied_parameters():
    linear = nn.Linear(4, 4)
    net = nn.Sequential(linear, nn.Tanh(), linear)
    reference = copy.deepcopy(net)
    model = SubspaceNet(net, d=3)
    assert model.D == 20
    x = torch.randn(2, 4)
    torch.testing.assert_close(model(x), reference(x))


def test_subspace_net_rejects_d_outside_1_to_D():
    with pytest.raises(ValueError, match=r"d=300 must be between 1 and D=\d+"):
        SubspaceNet(small_fc(), d=300)
    with pytest.raises(ValueError, match="must be between 1 and D"):
        SubspaceNet(small_fc(), d=0)
