"""The reading group's nine papers, in the notes' order: each one's claim, the paper's numbers beside
ours, and a verdict computed from its pipeline's summary.json (used by `pipelines.report`).

A verdict is a list of checks. Each check is a criterion written out with the numbers it compared
("random labels are fit: training accuracy 1.000 >= 0.99") and whether it holds; a check whose numbers
the run did not measure (a condition left out by a flag) is "not measured", never a pass. The first
check is the paper's headline claim: the paper's verdict is "holds" when every check holds, "holds
with departures" when the headline holds and another check does not (each departure is listed with
its numbers), "does not hold" when the headline fails. Nothing here is written in: change the
summary and the verdict changes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

FIT = 0.99  # a training set counts as fit at this training accuracy
CHANCE = 0.1  # every dataset of the zoo has 10 classes
NEAR_CHANCE = 0.05  # "tests at chance": within this of it
MATCH = 0.02  # "trains like" / "matches": accuracies within this
SPARSE = 25.0  # lottery tickets: the rounds at or below this percent of the weights (the paper's 21%-3.6%)


@dataclass
class Check:
    criterion: str  # what was compared, with the numbers
    holds: bool | None  # None: not measured by this run

    @property
    def outcome(self) -> str:
        return {True: "holds", False: "does not hold", None: "not measured"}[self.holds]


def check(claim: str, values: dict, text: str, test: Callable[..., bool]) -> Check:
    """`claim: text` with `values` filled in, and whether `test(**values)` holds; not measured when a value is None."""
    if any(v is None for v in values.values()):
        missing = ", ".join(k for k, v in values.items() if v is None)
        return Check(f"{claim}: not in this run's summary ({missing})", None)
    return Check(f"{claim}: {text.format(**values)}", bool(test(**values)))


def verdict(checks: list[Check]) -> str:
    if not checks or checks[0].holds is None:
        return "not measured"
    if not checks[0].holds:
        return "does not hold"
    return "holds with departures" if any(c.holds is False for c in checks[1:]) else "holds"


@dataclass
class Row:
    """One row of a paper's table: what is compared, the paper's number, ours."""

    what: str
    paper: str
    ours: str


@dataclass
class Paper:
    pipeline: str
    cite: str
    title: str
    claim: str  # in our words
    setting: str  # data, net, budget: formatted with the run's parameters (strings)
    rows: Callable[[dict, dict], list[Row]]  # (summary, params) -> the table
    checks: Callable[[dict, dict], list[Check]]  # (summary, params) -> the checks, headline first


def get(tree, *path):
    """tree[path[0]][path[1]]..., or None where a key is missing."""
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def joined(values, spec: str = ".3f", sep: str = " / ") -> str:
    return sep.join("not fit" if v is None else format(v, spec) for v in values)


def sig(x: float) -> str:
    """Three significant digits without an exponent from 1,000 up: 0.0388, 3.15, 2,408."""
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.3g}"


def span(values, spec: str = ".3f") -> str:
    low, high = min(values), max(values)
    return format(low, spec) if low == high else f"{format(low, spec)}-{format(high, spec)}"


# -- Zhang, Bengio, Hardt, Recht & Vinyals 2017 --------------------------------------------------

def _randomization_rows(s: dict, p: dict) -> list[Row]:
    rl, tl = get(s, "conditions", "random_labels") or {}, get(s, "conditions", "true_labels") or {}
    noise = {k: v for k, v in (s.get("label_noise") or {}).items() if k not in ("0", "1")}
    rows = []
    if rl:
        rows += [Row("random labels: training accuracy", "99.3% (MLP 1x512, CIFAR-10)", f"{rl['train_acc']:.1%}"),
                 Row("random labels: test accuracy", "10.6% (chance 10%)", f"{rl['test_acc']:.1%}")]
    if rl.get("steps_to_fit") and tl.get("steps_to_fit"):
        rows.append(Row("steps to fit: random / true labels", "a small constant factor more (Fig. 1a)",
                        f"{rl['steps_to_fit']:,} / {tl['steps_to_fit']:,} ({rl['steps_to_fit'] / tl['steps_to_fit']:.1f}x)"))
    if noise:
        rows.append(Row(f"test accuracy at label noise {' / '.join(noise)}", "falls steadily to chance (Fig. 1c)",
                        joined(v["test_acc"] for v in noise.values())))
    return rows


def _randomization_checks(s: dict, p: dict) -> list[Check]:
    rl, tl = get(s, "conditions", "random_labels") or {}, get(s, "conditions", "true_labels") or {}
    return [
        check("random labels are fit", {"acc": rl.get("train_acc")}, f"training accuracy {{acc:.3f}} >= {FIT}",
              lambda acc: acc >= FIT),
        check("and then test at chance", {"acc": rl.get("test_acc")},
              f"test accuracy {{acc:.3f}} <= chance {CHANCE} + {NEAR_CHANCE}", lambda acc: acc <= CHANCE + NEAR_CHANCE),
        check("random labels take longer to fit than true labels",
              {"random": rl.get("steps_to_fit"), "true": tl.get("steps_to_fit")}, "{random:,} steps > {true:,}",
              lambda random, true: random > true),
    ]


# -- Arpit et al. 2017 ------------------------------------------------------------------------------

def _levels(s: dict, kind: str) -> dict[str, object]:
    return get(s, "epochs_to_fit", kind) or {}


def _epochs(value) -> float:
    return math.inf if value is None else value  # not fit within the budget: longer than any that fit


def _memorization_rows(s: dict, p: dict) -> list[Row]:
    rows = [Row(f"epochs to fit, {kind} at {' / '.join(levels)}", "rise with the noise level (Fig. 1)",
                joined(levels.values(), "d")) for kind in ("randY", "randX") if (levels := _levels(s, kind))]
    share = get(s, "learned_first_epoch_share", "randY") or {}
    noisy = {level: g for level, g in share.items() if g["noisy"] is not None}
    if noisy:
        rows.append(Row(f"share learned for good in epoch 1, clean / noisy, randY at {' / '.join(noisy)}",
                        "real examples first, noise later (Fig. 2)",
                        "; ".join(f"{g['clean']:.2f} / {g['noisy']:.3f}" for g in noisy.values())))
    regularizers = s.get("regularizers") or {}
    for name in ("dropout", "input_noise", "weight_decay"):
        for row in regularizers.get(name, []):
            none = regularizers["none"][0]
            rows.append(Row(f"{name} {row['strength']:g}: validation accuracy on real data / training accuracy on "
                            f"{regularizers['noise']}", "dropout holds back memorization, not learning (Fig. 10)",
                            f"{row['val_acc_real']:.3f} / {row['train_acc_noise']:.3f} (none: "
                            f"{none['val_acc_real']:.3f} / {none['train_acc_noise']:.3f})"))
    return rows


def _memorization_checks(s: dict, p: dict) -> list[Check]:
    share = get(s, "learned_first_epoch_share", "randY") or {}
    noisy = {level: g for level, g in share.items() if g["noisy"] is not None}
    checks = [check("real examples are learned first",
                    {"levels": " / ".join(noisy) or None, "clean": joined((g["clean"] for g in noisy.values()), ".2f"),
                     "noisy": joined(g["noisy"] for g in noisy.values())},
                    "at randY {levels}, the share of clean examples learned for good in epoch 1, {clean}, is at "
                    "least 10x the noisy examples' {noisy}",
                    lambda **_: all(g["clean"] >= 10 * g["noisy"] for g in noisy.values()))]
    for kind in ("randY", "randX"):
        levels = _levels(s, kind)
        clean, noisy_levels = levels.get("0"), {k: v for k, v in levels.items() if k != "0"}
        values = {"kind": kind, "clean": clean, "levels": " / ".join(noisy_levels) or None,
                  "epochs": joined(noisy_levels.values(), "d")}
        checks.append(check(f"noise slows fitting ({kind})", values,
                            "epochs to fit at {kind} {levels}: {epochs}, each more than clean data's {clean}",
                            lambda **_: all(_epochs(v) > clean for v in noisy_levels.values())))
    ordered = list(_levels(s, "randY").values())
    checks.append(check("more noise, more epochs (randY)", {"epochs": joined(ordered, "d") if ordered else None},
                        "epochs to fit rise with every noise level: {epochs}",
                        lambda **_: all(_epochs(a) <= _epochs(b) for a, b in zip(ordered, ordered[1:]))))
    regularizers = s.get("regularizers") or {}
    if regularizers.get("dropout"):
        none, dropout = regularizers["none"][0], regularizers["dropout"][0]
        checks.append(check("dropout holds back memorization, not learning",
                            {"noise": dropout["train_acc_noise"], "none_noise": none["train_acc_noise"],
                             "real": dropout["val_acc_real"], "none_real": none["val_acc_real"]},
                            f"on noise training accuracy {{noise:.3f}} < {{none_noise:.3f}} without it, on real data "
                            f"validation accuracy {{real:.3f}} >= {{none_real:.3f}} - {MATCH}",
                            lambda noise, none_noise, real, none_real: noise < none_noise and real >= none_real - MATCH))
    return checks


# -- Zhang, Bengio & Singer ---------------------------------------------------------------------------

def _damage(s: dict) -> dict[str, float]:
    """Per layer, the test error added by re-initializing it to its earliest checkpoint (epoch 0 by default)."""
    reinit = s.get("reinit") or {}
    return {name: errors[min(errors, key=int)] - s["baseline_error"] for name, errors in reinit.items()}


def _layer_rows(s: dict, p: dict) -> list[Row]:
    damage, rerandomized = _damage(s), list((s.get("rerandomize") or {}).values())
    if not damage:
        return []
    first, *rest = damage
    base = s["baseline_error"]
    return [Row(f"{first} (first layer) re-initialized to epoch 0: test error", "high: the critical layer (MLP, MNIST, Fig. 2)",
                f"{base + damage[first]:.3f} (trained {base:.3f})"),
            Row("later layers re-initialized to epoch 0: test error", "close to trained: robust",
                ", ".join(f"{n} {base + damage[n]:.3f}" for n in rest)),
            Row("any layer re-randomized: test error", "near chance: destroyed", span(rerandomized))]


def _layer_checks(s: dict, p: dict) -> list[Check]:
    margin = float(p.get("robust_margin", MATCH))
    damage = _damage(s)
    first, rest = (next(iter(damage)), list(damage)[1:]) if damage else (None, [])
    rerandomized = list((s.get("rerandomize") or {}).values())
    return [
        check("the first layer is critical", {"layer": first, "damage": damage.get(first)},
              f"re-initializing {{layer}} to epoch 0 adds {{damage:.3f}} test error > {margin}",
              lambda layer, damage: damage > margin),
        check("the layers after it are robust", {"added": ", ".join(f"{n} +{damage[n]:.3f}" for n in rest) or None},
              f"re-initialized to epoch 0 they add {{added}} test error, each <= {margin}",
              lambda added: all(damage[n] <= margin for n in rest)),
        check("re-randomizing any layer destroys the net", {"errors": span(rerandomized) if rerandomized else None},
              f"test error {{errors}} after re-randomizing a layer, each >= 0.5 (chance {1 - CHANCE:.2f})",
              lambda errors: min(rerandomized) >= 0.5),
    ]


# -- Li, Farkhoor, Liu & Yosinski 2018 ----------------------------------------------------------------

PAPER_D_INT90 = {199_210: ("FC 784-200-200-10", 750), 44_426: ("LeNet", 290)}  # MNIST, by the net's D


def _intrinsic_rows(s: dict, p: dict) -> list[Row]:
    if "d_int90" not in s:
        return []
    measured = [x["d_int90"] for x in s.get("seeds", []) if x["d_int90_is"] == "measured"]
    spread = f" ({span(measured, ',.0f')} over {len(measured)} seeds)" if len(measured) > 1 else ""
    net, paper = PAPER_D_INT90.get(s["D"], (f"D = {s['D']:,}", None))
    return [Row(f"d_int90, {net}", f"{paper:,} (MNIST)" if paper else "not reported",
                f"{_bound(s)}{spread}, baseline accuracy {s['baseline_acc']:.3f}"),
            Row("parameters D", f"{s['D']:,}" if paper else "-", f"{s['D']:,}")]


def _bound(s: dict) -> str:
    return {"measured": "", "at_most": "<= ", "above": "> "}[s["d_int90_is"]] + f"{s['d_int90']:,.0f}"


def _intrinsic_checks(s: dict, p: dict) -> list[Check]:
    kind, d, big = s.get("d_int90_is"), s.get("d_int90"), s.get("D")
    if d is None:
        return [Check("the intrinsic dimension is small: not in this run's summary (d_int90)", None)]
    # A bound decides the claim only from its side: "<= x" with x <= 1% of D holds, "> x" with x >= 1% of D fails.
    small = {"measured": d <= big / 100, "at_most": True if d <= big / 100 else None,
             "above": False if d >= big / 100 else None}[kind]
    checks = [Check(f"the intrinsic dimension is small: d_int90 {_bound(s)} is {d / big:.2%} of D = {big:,}, <= 1%", small)]
    net, paper = PAPER_D_INT90.get(big, (None, None))
    if paper is None:
        return checks + [Check(f"close to the paper's: the paper reports no d_int90 for D = {big:,}", None)]
    return checks + [Check(f"close to the paper's: d_int90 {_bound(s)} within a factor 2 of the paper's {paper:,} ({net})",
                           paper / 2 <= d <= 2 * paper if kind == "measured" else None)]


# -- Santurkar, Tsipras, Ilyas & Madry 2018 -----------------------------------------------------------

def _bn_pairs(s: dict, variant: str) -> dict[str, tuple[dict, dict]]:
    """{lr: (BN's entry, the variant's)} at every lr where both ran and neither died."""
    runs = s.get("runs") or {}
    pairs = {}
    for key, entry in runs.items():
        name, lr = key.rsplit("@", 1)
        other = runs.get(f"{variant}@{lr}")
        if name == "bn" and other and not entry["died"] and not other["died"]:
            pairs[lr] = (entry, other)
    return pairs


def _bn_rows(s: dict, p: dict) -> list[Row]:
    rows = []
    for lr, (bn, none) in _bn_pairs(s, "none").items():
        rows += [Row(f"loss range along -g, BN / none, lr {lr}", "smaller with BN (VGG, CIFAR-10, Fig. 4a)",
                     f"{sig(bn['loss_range_mean'])} / {sig(none['loss_range_mean'])}"),
                 Row(f"gradient change along -g, BN / none, lr {lr}", "smaller with BN (Fig. 4b)",
                     f"{sig(bn['grad_change_mean'])} / {sig(none['grad_change_mean'])}")]
    for lr, (bn, noisy) in _bn_pairs(s, "noisy_bn").items():
        rows.append(Row(f"final test accuracy, BN / noisy BN (scale {p.get('noise_scale', '?')}), lr {lr}",
                        "noisy BN trains like BN (Fig. 2)", f"{bn['final_test_acc']:.3f} / {noisy['final_test_acc']:.3f}"))
    return rows


def _bn_checks(s: dict, p: dict) -> list[Check]:
    def compare(claim: str, variant: str, key: str, text: str, test) -> Check:
        pairs = _bn_pairs(s, variant)
        listed = ", ".join(f"lr {lr}: {sig(bn[key])} vs {sig(other[key])}" for lr, (bn, other) in pairs.items())
        return check(claim, {"listed": listed or None}, text + ": {listed}",
                     lambda listed: all(test(bn[key], other[key]) for bn, other in pairs.values()))

    return [
        compare("BatchNorm smooths the loss", "none", "loss_range_mean",
                "BN's loss range along -g below no BN's at every lr", lambda bn, none: bn < none),
        compare("and makes the gradient more predictive", "none", "grad_change_mean",
                "BN's gradient change along -g below no BN's at every lr", lambda bn, none: bn < none),
        compare(f"noisy BN (noise scale {p.get('noise_scale', '?')}) trains like BN", "noisy_bn", "final_test_acc",
                f"final test accuracy of BN vs noisy BN within {MATCH} at every lr", lambda bn, noisy: noisy >= bn - MATCH),
    ]


# -- Brutzkus & Globerson 2019 --------------------------------------------------------------------------

def _xor_ks(s: dict) -> dict[int, dict]:
    return {int(k): v for k, v in (s.get("ks") or {}).items()}


def _xor_rows(s: dict, p: dict) -> list[Row]:
    ks, clustering = _xor_ks(s), s.get("clustering_init") or {}
    rows = [Row("mean test accuracy per k", "small k often fails, large k generalizes (Fig. 13)",
                ", ".join(f"k={k} {v['test_acc']:.3f}" for k, v in sorted(ks.items())))] if ks else []
    if clustering.get("clustered_init_test_acc") is not None:
        rows.append(Row(f"k={p.get('small_k', '?')} from k={p.get('large_k', '?')}'s clustered filters / from random init",
                        "clustering fixes the small net (Fig. 15)",
                        f"{clustering['clustered_init_test_acc']:.3f} / {clustering['random_init_test_acc']:.3f}"))
    return rows


def _xor_checks(s: dict, p: dict) -> list[Check]:
    ks, clustering = _xor_ks(s), s.get("clustering_init") or {}
    small, large = (min(ks), max(ks)) if len(ks) > 1 else (None, None)
    acc = lambda k: ks[k]["test_acc"] if k is not None else None
    return [
        check("the large net generalizes", {"k": large, "acc": acc(large)},
              f"k={{k}} mean test accuracy {{acc:.3f}} >= {FIT}", lambda k, acc: acc >= FIT),
        check("the small net often misses the detector", {"k": small, "small": acc(small), "large": acc(large)},
              f"k={{k}} mean test accuracy {{small:.3f}} at least {MATCH} below the large net's {{large:.3f}}",
              lambda k, small, large: small <= large - MATCH),
        check("clustering the large net's filters fixes the small net",
              {"clustered": clustering.get("clustered_init_test_acc"), "random": clustering.get("random_init_test_acc")},
              f"test accuracy {{clustered:.3f}} from clustered filters, >= {FIT} and above {{random:.3f}} from random init",
              lambda clustered, random: clustered >= FIT and clustered > random),
    ]


# -- Belkin, Hsu, Ma & Mandal 2018 ------------------------------------------------------------------------

DD_PAPER = {"rff": "peak at N = n (RFF, MNIST n = 10^4, Fig. 2)", "nn": "peak at n x K parameters (MNIST n = 4,000, Fig. 3)",
            "forest": "peak at the interpolating tree (MNIST n = 10^4, Fig. 4)"}


def _descent(curve: dict) -> dict:
    """The test risk at the size nearest the interpolation threshold, the best below it, and the last."""
    sizes, risk, threshold = curve["sizes"], curve["test_risk"], curve["threshold"]
    at = min(range(len(sizes)), key=lambda i: abs(math.log(sizes[i] / threshold)))
    below = [r for size, r in zip(sizes, risk) if size < threshold]
    peak = max(range(len(sizes)), key=lambda i: risk[i])
    return {"at": risk[at], "at_size": sizes[at], "threshold": threshold, "below": min(below) if below else None,
            "last": risk[-1], "last_size": sizes[-1], "peak_size": sizes[peak], "peak_is_at": peak == at}


def _methods(s: dict) -> list[str]:
    return sorted((m for m in s if m in DD_PAPER), key=list(DD_PAPER).index)


def _dd_rows(s: dict, p: dict) -> list[Row]:
    rows = []
    for method in _methods(s):
        d = _descent(s[method])
        rows.append(Row(f"{method}: test squared loss at the threshold / best below / largest model", DD_PAPER[method],
                        f"{sig(d['at'])} at {d['at_size']:,} / {'-' if d['below'] is None else sig(d['below'])} / "
                        f"{sig(d['last'])} at {d['last_size']:,}"))
    return rows


def _dd_checks(s: dict, p: dict) -> list[Check]:
    checks = []
    for method in _methods(s):
        d = _descent(s[method])
        if method == "rff":
            checks.append(Check(f"rff: the test risk peaks at the interpolation threshold: the largest test risk of "
                                f"the sweep is at N = {d['peak_size']:,} (n = {d['threshold']:,})", d["peak_is_at"]))
        claim = f"{method}: the test risk rises at the threshold and falls again beyond it"
        checks.append(Check(f"{claim}: no size below the threshold in this run", None) if d["below"] is None else Check(
            f"{claim}: {sig(d['at'])} at size {d['at_size']:,} (threshold {d['threshold']:,.0f}) above the best below "
            f"it, {sig(d['below'])}; {sig(d['last'])} at {d['last_size']:,}, below that",
            d["at"] > d["below"] and d["last"] < d["below"]))
    return checks or [Check("double descent: no method in this run's summary", None)]


# -- Frankle & Carbin 2019 --------------------------------------------------------------------------------

def _sparse_rounds(s: dict) -> list[dict]:
    return [r for r in s.get("rounds") or [] if r["weights_remaining"] <= SPARSE]


def _lottery_rows(s: dict, p: dict) -> list[Row]:
    rounds, dense = _sparse_rounds(s), s.get("dense")
    if not rounds or not dense:
        return []
    where = f"at {span([r['weights_remaining'] for r in rounds], '.1f')}% of the weights"
    kinds = [k for k in ("winning", "random_reinit", "random_prune") if k in rounds[0]]
    pick = lambda key, spec: " / ".join(span([r[k][key] for r in rounds], spec) for k in kinds)
    return [Row(f"early-stop iteration {where}: {' / '.join(kinds)} (dense)",
                "tickets earlier than dense; random re-init later (LeNet-300-100, MNIST, 21%-3.6%)",
                f"{pick('early_stop_iter', ',.0f')} (dense {dense['early_stop_iter']:,.0f})"),
            Row(f"test accuracy at early stop {where}: {' / '.join(kinds)} (dense)",
                "tickets at or above dense; random re-init below", f"{pick('test_acc_at_early_stop', '.3f')} "
                                                                   f"(dense {dense['test_acc_at_early_stop']:.3f})")]


def _lottery_checks(s: dict, p: dict) -> list[Check]:
    rounds, dense = _sparse_rounds(s), s.get("dense") or {}
    reinit = [r for r in rounds if "random_reinit" in r]
    where = f"at every round with <= {SPARSE:g}% of the weights"
    mean = lambda kind, rows: sum(r[kind]["test_acc_at_early_stop"] for r in rows) / len(rows) if rows else None
    return [
        check("winning tickets learn faster", {
            "tickets": span([r["winning"]["early_stop_iter"] for r in reinit], ",.0f") if reinit else None,
            "reinit": span([r["random_reinit"]["early_stop_iter"] for r in reinit], ",.0f") if reinit else None},
            f"{where}, the ticket stops earlier than its random re-initialization (iterations {{tickets}} vs {{reinit}})",
            lambda **_: all(r["winning"]["early_stop_iter"] < r["random_reinit"]["early_stop_iter"] for r in reinit)),
        check("and match the dense net", {
            "tickets": span([r["winning"]["test_acc_at_early_stop"] for r in rounds]) if rounds else None,
            "dense": dense.get("test_acc_at_early_stop")},
            f"{where}, test accuracy at early stop {{tickets}} >= the dense net's {{dense:.3f}} - 0.01",
            lambda tickets, dense: all(r["winning"]["test_acc_at_early_stop"] >= dense - 0.01 for r in rounds)),
        check("random re-initialization does not", {"reinit": mean("random_reinit", reinit), "tickets": mean("winning", reinit)},
              "its mean test accuracy at early stop over those rounds, {reinit:.3f}, below the tickets' {tickets:.3f}",
              lambda reinit, tickets: reinit < tickets),
    ]


# -- Blier & Ollivier 2018 -------------------------------------------------------------------------------------

def _dl_rows(s: dict, p: dict) -> list[Row]:
    paper = {"true": "4.10 kbits vs 199 kbits uniform (MNIST, ratio 0.021)", "random": "not reported"}
    return [Row(f"prequential code of the {labels} labels vs uniform", paper[labels],
                f"{row['prequential_bits']:,.0f} bits vs {row['uniform_bits']:,.0f} (ratio {row['ratio']:.3f})")
            for labels, row in s.items() if labels in paper]


def _dl_checks(s: dict, p: dict) -> list[Check]:
    return [check("deep nets compress their labels", {"ratio": get(s, "true", "ratio")},
                  "prequential / uniform code length of the true labels {ratio:.3f} <= 0.5", lambda ratio: ratio <= 0.5),
            check("random labels do not compress", {"ratio": get(s, "random", "ratio")},
                  "their ratio {ratio:.3f} >= 0.95", lambda ratio: ratio >= 0.95)]


PAPERS = [
    Paper("randomization", "Zhang, Bengio, Hardt, Recht & Vinyals 2017",
          "Understanding deep learning requires rethinking generalization",
          "A net big enough to reach zero training error on real data also reaches it on random labels and random "
          "inputs, only a little slower, and then tests at chance: capacity alone cannot explain why it generalizes.",
          "{model} {widths} on {dataset}, SGD lr {lr} momentum {momentum}, batch {batch_size}, until fit or "
          "{max_epochs} epochs", _randomization_rows, _randomization_checks),
    Paper("memorization", "Arpit et al. 2017", "A closer look at memorization in deep networks",
          "Nets learn the real, patterned examples first and memorize noise later: the more noise, the longer they "
          "take to fit; regularizers such as dropout hold back memorization without hurting learning.",
          "{model} {widths} on {dataset}, SGD lr {lr} momentum {momentum}, batch {batch_size}, until training accuracy "
          "{fit_acc} or {max_epochs} epochs; noise {noise_kinds} at {noise_levels}", _memorization_rows, _memorization_checks),
    Paper("layer_robustness", "Zhang, Bengio & Singer 2019", "Are all layers created equal?",
          "After training, putting a later layer back to its initial weights barely changes the test error, while the "
          "first layer is critical; drawing any layer afresh destroys the net.",
          "{model} {widths} on {dataset}, SGD lr {lr} momentum {momentum}, {max_epochs} epochs, checkpoints "
          "{checkpoints}, robust within {robust_margin}", _layer_rows, _layer_checks),
    Paper("intrinsic_dim", "Li, Farkhoor, Liu & Yosinski 2018", "Measuring the intrinsic dimension of objective landscapes",
          "Training in a random d-dimensional subspace of the D weights reaches 90% of the full net's accuracy at a "
          "d (the intrinsic dimension d_int90) that is a tiny fraction of D.",
          "{model} {widths} on {dataset}, {projection} projection, Adam lr {lr}, up to {max_epochs} epochs per "
          "trial, {seeds} seeds, {mode} d in [{d_min}, {d_max}]", _intrinsic_rows, _intrinsic_checks),
    Paper("bn_smoothness", "Santurkar, Tsipras, Ilyas & Madry 2018", "How does batch normalization help optimization?",
          "BatchNorm helps because it makes the loss landscape smoother (the loss and its gradient change less along "
          "the gradient), not because it reduces internal covariate shift: noisy BatchNorm, which adds shift, "
          "still trains like BatchNorm.",
          "{model} on {dataset}, SGD momentum {momentum} at lr {lrs}, {max_epochs} epochs, batch {batch_size}, "
          "variants {variants}, noise scale {noise_scale}", _bn_rows, _bn_checks),
    Paper("xor", "Brutzkus & Globerson 2019",
          "Why do larger models generalize better? A theoretical perspective via the XOR problem",
          "Gradient descent often leaves a small net that could represent the XOR detector at a poor solution, while "
          "an over-parameterized one finds it; clustering the large net's filters makes a good start for the small one.",
          "XOR detection d = {d}, {train_size} training points, k in {ks}, {seeds} seeds, gradient descent lr {lr}, "
          "up to {max_epochs} x {passes_per_epoch} steps", _xor_rows, _xor_checks),
    Paper("double_descent", "Belkin, Hsu, Ma & Mandal 2018",
          "Reconciling modern machine learning and the bias-variance trade-off",
          "Past the interpolation threshold, where a model first fits the training set exactly, the test risk falls "
          "again as the model grows (double descent), often below the best of the classical regime.",
          "{methods} on {n} points of {dataset}; nets up to {max_epochs} epochs, SGD lr {lr}", _dd_rows, _dd_checks),
    Paper("lottery_ticket", "Frankle & Carbin 2019", "The lottery ticket hypothesis: finding sparse, trainable neural networks",
          "A dense net contains sparse subnetworks (found by pruning and rewinding to the initial weights) that "
          "train faster and reach the dense net's accuracy; the same subnetworks re-initialized at random do not.",
          "{model} on {dataset}, Adam lr {lr}, batch {batch_size}, {max_epochs} epochs per training, {rounds} rounds "
          "(fc rate {fc_rate}, output {output_rate}), controls {controls}, {seeds} seed(s)", _lottery_rows, _lottery_checks),
    Paper("description_length", "Blier & Ollivier 2018", "The description length of deep learning models",
          "Sent with a prequential code (each chunk of labels coded by a net trained on the labels already sent), "
          "the labels of real data cost far fewer bits than a uniform code: deep nets compress, although they "
          "have many parameters.",
          "{model} {widths} on {dataset}, Adam lr {lr}, batch {batch_size}, early stopping (patience {patience}), "
          "chunks ending at {chunks}", _dl_rows, _dl_checks),
]
BY_PIPELINE = {paper.pipeline: paper for paper in PAPERS}
