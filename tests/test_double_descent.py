"""Double descent (Belkin et al. 2018): the solver, the features, the claim, the three sweeps, the CLI, DDP."""
from __future__ import annotations

import contextlib
import io

import pytest
import torch

from datamodules.datamodule import ArrayDataModule
from modules.nets import build_net, count_parameters
from modules.random_features import (RandomFourierFeatures, gaussian_kernel, kernel_interpolant, median_distance,
                                     min_norm_least_squares)
from pipelines.double_descent import REUSE_STD, Curve, Params, hidden_units, reuse_weights, sweep_rff

SUMMARY_KEYS = {"sizes", "train_risk", "test_risk", "test_zero_one", "norm", "threshold"}


@pytest.mark.parametrize("rows, columns", [(40, 12), (12, 40), (25, 25)])
def test_min_norm_least_squares_is_the_pseudo_inverse_solution(rows, columns):
    g = torch.Generator().manual_seed(rows * columns)
    a = torch.randn(rows, columns, generator=g, dtype=torch.float64)
    b = torch.randn(rows, 3, generator=g, dtype=torch.float64)
    solution = min_norm_least_squares(a, b)
    assert torch.allclose(solution, torch.linalg.pinv(a) @ b, atol=1e-8)
    if columns >= rows:  # at and beyond the threshold it interpolates
        assert torch.allclose(a @ solution, b, atol=1e-8)


def test_min_norm_least_squares_on_a_rank_deficient_problem():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(30, 4, generator=g, dtype=torch.float64) @ torch.randn(4, 20, generator=g, dtype=torch.float64)
    b = torch.randn(30, 2, generator=g, dtype=torch.float64)
    assert torch.allclose(min_norm_least_squares(a, b), torch.linalg.pinv(a) @ b, atol=1e-8)


def test_random_fourier_features_shape_scale_and_kernel():
    x = torch.randn(30, 5, generator=torch.Generator().manual_seed(0))
    sigma = median_distance(x)
    assert sigma == pytest.approx(torch.pdist(x.double()).median().item())
    features = RandomFourierFeatures(5, 20_000, sigma, seed=3)
    phi = features(x, 20_000)
    assert phi.shape == (30, 20_000) and phi.dtype == torch.float64
    assert torch.allclose(features.features(features.cosines(x), 7), features(x, 7))  # nested: the first 7
    # E[phi(x).phi(y)] is the Gaussian kernel; with 20,000 features the error is O(1/sqrt(N)) ~ 0.01
    assert (phi @ phi.T - gaussian_kernel(x, x, sigma)).abs().max() < 0.05
    assert (phi.norm(dim=1) ** 2 - 1).abs().max() < 0.05
    assert (features(x, 50).norm(dim=1) ** 2).mean() == pytest.approx(1, abs=0.3)  # scale holds at small N too


def test_kernel_interpolant_interpolates():
    x = torch.randn(40, 6, generator=torch.Generator().manual_seed(0))
    targets = torch.nn.functional.one_hot(torch.arange(40) % 4, 4).double()
    alpha = kernel_interpolant(x, targets, median_distance(x))
    assert torch.allclose(gaussian_kernel(x, x, median_distance(x)) @ alpha, targets, atol=1e-6)


class _NoRun:
    def log_metrics(self, *args, **kwargs):
        pass


def _rff_curve(n: int, seed: int, ratios: tuple[float, ...]) -> Curve:
    data = ArrayDataModule("mnist5k", seed=seed, train_subset=n)
    data.setup()
    curve = Curve("rff", _NoRun())
    with contextlib.redirect_stdout(io.StringIO()):
        sweep_rff(Params(n=n, seed=seed, rff_features=ratios), data, curve)
    return curve


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rff_test_risk_and_norm_peak_at_n_and_fall_again_beyond(seed):
    """Belkin's Figure 2 at n = 300: over 5 seeds the peak sat exactly at N = n, 12x-560x above its neighbours,
    and at N = 5n the test risk was 0.42-0.45, below the best under-parameterized one (0.65-0.71)."""
    n = 300
    curve = _rff_curve(n, seed, (0.25, 0.5, 0.9, 1.0, 1.1, 2.0, 5.0))
    sizes, risk, norm = curve.column("size"), curve.column("test_risk"), curve.column("norm")
    at = sizes.index(n)
    assert curve.threshold == n
    for values in (risk, norm, curve.column("test_zero_one")):
        assert max(range(len(sizes)), key=values.__getitem__) == at
    assert risk[at] > 5 * max(risk[at - 1], risk[at + 1])
    assert risk[-1] < min(risk[:at])  # beyond the threshold it ends better than anything below it
    assert norm[-1] < norm[at + 1] / 2 and norm == sorted(norm[:at + 1]) + norm[at + 1:]  # norm rises to n, then falls
    assert norm[at + 1:] == sorted(norm[at + 1:], reverse=True)
    assert max(curve.column("train_risk")[at:]) < 1e-12  # interpolation from N = n on
    assert risk[-1] < 1.5 * curve.references["kernel (N = inf)"]["test_risk"]  # approaching the N -> infinity limit


def test_hidden_units_and_parameter_count_follow_the_paper():
    d, k = 784, 10
    for parameters in (1000, 4000, 40_000, 400_000):
        width = hidden_units(parameters, d, k)
        net = build_net("fc", (1, 28, 28), k, widths=(width,))
        assert count_parameters(net) == (d + 1) * width + (width + 1) * k
        assert abs(count_parameters(net) - parameters) <= (d + 1 + k) / 2 or width == 1
    assert hidden_units(40_000, d, k) == 50  # the paper's threshold n*K at n = 4,000: H = 50


def test_weight_reuse_copies_the_smaller_net_and_draws_the_new_units():
    torch.manual_seed(0)
    small, large = (build_net("fc", (20,), 3, widths=(width,)) for width in (4, 400))
    reuse_weights(small, large)
    (s_in, s_out), (l_in, l_out) = ([m for m in net.modules() if isinstance(m, torch.nn.Linear)] for net in (small, large))
    assert torch.equal(l_in.weight[:4], s_in.weight) and torch.equal(l_in.bias[:4], s_in.bias)
    assert torch.equal(l_out.weight[:, :4], s_out.weight) and torch.equal(l_out.bias, s_out.bias)
    assert l_in.weight[4:].std().item() == pytest.approx(REUSE_STD, rel=0.05)
    assert l_out.weight[:, 4:].std().item() == pytest.approx(REUSE_STD, rel=0.1)


TINY = ["--n", "200", "--rff_features", "0.5,1,2", "--nn_parameters", "0.5,0.9,2", "--max_epochs", "3",
        "--forest_leaves", "0.1,0.5", "--forest_trees", "2,10"]


def test_cli_end_to_end_every_method(run_pipeline):
    result = run_pipeline("double_descent", *TINY)
    assert result.exit_code == 0
    summary = result.summary()
    assert list(summary) == ["rff", "nn", "forest"]
    for method, curve in summary.items():
        assert set(curve) == SUMMARY_KEYS
        assert len(curve["sizes"]) == len(curve["test_risk"]) == len(curve["norm"]) == len(curve["train_risk"])
        assert curve["sizes"] == sorted(curve["sizes"])
    rff, nn, forest = summary["rff"], summary["nn"], summary["forest"]
    assert rff["sizes"] == [100, 200, 400] and rff["threshold"] == 200
    assert max(rff["test_risk"]) == rff["test_risk"][1] and max(rff["norm"]) == rff["norm"][1]
    # nn: widths 1, 2, 5 on 784-pixel digits; threshold n*K = 2,000 parameters
    assert nn["threshold"] == 2000 and nn["sizes"] == [(785 + 10) * h + 10 for h in (1, 2, 5)]
    assert all(v > 0 for v in nn["norm"])
    # forest: 2 capped trees, the fully grown tree (the threshold, zero training risk), then 2 and 10 trees
    at = forest["sizes"].index(forest["threshold"])
    assert at == 2 and forest["train_risk"][at] == 0 and forest["norm"] == [None] * 5
    assert forest["test_risk"][-1] < forest["test_risk"][at]  # more trees bring the test risk down
    children = {run.info.run_name: run for run in result.children}
    assert set(children) == {"rff", "nn", "forest"}
    steps = [m.step for m in result.client.get_metric_history(children["rff"].info.run_id, "test_risk")]
    assert sorted(steps) == rff["sizes"]  # each size is a step of the method's child run
    figures = {p for p in result.artifact_paths() if p.startswith("figures/")}
    assert figures == {"figures/fig2_rff.png", "figures/fig3_nn.png", "figures/fig4_forest.png"}
    assert result.parent.data.metrics["rff_peak_size"] == 200


BAD_INPUT = [
    (["--rff_features", ""], "--rff_features"),
    (["--methods", "forest", "--forest_leaves", "", "--forest_trees", ""], "--forest_leaves"),
    (["--methods", "nn", "--nn_parameters", ""], "--nn_parameters"),
    (["--methods", ""], "--methods"),
    (["--methods", "rff,svm"], "--methods"),
    (["--sigma", "-1"], "--sigma"),
    (["--n", "4001"], "--n"),
    (["--dataset", "digits", "--n", "2000"], "--n"),
    (["--forest_leaves", "0,0.5"], "--forest_leaves"),
    (["--nn_parameters", "0.5,-1"], "--nn_parameters"),
]


@pytest.mark.parametrize("flags,flag", BAD_INPUT)
def test_bad_input_is_one_line_naming_the_flag_exit_2_and_no_run(refused, flags, flag):
    assert flag in refused("double_descent", *flags)


def _ddp_matches_one_process(run_pipeline, flags):
    one = run_pipeline("double_descent", *flags).summary()["nn"]
    ddp = run_pipeline("double_descent", *flags, "--devices", "2", "--strategy", "ddp", "--accelerator", "cpu")
    assert ddp.exit_code == 0
    two = ddp.summary()["nn"]
    assert two["sizes"] == one["sizes"]
    for key in ("train_risk", "test_risk", "norm"):
        assert two[key] == pytest.approx(one[key], rel=1e-4)


def test_nn_under_ddp_trains_as_one_process(run_pipeline):
    """Two CPU ranks halve each batch and average the gradients: the same net as one process (one DDP launch)."""
    _ddp_matches_one_process(run_pipeline, ["--methods", "nn", "--n", "200", "--nn_parameters", "2", "--max_epochs", "2"])


@pytest.mark.slow
def test_nn_under_ddp_reuses_the_weights_rank_0_trained(run_pipeline):
    """Below the threshold the second net starts from the first, which came back from the DDP ranks."""
    _ddp_matches_one_process(run_pipeline, ["--methods", "nn", "--n", "200", "--nn_parameters", "0.5,0.9",
                                            "--max_epochs", "3"])
