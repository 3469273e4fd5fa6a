"""Tests for the prequential description length pipeline (Blier & Ollivier 2018)."""
import math

import pytest
import torch
from torch import nn

from modules.classifier import ClassifierModule
from pipelines.description_length import DOUBLING, Params, SentPrefix, boundaries, code_length_bits
from pipelines.params import UsageError, parse

SMALL = ("--dataset", "digits", "--examples", "300", "--chunks", "0.2,0.5,1.0", "--max_epochs", "60")


def test_a_uniform_model_costs_log2_k_bits_per_label():
    """Bits, not nats: a model whose outputs are all equal codes n labels in exactly n log2 K bits."""
    net = nn.Linear(5, 10)
    nn.init.zeros_(net.weight)
    nn.init.zeros_(net.bias)
    x, y = torch.randn(37, 5), torch.randint(10, (37,))
    assert code_length_bits(ClassifierModule(net), x, y) == pytest.approx(37 * math.log2(10), rel=1e-6)


def test_chunk_boundaries():
    assert DOUBLING == (0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.0)
    assert boundaries(DOUBLING, 1437) == [1, 3, 6, 11, 23, 46, 92, 184, 368, 736, 1437]
    assert boundaries(DOUBLING, 100) == [1, 2, 3, 6, 13, 26, 51, 100]  # fractions that round alike merge


def test_sent_prefix_trains_on_earlier_labels_only_and_codes_the_next_chunk():
    params = parse(Params, ["--examples", "200"], prog="test")

    def splits(seen, end):
        data = SentPrefix(params, "random", seen, end)
        data.setup()
        return data.splits

    first = splits(1, 200)  # example 1 (held out: nothing to train on) and examples 2..200
    x_all, y_all = (torch.cat([first["val"][i], first["next"][i]]) for i in (0, 1))
    prefix = splits(40, 80)
    (x_fit, y_fit), (x_val, y_val), (x_next, y_next) = (prefix[k] for k in ("train", "val", "next"))
    assert (len(y_fit), len(y_val), len(y_next)) == (36, 4, 40)  # a held-out tenth of the 40 labels sent
    # one coding order and one draw of random labels for every chunk's data
    assert torch.equal(x_next, x_all[40:80]) and torch.equal(y_next, y_all[40:80])
    rows = lambda x, y: sorted(zip(map(tuple, x.tolist()), y.tolist()))
    assert rows(torch.cat([x_fit, x_val]), torch.cat([y_fit, y_val])) == rows(x_all[:40], y_all[:40])
    true = SentPrefix(params, "true", 40, 80)
    true.setup()
    assert torch.equal(true.splits["next"][0], x_next)  # the same inputs in the same order
    assert (true.splits["next"][1] != y_next).float().mean() > 0.7  # random labels: about 90% differ


def test_true_labels_compress_random_labels_do_not(run_pipeline):
    result = run_pipeline("description_length", *SMALL)
    assert result.exit_code == 0
    summary = result.summary()
    assert set(summary) == {"true", "random"}
    for labels in summary.values():
        assert set(labels) == {"prequential_bits", "uniform_bits", "ratio"}
        assert labels["uniform_bits"] == pytest.approx(300 * math.log2(10))
        assert labels["ratio"] == pytest.approx(labels["prequential_bits"] / labels["uniform_bits"])
    for labels, row in summary.items():  # the first 60 labels cost 60 log2 K, each later chunk its cross-entropy
        chunks = [c.data.metrics["chunk_bits"] for c in result.children if c.data.params["labels_kind"] == labels]
        assert row["prequential_bits"] == pytest.approx(60 * math.log2(10) + sum(chunks))
    assert summary["true"]["ratio"] < 0.5
    assert 0.95 < summary["random"]["ratio"] < 1.3
    assert len(result.children) == 2 * 2  # every chunk after the first is coded by a trained model
    assert "figures/cumulative_bits.png" in result.artifact_paths()


@pytest.mark.parametrize("flags, flag", [
    (("--chunks", "0.5,0.25,1.0"), "--chunks"),
    (("--chunks", "0.25,0.5"), "--chunks"),
    (("--chunks", "0.5,1.5"), "--chunks"),
    (("--labels", "true,shuffled"), "--labels"),
    (("--holdout", "0"), "--holdout"),
])
def test_bad_input_is_one_line_naming_the_flag(refused, flags, flag):
    assert f"error: {flag}:" in refused("description_length", *flags)


def test_params_reject_bad_chunks_directly():
    with pytest.raises(UsageError, match="increase strictly"):
        parse(Params, ["--chunks", "0.1,0.1,1.0"], prog="test")


@pytest.mark.slow
def test_ddp_codes_like_one_process(run_pipeline):
    flags = ("--examples", "200", "--chunks", "0.5,1.0", "--labels", "true", "--max_epochs", "30")
    single = run_pipeline("description_length", *flags).summary()
    ddp = run_pipeline("description_length", *flags, "--devices", "2", "--strategy", "ddp", "--accelerator", "cpu")
    assert ddp.exit_code == 0
    # the two ranks' half-batches together are the one-process batch: the same training, up to float sums
    assert ddp.summary()["true"]["prequential_bits"] == pytest.approx(single["true"]["prequential_bits"], rel=0.02)
