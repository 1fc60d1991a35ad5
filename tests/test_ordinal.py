"""Tests of vlprompt.ordinal: expected numbers are written out by hand or computed with NumPy
independently of the implementation."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

try:
    import vlprompt.ordinal as ordinal
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import vlprompt.ordinal as ordinal

from vlprompt.ordinal import (
    RankEmbeddings,
    RankValueError,
    interpolation_weights,
    k_fold_indices,
    ordinal_loss,
    ordinal_metrics,
    ordinality_score,
    predict,
    rank_values_from_spec,
    ranks_from_values,
    similarity_matrix,
)

EPS = 1e-5


# ------------------------------------------------------------------------------------------------
# interpolation weights
# ------------------------------------------------------------------------------------------------
def test_linear_weights_by_hand():
    # R=3, B=2: anchors 0, 2; w = 1 - d/2
    expected = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])
    assert torch.allclose(interpolation_weights(3, 2, "linear"), expected, atol=1e-7)

    # R=5, B=3: anchors 0, 2, 4; w = 1 - d/4
    # r=0: d=(0,2,4) -> (1, .5, 0)/1.5 ; r=1: d=(1,1,3) -> (.75,.75,.25)/1.75 ; r=2: d=(2,0,2) -> (.5,1,.5)/2
    expected = torch.tensor(
        [
            [2 / 3, 1 / 3, 0.0],
            [3 / 7, 3 / 7, 1 / 7],
            [1 / 4, 1 / 2, 1 / 4],
            [1 / 7, 3 / 7, 3 / 7],
            [0.0, 1 / 3, 2 / 3],
        ]
    )
    assert torch.allclose(interpolation_weights(5, 3, "linear"), expected, atol=1e-7)


def test_inv_prop_weights_by_hand():
    # R=4, B=2: anchors 0, 3; w = 1/(d + 1e-5)
    def row(d0, d1):
        a, b = 1 / (d0 + EPS), 1 / (d1 + EPS)
        return [a / (a + b), b / (a + b)]

    expected = torch.tensor([row(0, 3), row(1, 2), row(2, 1), row(3, 0)], dtype=torch.float64)
    got = interpolation_weights(4, 2, "inv_prop", dtype=torch.float64)
    assert torch.allclose(got, expected, rtol=0, atol=1e-12)
    # r=1 is twice as close to base 0 as to base 1 -> weights ~ (2/3, 1/3)
    assert got[1, 0].item() == pytest.approx(2 / 3, abs=1e-5)
    # an anchor rank is (almost) its base
    assert got[0, 0].item() == pytest.approx(1 - (EPS / 3), abs=1e-9)


@pytest.mark.parametrize("kind", ["linear", "inv_prop", "normal"])
@pytest.mark.parametrize("num_ranks,num_base", [(1, 3), (2, 2), (7, 1), (10, 3), (101, 2), (101, 7), (5, 9)])
def test_weight_rows_sum_to_one(kind, num_ranks, num_base):
    w = interpolation_weights(num_ranks, num_base, kind)
    assert w.shape == (num_ranks, num_base)
    assert torch.isfinite(w).all()  # the reference's "normal" gives NaN at R=101, B=2
    assert (w >= 0).all()
    assert torch.allclose(w.sum(dim=1), torch.ones(num_ranks), atol=1e-6)


def test_single_base_is_all_ones_and_bad_kind_fails():
    assert torch.equal(interpolation_weights(6, 1, "linear"), torch.ones(6, 1))
    with pytest.raises(ValueError, match="cubic"):
        interpolation_weights(5, 2, "cubic")


# ------------------------------------------------------------------------------------------------
# RankEmbeddings
# ------------------------------------------------------------------------------------------------
def test_rank_embeddings_interpolated_matches_manual_sum():
    torch.manual_seed(0)
    m = RankEmbeddings(num_ranks=6, num_tokens=2, dim=5, num_base=3, kind="inv_prop")
    assert m.base.shape == (3, 2, 5) and m.weights.shape == (6, 3)
    assert "weights" not in m.state_dict() and set(m.state_dict()) == {"base"}
    out = m()
    assert out.shape == (6, 2, 5)
    w = interpolation_weights(6, 3, "inv_prop")
    for r in range(6):
        manual = sum(w[r, b] * m.base[b] for b in range(3))
        assert torch.allclose(out[r], manual, atol=1e-6)


def test_rank_embeddings_free_and_init():
    init = torch.arange(2 * 3 * 4, dtype=torch.float64).reshape(2, 3, 4)
    m = RankEmbeddings(num_ranks=5, num_tokens=3, dim=4, num_base=2, kind="linear", init=init)
    assert m.base.dtype == torch.float32
    assert torch.equal(m.base.detach(), init.float())
    init.add_(100.0)  # copied, not shared
    assert m.base[0, 0, 0].item() == 0.0
    out = m()
    # linear with 2 bases: rank r = (1 - r/4) * base0 + r/4 * base1
    assert torch.allclose(out[1], 0.75 * m.base[0] + 0.25 * m.base[1])
    assert torch.allclose(out[0], m.base[0]) and torch.allclose(out[4], m.base[1])

    free = RankEmbeddings(num_ranks=5, num_tokens=3, dim=4, num_base=None, init_std=0.5)
    assert free().shape == (5, 3, 4) and free.embeds.std().item() > 0.1
    assert set(dict(free.named_parameters())) == {"embeds"}
    with pytest.raises(ValueError, match=r"\(B, T, D\)"):
        RankEmbeddings(num_ranks=5, num_tokens=3, dim=4, num_base=2, init=torch.zeros(2, 1, 4))


# "normal" (exp(-d^2)) saturates quickly: with 9 ranks neighbouring ranks coincide in float32
@pytest.mark.parametrize("kind,num_ranks", [("linear", 9), ("inv_prop", 9), ("normal", 5)])
def test_interpolated_ranks_keep_their_order_along_the_bases(kind, num_ranks):
    dim = 6
    e0 = torch.zeros(1, 1, dim)
    e1 = torch.zeros(1, 1, dim)
    e0[0, 0, 0], e1[0, 0, 1] = 1.0, 1.0
    m = RankEmbeddings(num_ranks=num_ranks, num_tokens=1, dim=dim, num_base=2, kind=kind, init=torch.cat([e0, e1]))
    direction = (e1 - e0).reshape(-1)
    proj = m().reshape(num_ranks, dim) @ direction
    assert (proj[1:] > proj[:-1]).all(), proj
    assert proj[0].item() == pytest.approx(-1.0, abs=1e-4) and proj[-1].item() == pytest.approx(1.0, abs=1e-4)


def _graph_names(t: torch.Tensor) -> set[str]:
    seen, names, stack = set(), set(), [t.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        stack.extend(f for f, _ in fn.next_functions)
    return names


def test_rank_embeddings_gradients_and_no_slice_writes():
    torch.manual_seed(0)
    m = RankEmbeddings(num_ranks=11, num_tokens=2, dim=8, num_base=3, kind="linear")
    out = m()
    assert not any("CopySlices" in n for n in _graph_names(out))
    target = torch.randn_like(out)
    ((out - target) ** 2).sum().backward()
    assert m.base.grad is not None and torch.isfinite(m.base.grad).all() and m.base.grad.abs().sum() > 0
    # d/d base[b] = sum_r w[r, b] * 2 (out[r] - target[r])
    w = m.weights
    expected = torch.einsum("rb,rtd->btd", w, 2 * (out.detach() - target))
    assert torch.allclose(m.base.grad, expected, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# loss
# ------------------------------------------------------------------------------------------------
LOGITS = np.array(
    [
        [2.0, 0.5, -1.0, 0.3],
        [0.1, 1.2, 0.7, -0.4],
        [-0.5, 0.0, 1.5, 0.2],
        [1.0, -1.0, 0.0, 0.9],
        [0.3, 0.8, -0.2, 1.1],
    ]
)
TARGETS = np.array([0, 2, 2, 0, 2])  # ranks 1 and 3 are absent; rank 0 twice, rank 2 three times


def _np_log_softmax(x):
    x = x - x.max()
    return x - np.log(np.exp(x).sum())


def _expected_loss_parts():
    n = len(TARGETS)
    ce = np.mean([-_np_log_softmax(LOGITS[i])[TARGETS[i]] for i in range(n)])
    e10 = math.exp(10.0)
    # rank 0: images 0 and 3 carry e^10, the three others 1; rank 2: images 1, 2, 4 carry e^10
    z0 = 2 * e10 + 3
    q0 = np.array([e10 / z0, 1 / z0, 1 / z0, e10 / z0, 1 / z0])
    z2 = 3 * e10 + 2
    q2 = np.array([1 / z2, e10 / z2, e10 / z2, 1 / z2, e10 / z2])
    kl0 = np.sum(q0 * (np.log(q0) - _np_log_softmax(LOGITS[:, 0])))
    kl2 = np.sum(q2 * (np.log(q2) - _np_log_softmax(LOGITS[:, 2])))
    kl = (kl0 + kl2) / 2  # two distinct ranks present
    return ce, kl


def test_loss_by_hand():
    ce, kl = _expected_loss_parts()
    logits = torch.tensor(LOGITS, dtype=torch.float32, requires_grad=True)
    loss, parts = ordinal_loss(logits, torch.tensor(TARGETS))
    assert parts["ce_loss"].item() == pytest.approx(ce, rel=1e-5)
    assert parts["kl_loss"].item() == pytest.approx(kl, rel=1e-5)
    assert loss.item() == pytest.approx(ce + kl, rel=1e-5)
    assert kl > 0.1 and ce > 0.5  # the numbers are not trivial

    loss_w, _ = ordinal_loss(logits, torch.tensor(TARGETS), ce_weight=0.5, kl_weight=2.0)
    assert loss_w.item() == pytest.approx(0.5 * ce + 2.0 * kl, rel=1e-5)

    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    assert logits.grad.abs().sum() > 0


def test_loss_absent_ranks_do_not_enter_the_kl():
    logits = torch.tensor(LOGITS, dtype=torch.float32)
    _, base = ordinal_loss(logits, torch.tensor(TARGETS))
    changed = logits.clone()
    changed[:, 1] = torch.tensor([5.0, -3.0, 0.0, 2.0, 1.0])  # rank 1 is absent
    _, parts = ordinal_loss(changed, torch.tensor(TARGETS))
    assert parts["kl_loss"].item() == pytest.approx(base["kl_loss"].item(), rel=1e-6)
    assert parts["ce_loss"].item() != pytest.approx(base["ce_loss"].item(), rel=1e-3)
    # gradient of the KL alone w.r.t. absent-rank logits is zero
    x = logits.clone().requires_grad_(True)
    ordinal_loss(x, torch.tensor(TARGETS), ce_weight=0.0)[0].backward()
    assert torch.all(x.grad[:, [1, 3]] == 0) and x.grad[:, [0, 2]].abs().sum() > 0


def test_loss_rejects_bad_targets():
    with pytest.raises(ValueError, match="4"):
        ordinal_loss(torch.zeros(2, 4), torch.tensor([0, 4]))


# ------------------------------------------------------------------------------------------------
# predictions and metrics
# ------------------------------------------------------------------------------------------------
def test_predict_by_hand():
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.7], [0.5, 0.3, 0.2]]))
    out = predict(logits, torch.tensor([10.0, 20.0, 30.0]))
    assert out["argmax"].tolist() == [30.0, 10.0]
    assert out["index"].tolist() == [2, 0]
    assert out["expectation"].tolist() == pytest.approx([26.0, 17.0], abs=1e-5)  # 1+4+21, 5+6+6
    default = predict(logits)  # rank values 0, 1, 2
    assert default["expectation"].tolist() == pytest.approx([1.6, 0.7], abs=1e-6)
    assert default["argmax"].tolist() == [2.0, 0.0]


def test_metrics_by_hand():
    m = ordinal_metrics([30.0, 10.0], [26.0, 17.0], [30.0, 20.0])
    assert m == pytest.approx(
        {"mae_argmax": 5.0, "acc_argmax": 50.0, "mae_expectation": 3.5, "acc_expectation": 0.0}
    )
    m = ordinal_metrics(torch.tensor([2.0, 0.0, 1.0]), torch.tensor([1.6, 0.7, 1.4]), torch.tensor([2, 1, 1]))
    # argmax: |0|,|1|,|0| ; expectation rounds to 2, 1, 1 -> all correct
    assert m["mae_argmax"] == pytest.approx(1 / 3)
    assert m["acc_argmax"] == pytest.approx(200 / 3)
    assert m["mae_expectation"] == pytest.approx((0.4 + 0.3 + 0.4) / 3)
    assert m["acc_expectation"] == pytest.approx(100.0)
    # bin centres: 12 rounds to 12 != 15, but its nearest rank value is 15
    plain = ordinal_metrics([15.0], [12.0], [15.0])
    snapped = ordinal_metrics([15.0], [12.0], [15.0], rank_values=[5.0, 15.0, 25.0])
    assert plain["acc_expectation"] == 0.0 and snapped["acc_expectation"] == 100.0


# ------------------------------------------------------------------------------------------------
# ordinality
# ------------------------------------------------------------------------------------------------
def _angles(theta):
    theta = torch.as_tensor(theta, dtype=torch.float64)
    return torch.stack([theta.cos(), theta.sin()], dim=1)


def test_similarity_matrix():
    s = similarity_matrix(torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]]))
    r = 1 / math.sqrt(2)
    expected = torch.tensor([[1.0, 0.0, r], [0.0, 1.0, r], [r, r, 1.0]])
    assert torch.allclose(s, expected, atol=1e-6)


def test_ordinality_monotone_prototypes_score_100():
    protos = _angles(np.linspace(0.0, 2.8, 20))  # angles increasing, total span < pi
    assert ordinality_score(protos) == 100.0
    assert ordinality_score(protos, definition="triples") == 100.0
    for span in (1, 2, 4, 8, 16, 19):
        assert ordinality_score(protos, span=span) == 100.0


def test_ordinality_shuffled_prototypes_score_lower():
    protos = _angles(np.linspace(0.0, 2.8, 20))
    perm = torch.from_numpy(np.random.default_rng(0).permutation(20))
    shuffled = protos[perm]
    ref, tri = ordinality_score(shuffled), ordinality_score(shuffled, definition="triples")
    assert ref < 80.0 and tri < 80.0
    assert ref >= 200 / 20  # the j == i comparisons are always true


def test_ordinality_by_hand():
    # v0 at 0 deg, v1 at 90 deg, v2 at 60 deg: S01 = 0 < S02 = 0.5 (one violation)
    protos = _angles(np.deg2rad([0.0, 90.0, 60.0]))
    # reference comparisons: S00>S01 (T), S01>S02 (F), S11>S12 (T) -> 2/3
    assert ordinality_score(protos) == pytest.approx(200 / 3)
    assert ordinality_score(protos, span=1) == 100.0  # only the trivial j == i comparisons
    # triples: anchor 0: S00>S01, S00>S02, S01>S02(F); anchor 1: S11>S12, S11>S10;
    # anchor 2: S22>S21, S22>S20, S21>S20 (0.866 > 0.5) -> 7 of 8 comparisons
    assert ordinality_score(protos, definition="triples") == pytest.approx(700 / 8)
    with pytest.raises(ValueError):
        ordinality_score(protos, span=3)


# ------------------------------------------------------------------------------------------------
# ranks from values
# ------------------------------------------------------------------------------------------------
def test_ranks_from_integer_range():
    ranks, values = ranks_from_values([0, 23, 100, 55.0, 16.6], "0:100")
    assert ranks.dtype == torch.long
    assert ranks.tolist() == [0, 23, 100, 55, 17]
    assert values.shape == (101,) and values[0].item() == 0.0 and values[-1].item() == 100.0
    ranks, values = ranks_from_values(np.array([16, 77]), "16:77")
    assert ranks.tolist() == [0, 61] and values.tolist()[:2] == [16.0, 17.0] and len(values) == 62


def test_ranks_from_value_out_of_range_names_it():
    with pytest.raises(ValueError, match="101"):
        ranks_from_values([3, 101, 5], "0:100")
    with pytest.raises(RankValueError, match="-2"):
        ranks_from_values([-2], "0:100")
    with pytest.raises(ValueError, match="nan"):
        ranks_from_values([1.0, float("nan")], "0:100")
    with pytest.raises(ValueError):
        ranks_from_values([1], "5:2")


def test_ranks_from_bins():
    edges = [0, 10, 20, 40]
    ranks, values = ranks_from_values(torch.tensor([0.0, 9.99, 10.0, 39.0, 40.0, 20.0]), edges)
    assert ranks.tolist() == [0, 0, 1, 2, 2, 2]
    assert values.tolist() == [5.0, 15.0, 30.0]
    ranks_s, values_s = ranks_from_values([15], "0,10,20,40")
    assert ranks_s.tolist() == [1] and values_s.tolist() == [5.0, 15.0, 30.0]
    assert rank_values_from_spec("0:4").tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    with pytest.raises(ValueError, match="41"):
        ranks_from_values([5, 41], edges)
    with pytest.raises(ValueError, match="increasing"):
        ranks_from_values([5], [0, 10, 10])


# ------------------------------------------------------------------------------------------------
# folds
# ------------------------------------------------------------------------------------------------
def test_k_fold_disjoint_covering_sizes():
    folds = k_fold_indices(10, 3, seed=7)
    assert len(folds) == 3
    tests = [t for _, t in folds]
    assert sorted(len(t) for t in tests) == [3, 3, 4]
    assert sorted(np.concatenate(tests).tolist()) == list(range(10))
    for train, test in folds:
        assert train.dtype == np.int64 and test.dtype == np.int64
        assert not set(train.tolist()) & set(test.tolist())
        assert sorted(train.tolist() + test.tolist()) == list(range(10))
    with pytest.raises(ValueError):
        k_fold_indices(2, 3)


def test_k_fold_deterministic_across_processes():
    folds = k_fold_indices(23, 5, seed=3)
    again = k_fold_indices(23, 5, seed=3)
    other = k_fold_indices(23, 5, seed=4)
    as_lists = [[tr.tolist(), te.tolist()] for tr, te in folds]
    assert as_lists == [[tr.tolist(), te.tolist()] for tr, te in again]
    assert as_lists != [[tr.tolist(), te.tolist()] for tr, te in other]

    src = str(Path(ordinal.__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=src + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONHASHSEED="123")
    code = (
        "import json; from vlprompt.ordinal import k_fold_indices; "
        "print(json.dumps([[a.tolist(), b.tolist()] for a, b in k_fold_indices(23, 5, seed=3)]))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(out.stdout) == as_lists


def test_fold_summary_is_the_population_std_of_vlprompt_stats():
    from vlprompt.cli.ordinal import summarise_folds
    from vlprompt.errors import VLPromptError

    s = summarise_folds([{"mae": 3.0, "acc": 50.0}, {"mae": 5.0, "acc": 70.0}, {"mae": 4.0, "acc": 60.0}])
    assert list(s) == ["mae", "acc"]
    assert s["mae"]["mean"] == pytest.approx(4.0) and s["acc"]["mean"] == pytest.approx(60.0)
    # numpy's default (ddof=0), as CoOp's parse_test_res.py and vlprompt.stats.mean_std
    assert s["mae"]["std"] == pytest.approx(math.sqrt(2 / 3)) and s["acc"]["std"] == pytest.approx(math.sqrt(200 / 3))
    assert s["mae"]["n"] == 3
    assert summarise_folds([{"mae": 3.0}])["mae"]["std"] == 0.0
    with pytest.raises(VLPromptError, match="acc"):
        summarise_folds([{"mae": 1.0, "acc": 2.0}, {"mae": 1.0}])
