"""OrdinalCLIP and its baselines: prompts, exact text paths, loss / metrics wiring, data readers, the engine
end to end (train, select, export, predict, folds) and learning on real faces."""
from __future__ import annotations

import csv
import json
import os
import random
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import require_shared
from vlprompt.data import load_dataset
from vlprompt.errors import BackboneError, ConfigError, DataError, VLPromptError
from vlprompt.methods import build_method
from vlprompt.methods.base import Features
from vlprompt.methods.parts.image_encoders import build_image_encoder
from vlprompt.data.ranks import rank_values_from_names
from vlprompt.ordinal import ordinal_loss, ordinal_metrics, predict

AGES = ["3", "7", "12", "25", "40", "61"]


@pytest.fixture(autouse=True)
def no_weight_downloads(monkeypatch):
    """No test downloads torchvision weights: an encoder asking for them fails loudly instead."""
    from vlprompt.methods.parts import image_encoders

    def refuse(weights):
        raise AssertionError(f"a test asked for torchvision weights {weights.url}")

    monkeypatch.setattr(image_encoders, "_fetch", refuse)


def seeded_features(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))


def _frozen(**opts):
    """Options for a method that uses the frozen tower's features (fed as seeded random features in tests)."""
    return {"image_encoder": "clip", "lr_image_encoder": 0.0, **opts}


# ------------------------------------------------------------------------------------------------
# prompts
# ------------------------------------------------------------------------------------------------
def test_word_prototypes_equal_encode_text(tiny_backbone):
    """Context from words + rank embeddings from rank words (1 token each) = encode_text of the sentences."""
    bb = tiny_backbone
    ctx = "a photo of a person aged"
    digits = ["1", "3", "4", "6", "9"]  # one BPE token each
    m = build_method("ordinalclip", _frozen(init=ctx, num_base=None, rank_init="classnames"), bb, digits)
    assert m.prompts.n_ctx == 6 and m.prompts.rank_embeddings.num_tokens == 1
    ref = F.normalize(bb.encode_text([f"{ctx} {a}." for a in digits]), dim=-1)
    with torch.no_grad():
        assert torch.allclose(m.prototypes(), ref, atol=1e-5)
        assert torch.allclose(m.text_features(), ref, atol=1e-5)
    # CoOp on ranks: words of several tokens each, fixed or learned from that initialisation
    groups = ["0-2", "4-6", "8-12", "25-32", "60-100"]
    ref = F.normalize(bb.encode_text([f"{ctx} {g}." for g in groups]), dim=-1)
    for lr_ranks in (0.0, 1.0):
        coop = build_method("rank-coop", _frozen(init=ctx, lr_ranks=lr_ranks), bb, groups)
        assert (coop.prompts.word_embeds is not None) == (lr_ranks > 0)
        assert torch.allclose(coop.prototypes(), ref, atol=1e-5)
    zs = build_method("rank-zeroshot", {"template": "a photo of a {} year old person."}, bb, AGES)
    ref = F.normalize(bb.encode_text([f"a photo of a {a} year old person." for a in AGES]), dim=-1)
    assert torch.allclose(zs.prototypes(), ref, atol=1e-6)


def test_prompt_layout_equals_reference_slice_writes(tiny_vit):
    """The concatenated prompts are token for token the reference's (R, 77, D) sentences built by writing
    context + rank embeddings into a template of <sot> . <eot> and padding embeddings."""
    te = tiny_vit.text
    m = build_method("ordinalclip", _frozen(n_ctx=4, num_base=3, tokens_per_rank=2), tiny_vit,
                     [str(i) for i in range(9)])
    with torch.no_grad():
        m.prompts.ctx.normal_()
        full = m.prompts.full_embeddings()
        r, length = 9, te.context_length
        emb = te._parts["token_embedding"].weight
        ref = emb[0][None, None].repeat(r, length, 1)  # padding (token 0) everywhere
        eot = 1 + 4 + 2 + 1
        ref[:, 0] = emb[49406]
        ref[:, eot - 1] = emb[269]  # "."
        ref[:, eot] = emb[49407]
        ranks = m.prompts.rank_embeddings()
        for i in range(r):  # the reference's loop of in-place writes
            ref[i, 1:1 + 4 + 2] = torch.cat([m.prompts.ctx, ranks[i]])
    assert full.shape == (r, length, te.width)
    assert torch.equal(full, ref)
    assert m.prompts.eot.tolist() == [eot] * r


@pytest.mark.parametrize("method,opts", [
    ("ordinalclip", {"n_ctx": 6, "num_base": 3, "tokens_per_rank": 2}),
    ("ordinalclip", {"n_ctx": 3, "num_base": None, "interpolation": "inv_prop"}),
    ("rank-coop", {"n_ctx": 5, "lr_ranks": 1.0}),
])
def test_shared_prefix_equals_plain_features_and_gradients(tiny_rn, method, opts):
    tiny_backbone = tiny_rn  # the text towers of the tiny models share one architecture
    names = ["0-2", "4-6", "8-12", "15-20", "25-32", "38-43", "48-53", "60-100"] if method == "rank-coop" else \
        [str(i) for i in range(12)]
    m = build_method(method, _frozen(**opts), tiny_backbone, names)
    with torch.no_grad():
        m.prompts.ctx.normal_(std=0.5)  # away from the degenerate initialisation
    params = [p for p in m.parameters() if p.requires_grad]
    assert params
    weights = torch.randn(len(names), tiny_backbone.embed_dim, generator=torch.Generator().manual_seed(3))
    out = {}
    for mode in ("plain", "cut", "prefix"):
        for p in params:
            p.grad = None
        feats = m.prompts.encode(mode)
        (feats * weights).sum().backward()
        out[mode] = (feats.detach(), [p.grad.clone() for p in params])
    ref_f, ref_g = out["plain"]
    assert ref_f.std(0).mean() > 1e-3  # the prompts differ between ranks

    def rel(a, b):  # relative error in norm (fp32 rounding of O(100) gradients is ~1e-6 of them)
        return float((a - b).norm() / b.norm())

    for mode in ("cut", "prefix"):
        f, g = out[mode]
        assert rel(f, ref_f) < 1e-5, mode
        assert all(rel(a, b) < 1e-5 for a, b in zip(g, ref_g)), mode


# ------------------------------------------------------------------------------------------------
# options, recipe
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,opts,field", [
    ("ordinalclip", {"interpolation": "cubic"}, "interpolation"),
    ("ordinalclip", {"lr_context": -1.0}, "lr_context"),
    ("ordinalclip", {"kl_temperature": 0.0}, "kl_temperature"),
    ("ordinalclip", {"ce_weight": 0.0, "kl_weight": 0.0}, "kl_weight"),
    ("ordinalclip", {"image_encoder": "resnet7"}, "image_encoder"),
    ("ordinalclip", {"image_encoder": "clip", "image_encoder_input_norm": "imagenet"}, "image_encoder_input_norm"),
    ("ordinalclip", {"image_encoder": "clip", "image_encoder_weights": "/some/file.pth"}, "image_encoder_weights"),
    ("rank-linear", {"image_encoder": "resnet10", "image_encoder_weights": "imagenet"}, "image_encoder_weights"),
    ("rank-linear", {"rank_values": ["young", "old"]}, "rank_values"),
    ("rank-linear", {"head": "mlp"}, "head"),
    ("rank-regression", {"loss": "huber"}, "loss"),
    ("rank-zeroshot", {"template": "a photo of a person."}, "template"),
    ("rank-coop", {"n_ctx": 0}, "n_ctx"),
])
def test_ordinal_options_refused_before_anything_is_built(method, opts, field):
    from vlprompt.methods import build_config

    with pytest.raises(ConfigError, match=field):
        build_config(method, opts)


def test_word_inits_set_the_counts_and_a_contradicting_count_is_refused(tiny_rn):
    ctx = "a photo of a person aged"  # 6 tokens
    m = build_method("ordinalclip", _frozen(init=ctx, rank_init="young,old", num_base=2), tiny_rn, AGES)
    assert m.config.n_ctx == 6 and m.config.tokens_per_rank == 1  # recorded: the run's config says what is learned
    assert m.describe()["n_ctx"] == 6 and m.describe()["context_init"] == ctx
    with pytest.raises(ConfigError, match="n_ctx"):
        build_method("ordinalclip", _frozen(init=ctx, n_ctx=4), tiny_rn, AGES)
    with pytest.raises(ConfigError, match="n_ctx"):
        build_method("rank-coop", _frozen(init=ctx, n_ctx=4), tiny_rn, AGES)
    with pytest.raises(ConfigError, match="tokens_per_rank"):
        build_method("ordinalclip", _frozen(rank_init="young,old", num_base=2, tokens_per_rank=3), tiny_rn, AGES)
    with pytest.raises(ConfigError, match="rank_init has 2 words for 3 base ranks"):
        build_method("ordinalclip", _frozen(rank_init="young,old"), tiny_rn, AGES)
    assert build_method("rank-coop", _frozen(), tiny_rn, AGES).config.n_ctx == 10  # the reference's default


def test_paper_recipe_and_epoch_selection():
    from vlprompt.methods import method_class
    from vlprompt.runs import DataConfig

    for name in ("ordinalclip", "rank-linear", "rank-regression", "rank-coop"):
        cls = method_class(name)
        train = cls.preset(DataConfig(dataset="utkface", root="/x"))["train"]
        assert train == {"optimizer": "radam", "lr": 1e-4, "epochs": 100, "batch_size": 32, "weight_decay": 0.0,
                         "warmup_epochs": 0, "scheduler": "cosine", "eval_every": 1}
        # the reference's MORPH II comparison (morph_compare.yaml) trains with weight decay 5e-4
        assert cls.preset(DataConfig(dataset="morph2", root="/x"))["train"]["weight_decay"] == 5e-4
        assert cls.trains(cls.config_class()) and cls.head_kind == "ordinal" and cls.summary
    zs = method_class("rank-zeroshot")
    assert not zs.trains(zs.config_class()) and not zs.needs_training_data(zs.config_class()) and zs.preset(DataConfig(dataset="utkface", root="/x")) == \
        {"train": {}, "method_options": {}}


def test_selection_describe_and_interpretable_vectors(tiny_rn):
    m = build_method("ordinalclip", _frozen(n_ctx=3, num_base=2, tokens_per_rank=2), tiny_rn, AGES)
    assert m.selection() == ("mae_expectation", "min")
    d = m.describe()
    assert d["image_encoder_weights"] == "backbone" and d["rank_values"] == "3..61 (the numeric class names)"
    assert d["rank_embeddings"] == "2 bases, linear interpolation" and d["tokens_per_rank"] == 2
    vectors = m.interpretable_vectors()
    assert vectors[0][0] == {"context": "shared"} and torch.equal(vectors[0][1], m.prompts.ctx.detach())
    ranks = m.prompts.rank_embeddings().detach()
    assert [label for label, _ in vectors[1:]] == [{"rank": a} for a in AGES]
    assert all(torch.equal(v, ranks[i]) and v.shape == (2, tiny_rn.text.width) for i, (_, v) in
               enumerate(vectors[1:]))
    # rank-coop: its learned rank words, each as many vectors as the word has tokens; fixed words are not learned
    groups = ["0-2", "4-6", "60-100"]
    coop = build_method("rank-coop", _frozen(lr_ranks=1.0, n_ctx=2), tiny_rn, groups)
    lengths = [int(n) for n in coop.prompts.lengths]
    assert [v.shape[0] for _, v in coop.interpretable_vectors()[1:]] == lengths and max(lengths) > 1
    assert len(build_method("rank-coop", _frozen(n_ctx=2), tiny_rn, groups).interpretable_vectors()) == 1
    zs = build_method("rank-zeroshot", {}, tiny_rn, AGES, template="a photo of a {} year old person.")
    assert zs.selection() is None and zs.config.template == "a photo of a {} year old person."
    assert zs.interpretable_vectors() == []


# ------------------------------------------------------------------------------------------------
# logits, loss, metrics, learning rates
# ------------------------------------------------------------------------------------------------
def test_logits_loss_and_gradients_reach_only_the_prompts(tiny_rn):
    m = build_method("ordinalclip", _frozen(n_ctx=4, num_base=3), tiny_rn, AGES)
    # frozen CLIP tower: the backbone's cached features
    assert type(m).input_kinds(m.config) == {"global"} and m.image_encoder is None
    feats = seeded_features(10, tiny_rn.embed_dim)
    labels = torch.tensor([0, 0, 2, 5, 5, 5, 1, 3, 3, 0])  # repeated ranks, rank 4 absent
    logits = m(Features(global_=feats))
    protos = F.normalize(m.prompts.encode("plain").float(), dim=-1)
    expected = tiny_rn.logit_scale * F.normalize(feats, dim=-1) @ protos.t()
    assert torch.allclose(logits, expected, atol=1e-5)
    loss, parts = m.loss(logits, labels)
    ref, ref_parts = ordinal_loss(logits, labels)
    assert torch.allclose(loss, ref) and torch.allclose(parts["kl_loss"], ref_parts["kl_loss"])
    loss.backward()
    assert m.prompts.ctx.grad.abs().sum() > 0 and m.prompts.rank_embeddings.base.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in tiny_rn.parameters())
    # weights of the loss are configurable
    m2 = build_method("ordinalclip", _frozen(n_ctx=4, kl_weight=0.0, ce_weight=2.0), tiny_rn, AGES)
    assert torch.allclose(m2.loss(logits.detach(), labels)[0], 2 * F.cross_entropy(logits.detach(), labels))


def test_param_groups_multipliers_and_trainable_clip_copy(tiny_rn):
    m = build_method("ordinalclip", {"image_encoder": "clip", "lr_image_encoder": 0.5, "lr_context": 2.0,
                                     "lr_ranks": 0.0}, tiny_rn, AGES)
    groups = {g["name"]: g for g in m.param_groups(1e-3)}
    assert set(groups) == {"image_encoder", "context"}
    assert groups["image_encoder"]["lr"] == pytest.approx(5e-4) and groups["context"]["lr"] == pytest.approx(2e-3)
    assert not m.prompts.rank_embeddings.base.requires_grad  # lr 0 freezes: no gradient computed at all
    # the image encoder is a trainable copy: the backbone's tower stays frozen and untouched
    visual = tiny_rn.model.visual
    before = {k: v.clone() for k, v in visual.state_dict().items()}
    assert type(m).input_kinds(m.config) == {"images"} and all(p.requires_grad for p in m.image_encoder.parameters())
    with torch.no_grad():
        for p in m.image_encoder.parameters():
            p.add_(1.0)
    assert all(torch.equal(before[k], v) for k, v in visual.state_dict().items())
    assert all(not p.requires_grad for p in visual.parameters())
    assert any(k.startswith("image_encoder.") for k in m.learned_state())
    with pytest.raises(VLPromptError, match="interpolation"):
        build_method("ordinalclip", _frozen(interpolation="cubic"), tiny_rn, AGES)


def test_metrics_argmax_expectation_and_rank_values(tiny_rn):
    m = build_method("ordinalclip", _frozen(n_ctx=2), tiny_rn, AGES)
    assert m.rank_values.tolist() == [3, 7, 12, 25, 40, 61]  # numeric class names are the values
    logits = torch.randn(7, 6, generator=torch.Generator().manual_seed(1)) * 3
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 5])
    targets = torch.tensor([3.0, 7.0, 12.0, 25.0, 40.0, 61.0, 58.0])
    got = m.metrics(logits, labels, targets)
    pred = predict(logits, m.rank_values)
    ref = ordinal_metrics(pred["argmax"], pred["expectation"], targets, rank_values=m.rank_values)
    for k, v in ref.items():
        assert got[k] == pytest.approx(v)
    assert got["mae_argmax"] == pytest.approx(float((pred["argmax"] - targets).abs().mean()))
    # consecutive integer ranks: accuracy is the reference's round(prediction) == target
    names = [str(i) for i in range(20, 26)]
    m2 = build_method("ordinalclip", _frozen(n_ctx=2), tiny_rn, names)
    got2 = m2.metrics(logits, labels, None)  # no targets: the rank values of the labels
    t2 = torch.arange(20, 26).float()[labels]
    p2 = predict(logits, torch.arange(20, 26).float())
    assert got2["acc_expectation"] == pytest.approx(100 * float((torch.round(p2["expectation"]) == t2).float().mean()))
    # named groups: rank indices
    assert rank_values_from_names(["0-2", "4-6", "8-12"]).tolist() == [0, 1, 2]
    assert rank_values_from_names(["a", "b"], [5, 15]).tolist() == [5, 15]
    with pytest.raises(VLPromptError, match="increasing"):
        rank_values_from_names(["10", "5"])


def test_regression_value_survives_the_logits(tiny_rn):
    m = build_method("rank-regression", _frozen(), tiny_rn, AGES)
    feats = seeded_features(9, tiny_rn.embed_dim)
    z = m.regress(Features(global_=feats)).detach()
    logits = m(Features(global_=feats))
    pred = m.predictions(logits.detach())
    value = m.mean + m.scale * z
    assert torch.allclose(pred["expectation"], value, atol=1e-4)
    nearest = (value[:, None] - m.rank_values[None]).abs().argmin(1)
    assert torch.equal(pred["index"], nearest)
    targets = torch.tensor([3.0, 9, 12, 30, 41, 61, 60, 5, 25])
    loss, _ = m.loss(logits, torch.zeros(9, dtype=torch.long), targets)
    assert loss.item() == pytest.approx(float((z - (targets - m.mean) / m.scale).abs().mean()), rel=1e-4)
    loss.backward()
    assert m.head.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------
# image encoders
# ------------------------------------------------------------------------------------------------
def test_torchvision_encoder_weights_file_and_errors(tmp_path, tiny_rn, monkeypatch):
    enc = build_image_encoder("resnet18", tiny_rn, "none")
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert enc(x).shape == (3, tiny_rn.embed_dim)
    body = {k: v for k, v in enc.net.state_dict().items() if not k.startswith("fc.")}
    torch.save({"state_dict": {f"module.{k}": v for k, v in body.items()}}, tmp_path / "r18.pth")
    enc2 = build_image_encoder("resnet18", tiny_rn, str(tmp_path / "r18.pth"))
    assert all(torch.equal(v, enc2.net.state_dict()[k]) for k, v in body.items())
    assert enc2.input_norm == "imagenet"  # trained weights expect ImageNet's statistics (the reference's)
    # through a method: the file is recorded absolute (the run's config must not depend on the working directory)
    monkeypatch.chdir(tmp_path)
    m = build_method("rank-linear", {"image_encoder": "resnet18", "image_encoder_weights": "r18.pth"}, tiny_rn, AGES)
    assert m.config.image_encoder_weights == str(tmp_path / "r18.pth")
    assert m.describe()["image_encoder_weights_source"] == f"file {tmp_path / 'r18.pth'}"
    torch.save({"conv1.weight": torch.zeros(3)}, tmp_path / "bad.pth")
    with pytest.raises(BackboneError, match="do not fit resnet18"):
        build_image_encoder("resnet18", tiny_rn, str(tmp_path / "bad.pth"))
    with pytest.raises(BackboneError, match="unknown image encoder"):
        build_image_encoder("resnet7", tiny_rn, "none")
    with pytest.raises(ConfigError, match="torchvision encoders only"):
        build_image_encoder("clip", tiny_rn, "imagenet")


def _fake_imagenet(monkeypatch, name: str):
    """torchvision's ImageNet weights of ``name`` replaced by a seeded random state dict (nothing downloaded);
    returns it and the list of weights entries asked for."""
    import torchvision

    from vlprompt.methods.parts import image_encoders

    torch.manual_seed(123)
    state = getattr(torchvision.models, name)(weights=None).state_dict()
    asked = []

    def fetch(weights):
        asked.append(weights)
        return state

    monkeypatch.setattr(image_encoders, "_fetch", fetch)
    return state, asked


def test_torchvision_encoder_starts_from_imagenet_weights_by_default(monkeypatch, tiny_rn, caplog):
    """The paper's start: a torchvision encoder without image_encoder_weights loads torchvision's ImageNet
    weights (IMAGENET1K_V1, the only ones of the reference's torchvision 0.11), sees ImageNet-normalised
    pixels, and says so in describe() (results.json) and the log."""
    import logging

    state, asked = _fake_imagenet(monkeypatch, "resnet18")
    with caplog.at_level(logging.INFO, logger="vlprompt"):
        m = build_method("ordinalclip", {"image_encoder": "resnet18", "n_ctx": 2}, tiny_rn, AGES)
    assert [w.name for w in asked] == ["IMAGENET1K_V1"]
    net = m.image_encoder.net.state_dict()
    assert all(torch.equal(v, net[k]) for k, v in state.items() if not k.startswith("fc."))
    d = m.describe()
    assert d["image_encoder"] == "resnet18" and d["image_encoder_weights"] == "imagenet"
    assert "ResNet18_Weights.IMAGENET1K_V1" in d["image_encoder_weights_source"]
    assert "resnet18-f37072fd.pth" in d["image_encoder_weights_source"]
    assert d["image_encoder_input_norm"] == "imagenet"
    assert any(r.name.startswith("vlprompt.") and r.levelno == logging.INFO and "IMAGENET1K_V1" in r.getMessage()
               for r in caplog.records)
    # the paper's VGG-16 resolves to the very file of the reference's model_urls
    from vlprompt.methods.parts.image_encoders import _tv_weights, resolve_weights
    from vlprompt.methods.ordinal.ordinalclip import OrdinalCLIPConfig

    cfg = OrdinalCLIPConfig(image_encoder="vgg16").validate()
    assert resolve_weights("vgg16", cfg.image_encoder_weights) == "imagenet"
    assert _tv_weights("vgg16").url.endswith("/vgg16-397923af.pth")
    # explicit choices: none is a random start (CLIP-normalised input); resnet10 has no ImageNet weights
    r = build_method("rank-linear", {"image_encoder": "resnet18", "image_encoder_weights": "none"}, tiny_rn, AGES)
    assert r.describe()["image_encoder_weights"] == "none" and r.describe()["image_encoder_input_norm"] == "clip"
    assert len(asked) == 1
    assert build_image_encoder("resnet10", tiny_rn).weights == "none"  # auto: it has none
    with pytest.raises(ConfigError, match="resnet10 has no ImageNet weights"):
        build_method("rank-linear", {"image_encoder": "resnet10", "image_encoder_weights": "imagenet"}, tiny_rn, AGES)
    with pytest.raises(ConfigError, match="image_encoder_weights"):
        build_method("ordinalclip", {"image_encoder": "clip", "image_encoder_weights": "imagenet"}, tiny_rn, AGES)


def test_offline_without_cached_imagenet_weights_says_what_to_pass(monkeypatch, tiny_rn):
    """Offline and not cached: a clear error naming the options that work, never a silent random start."""
    import urllib.error

    from vlprompt.methods.parts import image_encoders

    def offline(weights):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(image_encoders, "_fetch", offline)
    with pytest.raises(BackboneError) as info:
        build_method("ordinalclip", {"image_encoder": "resnet18"}, tiny_rn, AGES)
    msg = str(info.value)
    assert "image_encoder_weights=/path/to/resnet18.pth" in msg and "image_encoder_weights=none" in msg
    assert "resnet18-f37072fd.pth" in msg
    assert isinstance(info.value.__cause__, urllib.error.URLError)


# ------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------
def _image(path: Path, seed: int = 0) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(path)
    return str(path)


def test_csv_target_column_ranks_and_errors(tmp_path):
    rows = [(f"img{i}.png", age) for i, age in enumerate([1, 5, 5, 9, 12, 20, 33, 33, 40, 41])]
    for name, _ in rows:
        _image(tmp_path / name)
    good = tmp_path / "ages.csv"
    good.write_text("path,age,label\n" + "".join(f"{p},{a},x\n" for p, a in rows))
    s = load_dataset("csv", good, target_column="age", ranks="0:50", folds=2, fold=1)
    assert s.classnames == [str(i) for i in range(51)]
    every = s.train + s.val + s.test
    assert sorted(x.target for x in every) == sorted(float(a) for _, a in rows)
    assert all(x.label == int(x.target) and x.classname == str(int(x.target)) for x in every)
    bins = load_dataset("csv", good, target_column="age", ranks=[0, 10, 30, 50])
    assert bins.classnames == ["5", "20", "40"]
    assert {x.target: x.label for x in bins.train + bins.val + bins.test}[33.0] == 2
    default = load_dataset("csv", good, target_column="age")  # integer targets: min..max
    assert default.classnames[0] == "1" and default.classnames[-1] == "41"

    bad = tmp_path / "bad.csv"
    bad.write_text("path,age\nimg0.png,3\nimg1.png,about ten\n")
    with pytest.raises(DataError, match=r"bad.csv.*row 3.*'age'.*'about ten' is not a finite number"):
        load_dataset("csv", bad, target_column="age")
    with pytest.raises(DataError, match="no target column 'years'"):
        load_dataset("csv", good, target_column="years")
    with pytest.raises(DataError, match="outside the rank range 0:30"):
        load_dataset("csv", good, target_column="age", ranks="0:30")
    with pytest.raises(DataError, match="apply to ordinal datasets only"):
        load_dataset("csv", good, ranks="0:50")


def test_folder_regex_errors_and_deterministic_folds(tmp_path):
    ages = [1, 2, 4, 4, 8, 15, 22, 22, 30, 45, 46, 70, 80, 81, 90]
    for i, a in enumerate(ages):
        _image(tmp_path / "faces" / f"{a}_{i % 2}_0_2017{i:04d}.jpg.chip.jpg", i)
    root = tmp_path / "faces"
    with pytest.raises(DataError, match=r"target_regex '\^age\(\\\\d\+\)' matches none of the 15 image file names"):
        load_dataset("folder", root, target_regex=r"^age(\d+)")
    _image(root / "notes_x.jpg")
    with pytest.raises(DataError, match="does not match 1 of 16 file names"):
        load_dataset("folder", root, target_regex=r"^(\d+)_")
    (root / "notes_x.jpg").unlink()

    folds = [load_dataset("folder", root, target_regex=r"^(\d+)_", ranks="0:100", folds=3, fold=f) for f in range(3)]
    again = load_dataset("folder", root, target_regex=r"^(\d+)_", ranks="0:100", folds=3, fold=1)
    assert again.train == folds[1].train and again.val == folds[1].val and again.test == folds[1].test
    tests = [set(x.path for x in s.test) for s in folds]
    assert set().union(*tests) == {str(p) for p in root.iterdir()} and sum(map(len, tests)) == len(ages)
    for s in folds:
        assert s.val and not set(x.path for x in s.val) & set(x.path for x in s.test)  # val carved from train
        assert len(s.train) + len(s.val) + len(s.test) == len(ages)
    utk = load_dataset("utkface", root, folds=3, fold=1, split_seed=1)  # the folder reader's seed
    assert utk.num_classes == 117 and utk.test == again.test


def test_folder_regex_capture_must_be_a_number(tmp_path):
    _image(tmp_path / "f" / "age_x_1.png")
    with pytest.raises(DataError, match=r"captures 'x' from 'age_x_1.png', not a number"):
        load_dataset("folder", tmp_path / "f", target_regex=r"age_(\w)_")


def test_adience_morph_hci_aesthetics_readers(tmp_path):
    # Adience: 5 tab-separated fold files, age groups "(25, 32)", odd entries remapped or dropped
    root = tmp_path / "adience"
    header = "\t".join(["user_id", "original_image", "face_id", "age", "gender", "x", "y", "dx", "dy", "tilt_ang",
                        "fiducial_yaw_angle", "fiducial_score"]) + "\n"
    ages = ["(0, 2)", "(25, 32)", "(60, 100)", "None", "35", "(38, 42)"]
    for k in range(5):
        lines = []
        for j, age in enumerate(ages):
            user, img, face = f"u{k}", f"p{j}.jpg", str(j)
            _image(root / "aligned" / user / f"landmark_aligned_face.{face}.{img}", j)
            lines.append(f"{user}\t{img}\t{face}\t{age}\tm\t0\t0\t1\t1\t0\t0\t0\n")
        (root / f"fold_{k}_data.txt").write_text(header + "".join(lines))
    s = load_dataset("adience", root, fold=2)
    assert s.classnames == ["0-2", "4-6", "8-12", "15-20", "25-32", "38-43", "48-53", "60-100"]
    assert sorted(x.label for x in s.test) == [0, 4, 4, 5, 7]  # "35" -> 25-32 (nearest), "(38, 42)" -> 38-43
    assert all(x.path.split(os.sep)[-2] == "u2" for x in s.test) and len(s.train) + len(s.val) == 20
    assert all(x.target == float(x.label) for x in s.train)
    assert s.extra["dropped"] == {"no_age": 5, "unusual": 0}
    skip = load_dataset("adience", root, fold=0, unusual="skip")
    assert sorted(x.label for x in skip.test) == [0, 4, 7]
    with pytest.raises(DataError, match="fold must be an integer in 0..4"):
        load_dataset("adience", root, fold=5)

    # MORPH II: OrdinalCLIP's list files "<path> <age> [<age> ...]", val carved from train, test = its list
    mroot = tmp_path / "MORPH"
    (mroot / "data_list").mkdir(parents=True)
    train = [(f"Album2/{i:03d}.JPG", 16 + i) for i in range(12)]
    test = [(f"Album2/t{i}.JPG", 30 + i) for i in range(4)]
    for p, _ in train + test:
        _image(mroot / p)
    (mroot / "data_list/ET_proto_train.txt").write_text("".join(f"{p} {a}\n" for p, a in train))
    (mroot / "data_list/ET_proto_val.txt").write_text("".join(f"{p} {a - 1} {a} {a + 1}\n" for p, a in test))
    ms = load_dataset("morph2", mroot)
    assert ms.num_classes == 101 and [x.target for x in ms.test] == [30.0, 31.0, 32.0, 33.0]
    assert len(ms.train) == 11 and len(ms.val) == 1 and {x.path for x in ms.val} <= {str(mroot / p) for p, _ in train}

    # HCI dating: 5 decade folders; per fold (seeded) train / val / rest test per decade
    hroot = tmp_path / "hci"
    for d in ("1930s", "1940s", "1950s", "1960s", "1970s"):
        for i in range(6):
            _image(hroot / d / f"{i}.jpg", i)
    h0 = load_dataset("hci-dating", hroot, fold=0, train_per_decade=3, val_per_decade=1)
    h1 = load_dataset("hci-dating", hroot, fold=1, train_per_decade=3, val_per_decade=1)
    assert (len(h0.train), len(h0.val), len(h0.test)) == (15, 5, 10)
    assert h0.test != h1.test and h0.test == load_dataset("hci-dating", hroot, fold=0, train_per_decade=3,
                                                          val_per_decade=1).test

    # image aesthetics: median of the votes, 5 levels
    aroot = tmp_path / "aes"
    votes = ["3,3,4", "1,2", "5,5,4,4,4", "2,3,3,4", "1,1,1", "3,4,4", "2,2,2", "4,5,5"]
    rows = ["#flickr_photo_id\tcategory\tbeauty_scores\n"]
    for i, v in enumerate(votes):
        _image(aroot / "images" / f"{1000 + i}.jpg", i)
        rows.append(f"{1000 + i}\t{'nature' if i % 2 else 'people'}\t{v}\n")
    (aroot / "beauty-icwsm15-dataset.tsv").write_text("".join(rows))
    a = load_dataset("aesthetics", aroot, folds=2, fold=0, val_fraction=0.25)
    got = {Path(x.path).stem: x.label for x in a.train + a.val + a.test}
    assert got == {"1000": 2, "1001": 0, "1002": 3, "1003": 2, "1004": 0, "1005": 3, "1006": 1, "1007": 4}
    assert len(load_dataset("aesthetics", aroot, category="nature", folds=2).test) == 2
    (aroot / "images" / "1003.jpg").unlink()
    with pytest.raises(DataError, match="missing=skip"):
        load_dataset("aesthetics", aroot, folds=2)
    assert load_dataset("aesthetics", aroot, folds=2, missing="skip").extra["missing_images"] == 1


# ------------------------------------------------------------------------------------------------
# the engine end to end: train, select on val, export, predict, folds, zero-shot
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def faces_csv(tmp_path_factory):
    root = require_shared("utkface", "crop_part1")
    files = sorted(os.listdir(root))
    random.Random(0).shuffle(files)
    out = tmp_path_factory.mktemp("faces") / "faces.csv"
    with open(out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "age"])
        for name in files[:24]:
            w.writerow([str(root / name), int(name.split("_")[0])])
    return out


def _cli(capsys, *args) -> str:
    from vlprompt.cli import main

    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["--quiet", *map(str, args)]) == 0
    return capsys.readouterr().out


def test_cli_train_select_export_predict_folds(tmp_path, tiny_dir, tiny_vit, faces_csv, capsys):
    from vlprompt.testing import make_tiny_checkpoint

    cfg, weights = make_tiny_checkpoint(tiny_dir, "tiny-vit")  # the tiny_vit fixture's files (32 px images)
    frozen = ["--backbone", cfg, "--pretrained", weights, "--dataset", "csv", "--root", faces_csv,
              "--dataset-option", "target_column=age", "--dataset-option", "ranks=0:116", "--shots", "0",
              "--cache-dir", tmp_path / "cache"]
    common = [*frozen, "--batch-size", "8", "--lr", "1e-3"]
    run = tmp_path / "run"
    out = _cli(capsys, "train", "--method", "ordinalclip", *common, "--epochs", "2", "--eval-every", "1",
               "--method-option", "n_ctx=4", "--output", run)
    res = json.loads(out)
    assert set(res["metrics"]) >= {"mae_argmax", "mae_expectation", "acc_argmax", "acc_expectation"}
    assert 0 <= res["ordinality"] <= 100 and res["epochs"] == 2
    for name in ("predictions.png", "prototype_similarity.png", "results.json", "best.safetensors"):
        assert (run / name).exists(), name
    hist = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    best = min(hist, key=lambda r: r["val_mae_expectation"])
    assert res["selected_epoch"] == best["epoch"]
    from safetensors.torch import load_file
    assert all(torch.equal(v, load_file(str(run / "best.safetensors"))[k])
               for k, v in load_file(str(run / "prompt.safetensors")).items())

    # export: the image encoder + prototypes; predictions equal the method's own logits, no text tower run
    _cli(capsys, "export", run, "--output", tmp_path / "head")
    head = json.loads((tmp_path / "head" / "head.json").read_text())
    assert head["kind"] == "ordinal" and head["method"] == "ordinalclip" and head["image_encoder"] == "clip"
    from vlprompt.runs import load_method, predict_images
    from vlprompt.runs.heads import head_logits
    from vlprompt.data import build_test_transform, load_image
    method, _, bb = load_method(run, device="cpu")
    method.eval()
    images = [row[0] for row in json_split(run)["test"][:3]]
    x = torch.stack([build_test_transform(bb.image_size)(load_image(p)) for p in images])
    with torch.no_grad():
        ref = method(Features(images=x))
    tensors = load_file(str(tmp_path / "head" / "head.safetensors"))
    assert not any("prompts" in k for k in tensors)
    assert torch.allclose(head_logits(head, tensors, bb, x), ref, atol=1e-4)
    rows = predict_images(tmp_path / "head", images, topk=2, device="cpu")
    expect = predict(ref, method.rank_values)["expectation"]
    assert [r["value"] for r in rows] == pytest.approx(expect.tolist(), abs=1e-3)
    printed = _cli(capsys, "predict", tmp_path / "head", images[0], "--topk", "1")
    assert f"value {expect[0]:.2f}" in printed

    # interpret: the context and every rank embedding decode to their nearest words
    rows = json.loads(_cli(capsys, "interpret", run, "--json", "--topk", "1"))
    assert sum("rank" in r for r in rows) == method.num_classes and sum("context" in r for r in rows) == 4

    # k folds: one run per fold and the mean +- std
    out = _cli(capsys, "ordinal-folds", "--output", tmp_path / "folds", "--folds", "2", "--", "--method",
               "rank-linear", *common, "--epochs", "1", "--max-steps", "1")
    summary = json.loads((tmp_path / "folds" / "summary.json").read_text())
    assert json.loads(out) == summary and summary["ran"] == [0, 1]
    maes = [r["metrics"]["mae_expectation"] for r in summary["runs"]]
    assert summary["mean_std"]["mae_expectation"]["mean"] == pytest.approx(np.mean(maes))
    assert summary["mean_std"]["mae_expectation"]["std"] == pytest.approx(np.std(maes))
    tests = [{row[0] for row in json_split(tmp_path / "folds" / f"fold_{k}")["test"]} for k in range(2)]
    assert not tests[0] & tests[1]

    # zero-shot over rank sentences: nothing trained, exported with the frozen tower
    zs = json.loads(_cli(capsys, "train", "--method", "rank-zeroshot", *frozen, "--output", tmp_path / "zs"))
    assert "epochs" not in zs and "train" not in zs and "mae_expectation" in zs["metrics"]
    assert zs["method_info"]["template"] == "a photo of a {}."  # the csv dataset's own template
    _cli(capsys, "export", tmp_path / "zs", "--output", tmp_path / "zs_head")
    assert json.loads((tmp_path / "zs_head" / "head.json").read_text())["image_encoder"] == "backbone"
    assert "value" in predict_images(tmp_path / "zs_head", images[:1], device="cpu")[0]


def json_split(run: Path) -> dict:
    """The run's saved split: ``{"train": [[path, label, classname, target], ...], ...}``."""
    return json.loads((Path(run) / "split.json").read_text())


# ------------------------------------------------------------------------------------------------
# learning on real faces
# ------------------------------------------------------------------------------------------------
class _Tensors:
    """An in-memory image source for the engine (random horizontal flips), to keep the test fast."""

    def __init__(self, x: torch.Tensor, flip: bool):
        self.x, self.flip = x, flip

    def batch(self, idx, gen):
        x = self.x[idx]
        if self.flip:
            f = torch.rand(len(idx), generator=gen) < 0.5
            x = torch.where(f[:, None, None, None], x.flip(-1), x)
        return Features(images=x)


@pytest.fixture(scope="module")
def utk_subset():
    from vlprompt.data import build_test_transform, load_image

    root = require_shared("utkface", "crop_part1")
    splits = load_dataset("utkface", root)  # fold 0 of 5: disjoint train / test
    rng = random.Random(0)
    train, test = rng.sample(splits.train, 320), rng.sample(splits.test, 200)
    tf = build_test_transform(32)
    load = lambda samples: torch.stack([tf(load_image(s.path)) for s in samples])  # noqa: E731
    return splits.classnames, train, test, load(train), load(test)


@pytest.fixture
def one_thread():
    """One intra-op thread: the numbers do not depend on the machine's core count (reduction order), and a
    shared CPU does not stall OpenMP barriers (2 threads on a busy 2-core machine ran this test 4-7x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("method", ["ordinalclip", "rank-linear"])
def test_small_random_encoder_beats_the_median_on_utkface(tmp_path, tiny_rn, utk_subset, method, one_thread):
    """A randomly initialised small ResNet (torchvision's ResNet with one block per stage, 32 px faces, 320
    training images, 8 epochs through the engine) predicts the ages of held-out faces better than the training
    median does."""
    from vlprompt.engine.trainer import Trainer, TrainConfig, predict_logits

    classnames, train, test, x, xt = utk_subset
    y = torch.tensor([s.label for s in train])
    t = torch.tensor([s.target for s in train]).float()
    yt = torch.tensor([s.label for s in test])
    tt = torch.tensor([s.target for s in test]).float()
    median_mae = float((tt - t.median()).abs().mean())
    torch.manual_seed(0)
    m = build_method(method, {"image_encoder": "resnet10"}, tiny_rn, classnames)
    m.eval()
    with torch.no_grad():  # the random encoder separates the images (features are not all alike)
        f = F.normalize(m.image_features(Features(images=xt[:32])), dim=-1)
        assert float((f @ f.t()).fill_diagonal_(0).sum() / (32 * 31)) < 0.95
    cfg = TrainConfig(epochs=8, batch_size=32, optimizer="adam", lr=3e-3, weight_decay=0.0, warmup_epochs=0,
                      checkpoint_every=0)
    Trainer(m, cfg, tmp_path, seed=1, progress=False).fit(_Tensors(x, True), y, t)
    metrics = m.metrics(predict_logits(m, _Tensors(xt, False), len(test), 100), yt, tt)
    print(f"\n{method}: test MAE expectation {metrics['mae_expectation']:.2f}, argmax {metrics['mae_argmax']:.2f}; "
          f"training-median MAE {median_mae:.2f}")
    assert metrics["mae_expectation"] < median_mae - 1.0


def test_torchvision_encoder_input_normalisation(tiny_vit):
    """Images come CLIP-normalised; an encoder expecting ImageNet statistics sees exactly ImageNet-normalised
    pixels, and the map travels with its state dict (checkpoints, exported heads)."""
    from vlprompt.data.transforms import CLIP_MEAN, CLIP_STD
    from vlprompt.methods.parts.image_encoders import IMAGENET_MEAN, IMAGENET_STD, build_image_encoder

    torch.manual_seed(0)
    enc = build_image_encoder("resnet10", tiny_vit, None, input_norm="imagenet").eval()
    pixels = torch.rand(2, 3, 32, 32)
    as_clip = (pixels - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)
    as_imagenet = (pixels - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(enc(as_clip), enc.net(as_imagenet), rtol=1e-5, atol=1e-5)
        plain = build_image_encoder("resnet10", tiny_vit, None).eval()  # auto without ImageNet weights: identity
        plain.load_state_dict(enc.state_dict())
        torch.testing.assert_close(plain(as_clip), enc(as_clip))
        fresh = build_image_encoder("resnet10", tiny_vit, None).eval()
        fresh.net.load_state_dict(enc.net.state_dict())
        assert not torch.allclose(fresh(as_clip), enc(as_clip))
    from vlprompt.methods import build_method
    with pytest.raises(Exception, match="CLIP-normalised"):
        build_method("ordinalclip", {"image_encoder": "clip", "image_encoder_input_norm": "imagenet"}, tiny_vit,
                     [str(i) for i in range(5)])
