"""Zero-shot prompt ensembling and CoOp's linear probe (vlprompt.baselines), on tiny models and synthetic features."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vlprompt.baselines import (COARSE_C_GRID, BaselineConfig, LinearProbeConfig, class_text_features,
                                fit_linear_probe, format_prompts, probe_logits, search_c, zeroshot_logits)
from vlprompt.errors import VLPromptError
from vlprompt.runner import DataConfig

CLASSNAMES = ["banded", "blotchy", "braided_hair", "bubbly", "cobwebbed"]


def _assert_classes_differ(text):
    cos = text @ text.t()
    off = cos[~torch.eye(len(cos), dtype=torch.bool)]
    assert off.max() < 0.999, "class text features are nearly identical: the comparison would be meaningless"


def test_format_prompts_replaces_underscores():
    assert format_prompts("a photo of a {}.", ["braided_hair", "x"]) == ["a photo of a braided hair.", "a photo of a x."]


def test_single_template_ensemble_equals_plain_zeroshot(sharp_rn):
    template = "a photo of a {}."
    text = class_text_features(sharp_rn, CLASSNAMES, [template])
    plain = F.normalize(sharp_rn.model.encode_text(sharp_rn.tokenize(format_prompts(template, CLASSNAMES))).float(),
                        dim=-1)
    _assert_classes_differ(plain)
    torch.testing.assert_close(text, plain, atol=1e-6, rtol=0)
    images = torch.randn(6, sharp_rn.embed_dim)
    ref = sharp_rn.logit_scale * F.normalize(images, dim=-1) @ plain.t()
    # the ensemble path (mean of one normalised feature, renormalised) changes the logits by rounding only
    torch.testing.assert_close(zeroshot_logits(images, text, sharp_rn.logit_scale), ref, atol=1e-4, rtol=0)


def test_ensemble_is_mean_of_normalised_template_features(sharp_rn):
    templates = ["a photo of a {}.", "{} texture.", "art of the {}."]
    text = class_text_features(sharp_rn, CLASSNAMES, templates)
    per_template = [F.normalize(sharp_rn.encode_text([t.format(c.replace("_", " ")) for c in CLASSNAMES]), dim=-1)
                    for t in templates]
    # the templates must give different features, or averaging would be a no-op
    assert (per_template[0] - per_template[1]).abs().max() > 1e-2
    by_hand = torch.stack(per_template).mean(0)
    by_hand = by_hand / by_hand.norm(dim=-1, keepdim=True)
    _assert_classes_differ(by_hand)
    torch.testing.assert_close(text, by_hand, atol=1e-6, rtol=0)
    assert not torch.allclose(text, per_template[0], atol=1e-3)


def test_class_text_features_rejects_empty_inputs(tiny_vit):
    with pytest.raises(VLPromptError, match="template"):
        class_text_features(tiny_vit, CLASSNAMES, [])
    with pytest.raises(VLPromptError, match="class names"):
        class_text_features(tiny_vit, [], ["{}"])


# -- C search ---------------------------------------------------------------------------------------------
def test_search_c_converges_to_the_peak_of_a_unimodal_score():
    calls = []

    def score(c):
        calls.append(c)
        return -abs(math.log10(c) - 2.3)

    chosen, history = search_c(score, COARSE_C_GRID, steps=8)
    assert abs(math.log10(chosen) - 2.3) < 0.02
    assert [h["stage"] for h in history[:7]] == ["coarse"] * 7 and len(history) == 7 + 2 * 8
    assert len(calls) == len(set(calls))  # each C scored once (repeated ends are memoised)
    # the first bisection step brackets the coarse peak (1e2) by 1e1 and 1e3
    assert history[7]["C"] == pytest.approx(10.0) and history[8]["C"] == pytest.approx(1000.0)


def test_search_c_ties_follow_coop():
    # all equal: the coarse peak is the first grid value (1e6); every step then keeps the left end (1e5)
    chosen, history = search_c(lambda c: 50.0, COARSE_C_GRID, steps=8)
    assert chosen == pytest.approx(1e5)
    chosen0, history0 = search_c(lambda c: 50.0, COARSE_C_GRID, steps=0)
    assert chosen0 == 1e6 and len(history0) == 7


def _sheared_blobs(n_per_class, seed, classes=3):
    """Classes separable along x2 - x1 only; a large shared component along (1, 1) hides them from the class means
    direction, so a heavily regularised probe (tiny C) is near chance and a weakly regularised one is perfect."""
    g = np.random.default_rng(seed)
    xs, ys = [], []
    for k in range(classes):
        a = g.normal(0, 10, n_per_class)
        x = np.stack([a, a + 3.0 * k + g.normal(0, 0.1, n_per_class)], 1)
        x = np.concatenate([x, g.normal(0, 0.1, (n_per_class, 6))], 1)  # a few noise dimensions
        xs.append(x)
        ys.append(np.full(n_per_class, k))
    return np.concatenate(xs).astype(np.float32), np.concatenate(ys)


def test_linear_probe_chooses_a_sensible_c_and_is_deterministic():
    xt, yt = _sheared_blobs(8, 0)
    xv, yv = _sheared_blobs(8, 1)
    xs, ys = _sheared_blobs(100, 2)
    res = fit_linear_probe(torch.from_numpy(xt), torch.from_numpy(yt), xv, yv)
    coarse = {h["C"]: h["val_accuracy"] for h in res.history if h["stage"] == "coarse"}
    assert coarse[1e-6] < 70.0 and max(coarse.values()) == 100.0  # C matters on this data
    assert res.C >= 1.0 and res.val_accuracy == 100.0
    logits = probe_logits(res.classifier, xs, 3)
    assert (logits.argmax(1).numpy() == ys).mean() > 0.98
    again = fit_linear_probe(xt, yt, xv, yv)
    assert again.C == res.C and again.history == res.history
    np.testing.assert_array_equal(again.classifier.coef_, res.classifier.coef_)
    # the reported classifier is the one fitted on train with the chosen C
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits
    with threadpool_limits(limits=1, user_api="blas"):
        ref = LogisticRegression(solver="lbfgs", max_iter=1000, C=res.C).fit(xt.astype(np.float64), yt)
    np.testing.assert_allclose(res.classifier.coef_, ref.coef_, rtol=1e-10, atol=1e-12)


def test_linear_probe_fixed_c_needs_no_val():
    xt, yt = _sheared_blobs(8, 0)
    res = fit_linear_probe(xt, yt, config=LinearProbeConfig(C=0.5))
    assert res.C == 0.5 and res.history == [] and res.val_accuracy is None
    with pytest.raises(VLPromptError, match="validation"):
        fit_linear_probe(xt, yt)
    with pytest.raises(VLPromptError, match="single class"):
        fit_linear_probe(xt[:8], yt[:8], config=LinearProbeConfig(C=1.0))
    with pytest.raises(VLPromptError, match="positive"):
        fit_linear_probe(xt, yt, config=LinearProbeConfig(C=-1.0))


def test_probe_logits_columns_follow_labels_binary_and_absent_classes():
    xt, yt = _sheared_blobs(10, 0, classes=2)
    yt = np.where(yt == 0, 1, 3)  # labels 1 and 3 of 5 classes
    res = fit_linear_probe(xt, yt, config=LinearProbeConfig(C=10.0))
    xs, _ = _sheared_blobs(20, 5, classes=2)
    logits = probe_logits(res.classifier, xs, 5)
    assert logits.shape == (40, 5)
    assert torch.isinf(logits[:, [0, 2, 4]]).all()
    np.testing.assert_array_equal(logits.argmax(1).numpy(), res.classifier.predict(xs))
    assert set(res.classifier.predict(xs)) == {1, 3}


def test_baseline_config_validation(tmp_path):
    data = DataConfig(dataset="dtd", root=str(tmp_path), shots=0)
    with pytest.raises(VLPromptError, match="shots must be 0"):
        BaselineConfig("zeroshot", "RN50", None, DataConfig(dataset="dtd", root=str(tmp_path), shots=4)).validate()
    with pytest.raises(VLPromptError, match="unknown prompt template set"):
        BaselineConfig("zeroshot", "RN50", None, data, templates=["imagenet81"]).validate()
    with pytest.raises(VLPromptError, match="unknown baseline"):
        BaselineConfig("fewshot", "RN50", None, data).validate()
    with pytest.raises(VLPromptError, match="search_steps"):
        BaselineConfig("linear_probe", "RN50", None, data, probe=LinearProbeConfig(search_steps=-1)).validate()
    # the seed does not change the identity of a run without few-shot sampling; the templates do
    a = BaselineConfig("zeroshot", "RN50", None, data)
    b = BaselineConfig("zeroshot", "RN50", None, DataConfig(dataset="dtd", root=str(tmp_path), shots=0, seed=7))
    assert a.identity_hash() == b.identity_hash()
    assert a.identity_hash() != BaselineConfig("zeroshot", "RN50", None, data, templates=["{}"]).identity_hash()
    assert BaselineConfig.from_dict(a.to_dict()).identity_hash() == a.identity_hash()
