"""Zero-shot prompt ensembling (vlprompt.methods.baselines.zeroshot) and CoOp's linear probe (vlprompt.methods.baselines.linear_probe)
on tiny models and synthetic features; their configuration through the run layer's ``resolve``."""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vlprompt.errors import ConfigError, VLPromptError
from vlprompt.methods import build_method
from vlprompt.methods.base import Features, cosine_logits
from vlprompt.methods.baselines.linear_probe import (COARSE_C_GRID, LinearProbe, LinearProbeConfig, fit_linear_probe,
                                           probe_logits, search_c)
from vlprompt.methods.parts.handcrafted import class_text_features, format_prompts
from vlprompt.runs import RunConfig, request_of, resolve

CLASSNAMES = ["banded", "blotchy", "braided_hair", "bubbly", "cobwebbed"]


def _assert_classes_differ(text):
    cos = text @ text.t()
    off = cos[~torch.eye(len(cos), dtype=torch.bool)]
    assert off.max() < 0.999, "class text features are nearly identical: the comparison would be meaningless"


def test_format_prompts_replaces_underscores():
    assert format_prompts("a photo of a {}.", ["braided_hair", "x"]) == ["a photo of a braided hair.",
                                                                        "a photo of a x."]


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
    torch.testing.assert_close(cosine_logits(images, text, sharp_rn.logit_scale), ref, atol=1e-4, rtol=0)
    # and the registered method gives those very logits
    method = build_method("zeroshot", {"templates": [template]}, sharp_rn, CLASSNAMES).eval()
    with torch.no_grad():
        torch.testing.assert_close(method(Features(global_=images)), ref, atol=1e-4, rtol=0)


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


def test_zeroshot_method_expands_template_sets_with_the_dataset_template(sharp_rn):
    from vlprompt.data import IMAGENET_TEMPLATES_SELECT

    method = build_method("zeroshot", {"templates": ["dataset", "imagenet-select"]}, sharp_rn, CLASSNAMES,
                          template="{} texture.")
    assert method.templates == ["{} texture.", *IMAGENET_TEMPLATES_SELECT]
    assert method.config.templates == method.templates  # what config.yaml / method.json record
    tensors, info = method.export_head()
    assert info["kind"] == "linear" and info["templates"] == method.templates
    torch.testing.assert_close(tensors["text_features"], class_text_features(sharp_rn, CLASSNAMES, method.templates))


def test_class_text_features_rejects_empty_inputs(tiny_vit):
    with pytest.raises(VLPromptError, match="template"):
        class_text_features(tiny_vit, CLASSNAMES, [])
    with pytest.raises(VLPromptError, match="class names"):
        class_text_features(tiny_vit, [], ["{}"])


def test_zeroshot_refuses_prompts_longer_than_the_context(tiny_vit):
    # open_clip's tokenizer would cut the prompt silently: the class name would lose its end
    long_name = " ".join(["braided"] * 80)
    with pytest.raises(VLPromptError, match="does not fit the text tower's context length"):
        class_text_features(tiny_vit, ["banded", long_name], ["a photo of a {}."])


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
    with pytest.raises(ConfigError, match=r"\bC\b.* must be > 0"):
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


@pytest.mark.parametrize("classes, labels", [(3, None), (2, (1, 3))])
def test_linear_probe_method_affine_head_is_the_fitted_classifier(classes, labels):
    """The method's logits (features @ weight.T + bias) predict what sklearn's classifier predicts, multi-class
    and binary (sklearn's single row), with absent labels at -inf."""
    xt, yt = _sheared_blobs(10, 0, classes=classes)
    xs, _ = _sheared_blobs(20, 5, classes=classes)
    if labels is not None:
        yt = np.where(yt == 0, labels[0], labels[1])
    backbone = SimpleNamespace(embed_dim=xt.shape[1], device=torch.device("cpu"), logit_scale=100.0)
    method = LinearProbe(LinearProbeConfig(C=10.0), backbone, [f"c{i}" for i in range(5)])
    info = method.fit(Features(global_=torch.from_numpy(xt)), torch.from_numpy(yt), None, None)
    assert info["C"] == 10.0 and not info["C_searched"]
    ref = fit_linear_probe(xt, yt, config=LinearProbeConfig(C=10.0)).classifier
    with torch.no_grad():
        logits = method(Features(global_=torch.from_numpy(xs)))
    np.testing.assert_array_equal(logits.argmax(1).numpy(), ref.predict(xs))
    expected = probe_logits(ref, xs, 5)
    finite = torch.isfinite(expected)
    assert torch.equal(finite, torch.isfinite(logits))
    torch.testing.assert_close(logits[finite].double(), expected[finite], atol=1e-3, rtol=1e-4)
    tensors, head = method.export_head()
    assert head["kind"] == "affine" and tensors["weight"].shape == (5, xt.shape[1]) and tensors["bias"].shape == (5,)


def test_linear_probe_refuses_another_class_list():
    backbone = SimpleNamespace(embed_dim=8, device=torch.device("cpu"), logit_scale=100.0)
    method = LinearProbe(LinearProbeConfig(C=1.0), backbone, ["a", "b", "c"])
    method.set_classnames(["a", "b", "c"])  # its own list is fine
    with pytest.raises(VLPromptError, match="classes it was trained on"):
        method.set_classnames(["a", "b", "x"])


# -- configuration through resolve() ------------------------------------------------------------------
def _request(tmp_path, method, **data):
    return {"method": method, "backbone": "RN50", "data": {"dataset": "dtd", "root": str(tmp_path), **data}}


def test_baseline_requests_resolve_and_refuse(tmp_path):
    with pytest.raises(ConfigError, match="--shots must be 0"):
        resolve(_request(tmp_path, "zeroshot", shots=4))
    with pytest.raises(ConfigError, match="unknown method 'fewshot'"):
        resolve(_request(tmp_path, "fewshot"))
    with pytest.raises(ConfigError, match="search_steps"):
        resolve({**_request(tmp_path, "linear-probe"), "method_options": {"search_steps": -1}})
    with pytest.raises(ConfigError, match="--seed does not apply"):
        resolve({**_request(tmp_path, "zeroshot"), "seed": 7})
    with pytest.raises(ConfigError, match="training option"):
        resolve({**_request(tmp_path, "linear-probe"), "train": {"epochs": 3}})
    zs = resolve(_request(tmp_path, "zeroshot"))
    assert zs.data.shots == 0 and zs.seed is None and zs.train is None
    assert zs.method_options == {"templates": ["dataset"]}
    lp = resolve(_request(tmp_path, "linear_probe"))  # the name results of earlier versions used
    assert lp.method == "linear-probe" and lp.data.shots == 16 and lp.seed == 1 and lp.train is None
    # a linear probe on all images samples nothing: no seed
    assert resolve(_request(tmp_path, "linear-probe", shots=0)).seed is None


def test_baseline_identity_follows_what_decides_the_numbers(tmp_path):
    a = resolve(_request(tmp_path, "zeroshot"))
    moved = resolve({**_request(tmp_path, "zeroshot"), "cache_dir": str(tmp_path / "elsewhere"), "device": "cpu"})
    assert a.identity_hash() == moved.identity_hash()
    other = resolve({**_request(tmp_path, "zeroshot"), "method_options": {"templates": ["{}"]}})
    assert a.identity_hash() != other.identity_hash()
    assert RunConfig.from_dict(a.to_dict()).identity_hash() == a.identity_hash()
    assert resolve(request_of(a)).identity_hash() == a.identity_hash()
    lp1 = resolve({**_request(tmp_path, "linear-probe", shots=4), "seed": 1})
    lp2 = resolve({**_request(tmp_path, "linear-probe", shots=4), "seed": 2})
    assert lp1.identity_hash() != lp2.identity_hash()


def _folder_dataset(root, classes=("cat", "dog"), per_class=4):
    from PIL import Image

    g = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(g.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def test_unknown_template_set_is_refused_at_resolve_before_anything_is_written(tmp_path):
    from vlprompt.runs import run
    from vlprompt.testing import make_tiny_checkpoint

    cfg_file, weights = make_tiny_checkpoint(tmp_path / "model", "tiny-vit")
    data = _folder_dataset(tmp_path / "images")
    request = {"method": "zeroshot", "backbone": str(cfg_file), "pretrained": str(weights), "device": "cpu",
               "cache_dir": str(tmp_path / "cache"), "data": {"dataset": "folder", "root": str(data)},
               "method_options": {"templates": ["dataset", "imagenet81"]}}
    # set names are known without the data: resolve() refuses an unknown one, naming the flag
    out = tmp_path / "run"
    with pytest.raises(VLPromptError, match=r"--templates.*unknown prompt template set 'imagenet81'"):
        run(request, out, progress=False)
    assert not out.exists()
