"""Extension points inside the towers: per-layer text prompts exact on every text path (plain, cut, shared
prefix; features and gradients), prompts inside the ViT tower equal to the original's construction, LoRA on the
attention projections of both towers (the prefix path included), and the rules: the shared backbone changes only
inside a context manager and is restored (also after an exception), its fingerprint (the feature cache's key) is
refused while it is patched, and a backbone that cannot take a patch says so."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from originals import clip_lora as lora_orig
from originals import mpl_clip
from vlprompt.backbone import load_backbone
from vlprompt.backbone.patches import LoRA, TextLayerPrompts, VisionLayerPrompts, lora_applied, vision_prompts
from vlprompt.errors import BackboneError
from vlprompt.testing import make_tiny_checkpoint

LAYERS = 4


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """A ViT backbone with 4 blocks per tower and a vision width (96) other than the text width (64)."""
    cfg, weights = make_tiny_checkpoint(tmp_path_factory.mktemp("deep"), "tiny-vit", seed=5, sharpen=True,
                                        layers=LAYERS, vision_width=96)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_backbone(str(cfg), str(weights), "cpu")


def _g(seed):
    return torch.Generator().manual_seed(seed)


CLASSES = ["cat", "golden retriever dog", "x", "a very long class name with many words"]


def _prompt_parts(bb, n_ctx=3, seed=0):
    """A CoOp-style prompt (end position): prefix (1 + n_ctx, D) = <sot> + ctx, suffix (K, 77 - 1 - n_ctx, D)."""
    te = bb.text
    tokens = te.tokenize([" ".join(["X"] * n_ctx) + f" {c}." for c in CLASSES])
    emb = te.embed(tokens)
    ctx = (torch.randn(n_ctx, te.width, generator=_g(seed)) * 0.3).requires_grad_()
    return ctx, emb[0, :1], emb[:, 1 + n_ctx:], te.eot_positions(tokens), tokens


def _deep_prompts(bb, n, seed=1, grad=True):
    return [(torch.randn(n, bb.text.width, generator=_g(seed + i)) * 0.3).requires_grad_(grad)
            for i in range(LAYERS - 1)]


@pytest.mark.parametrize("n_deep", [3, 2])
def test_text_layer_prompts_are_exact_on_every_path_in_features_and_gradients(deep, n_deep):
    ctx, sot, tail, eot, tokens = _prompt_parts(deep)
    prompts = _deep_prompts(deep, n_deep)
    # the original's construction written out (IVLP / MaPLe TextEncoder)
    full = torch.cat([sot.expand(len(CLASSES), 1, -1), ctx.expand(len(CLASSES), -1, -1), tail], dim=1)
    ref = mpl_clip.text_features(deep.model, full, tokens, prompts)
    ref_grads = torch.autograd.grad(ref.square().sum(), [ctx, *prompts])
    assert float(ref.detach().std(0).mean()) > 1e-2  # the classes' features differ
    lp = TextLayerPrompts({i + 1: p for i, p in enumerate(prompts)})
    for mode in ("plain", "cut", "prefix", "auto"):
        prefix = torch.cat([sot, ctx])
        out = deep.text.encode_prompts(prefix, tail, eot, mode=mode, layer_prompts=lp)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5, msg=mode)
        grads = torch.autograd.grad(out.square().sum(), [ctx, *prompts])
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5 * float(r.abs().max()), msg=mode)
    # without the prompts the result differs (the test sees them)
    plain = deep.text.encode_prompts(torch.cat([sot, ctx]), tail, eot, mode="prefix")
    assert float((plain - ref).detach().abs().max()) > 1e-3


def test_layer_prompts_with_chunks_and_groups(deep):
    """Chunked (checkpointed) rows and grouped prefixes / layer prompts give the same features and gradients."""
    ctx, sot, tail, eot, tokens = _prompt_parts(deep)
    g = 3
    shift = torch.randn(g, 1, deep.text.width, generator=_g(9)) * 0.2
    prefix = torch.cat([sot.expand(g, 1, -1), ctx[None] + shift], dim=1)  # (G, P, D): one prefix per group
    grouped = [(torch.randn(g, 3, deep.text.width, generator=_g(20 + i)) * 0.3).requires_grad_()
               for i in range(LAYERS - 1)]
    lp = TextLayerPrompts({i + 1: p for i, p in enumerate(grouped)})
    ref = torch.stack([
        mpl_clip.text_features(deep.model, torch.cat([prefix[j][None].expand(len(CLASSES), -1, -1), tail], dim=1),
                               tokens, [p[j] for p in grouped]) for j in range(g)])
    ref_grads = torch.autograd.grad(ref.square().sum(), [ctx, *grouped])
    for mode, chunk in (("prefix", None), ("prefix", 2), ("cut", 5), ("plain", 4)):
        out = deep.text.encode_prompts(prefix, tail, eot, mode=mode, chunk_size=chunk, layer_prompts=lp)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5, msg=f"{mode} {chunk}")
        grads = torch.autograd.grad(out.square().sum(), [ctx, *grouped])
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()), msg=f"{mode} {chunk}")


def test_layer_prompts_outside_the_prefix_refuse_the_prefix_path_and_auto_cuts(deep):
    ctx, sot, tail, eot, tokens = _prompt_parts(deep, n_ctx=2)
    prompts = _deep_prompts(deep, 4, grad=False)  # positions 1..4 reach past the 3-token prefix
    lp = TextLayerPrompts({i + 1: p for i, p in enumerate(prompts)})
    prefix = torch.cat([sot, ctx.detach()])
    with pytest.raises(BackboneError, match="inside the prefix"):
        deep.text.encode_prompts(prefix, tail, eot, mode="prefix", layer_prompts=lp)
    auto = deep.text.encode_prompts(prefix, tail, eot, layer_prompts=lp)
    full = torch.cat([sot.expand(len(CLASSES), 1, -1), ctx.detach().expand(len(CLASSES), -1, -1), tail], dim=1)
    torch.testing.assert_close(auto, mpl_clip.text_features(deep.model, full, tokens, prompts), rtol=1e-5, atol=1e-5)
    with pytest.raises(BackboneError, match="block 4"):
        TextLayerPrompts({4: prompts[0]}).check(LAYERS, deep.text.width)


def test_vision_prompts_equal_the_originals_vit_and_keep_gradients(deep):
    images = torch.randn(3, 3, 32, 32, generator=_g(3))
    width = 96
    shallow = (torch.randn(2, width, generator=_g(4)) * 0.5).requires_grad_()
    layers = [(torch.randn(2, width, generator=_g(5 + i)) * 0.5).requires_grad_() for i in range(LAYERS - 1)]
    ref = mpl_clip.image_features(deep.model, images, shallow, layers)
    ref_grads = torch.autograd.grad(ref.square().sum(), [shallow, *layers])
    prompts = VisionLayerPrompts(shallow, {i + 1: t for i, t in enumerate(layers)})
    out = deep.encode_image(images, prompts=prompts, grad=True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(out.square().sum(), [shallow, *layers])
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))
    plain = deep.encode_image(images)
    assert float((plain - out.detach()).abs().max()) > 1e-3 and not plain.requires_grad
    # shallow only (VPT-shallow): deeper layers keep the appended tokens
    torch.testing.assert_close(deep.encode_image(images, prompts=VisionLayerPrompts(shallow.detach())),
                               mpl_clip.image_features(deep.model, images, shallow.detach()), rtol=1e-5, atol=1e-5)
    assert not deep.model.visual.ln_pre._forward_pre_hooks  # removed after the call


def test_the_backbone_is_restored_after_a_patch_even_on_an_exception(deep):
    visual = deep.model.visual
    fingerprint = deep.fingerprint
    prompts = VisionLayerPrompts(torch.zeros(2, 96), {1: torch.zeros(2, 96)})
    with pytest.raises(RuntimeError, match="boom"):
        with vision_prompts(visual, prompts):
            with pytest.raises(BackboneError, match="patched"):
                deep.fingerprint  # the cache cannot key features of a patched tower
            raise RuntimeError("boom")
    assert not visual.ln_pre._forward_pre_hooks and not visual.transformer.resblocks[1]._forward_pre_hooks
    lora = LoRA(deep.model, {"text": range(LAYERS), "image": range(LAYERS)}, ("q", "k", "v", "o"), rank=2)
    attn = [b.attn for b in deep.model.transformer.resblocks]
    with pytest.raises(RuntimeError, match="boom"):
        with lora_applied(deep.model, lora):
            with pytest.raises(BackboneError, match="patched"):
                deep.fingerprint
            raise RuntimeError("boom")
    assert [b.attn for b in deep.model.transformer.resblocks] == attn
    assert deep.fingerprint == fingerprint
    assert not any("factors" in k for k in deep.model.state_dict())  # nothing of the patch stays in the model


def _lora_factors(lora, seed=8):
    with torch.no_grad():
        for name, p in lora.factors.items():
            if name.endswith("_B"):
                p.normal_(std=0.5, generator=_g(seed + hash(name) % 1000))


def test_lora_equals_the_originals_lora_attention_on_both_towers_and_every_text_path(deep):
    lora = LoRA(deep.model, {"text": range(LAYERS), "image": range(LAYERS)}, ("q", "k", "v", "o"), rank=2,
                scale=1.0 / 2 ** 0.5, generator=_g(0))
    images = torch.randn(2, 3, 32, 32, generator=_g(1))
    ctx, sot, tail, eot, tokens = _prompt_parts(deep)
    with lora_applied(deep.model, lora):  # B = 0: the frozen model
        torch.testing.assert_close(deep.encode_image(images, grad=True), deep.model.encode_image(images),
                                   rtol=1e-5, atol=1e-6)
    _lora_factors(lora)
    factors = {(orig, i): {p: {"A": lora.factors[f"{tower}_{i}_{p}_A"], "B": lora.factors[f"{tower}_{i}_{p}_B"]}
                           for p in lora.projections}
               for tower, orig in (("text", "text"), ("image", "vision")) for i in range(LAYERS)}
    with torch.no_grad():
        ref_img = lora_orig.image_features(deep.model, images, factors, lora.scale)
        ref_txt = lora_orig.text_features(deep.model, tokens, factors, lora.scale)
    with lora_applied(deep.model, lora):
        img = deep.encode_image(images, grad=True)
        torch.testing.assert_close(img, ref_img, rtol=1e-5, atol=1e-5)
        full = deep.text.embed(tokens)
        for mode in ("plain", "cut"):
            torch.testing.assert_close(deep.text(full, eot, mode=mode), ref_txt, rtol=1e-5, atol=1e-5, msg=mode)
        sot_ctx = deep.text.embed(tokens)[0, :4]  # "<sot> X X X": the same prefix for every class
        out = deep.text.encode_prompts(sot_ctx, full[:, 4:], eot, mode="prefix")
        torch.testing.assert_close(out, ref_txt, rtol=1e-5, atol=1e-5)
        loss = img.square().sum() + out.square().sum()
    grads = torch.autograd.grad(loss, list(lora.parameters()))
    assert all(g is not None and float(g.abs().max()) > 0 for g in grads)
    assert float((ref_img - deep.model.encode_image(images)).abs().max()) > 1e-3  # the update changes features
    # training mode: CLIP-LoRA's dropout on the branch input, the same masks from the same RNG state
    lora.dropout = 0.25
    torch.manual_seed(11)
    ref_train = lora_orig.image_features(deep.model, images, factors, lora.scale, training=True, dropout_rate=0.25)
    torch.manual_seed(11)
    with lora_applied(deep.model, lora, training=True):
        train = deep.encode_image(images, grad=True)
    torch.testing.assert_close(train, ref_train, rtol=1e-5, atol=1e-5)
    assert float((train - img).abs().max()) > 1e-4  # dropout was active


def test_supports_names_what_a_backbone_cannot_take(deep, tiny_rn):
    assert deep.supports("deep_vision") is None and deep.supports("deep_text") is None
    assert deep.supports("lora_image") is None and deep.supports("lora_text") is None
    why = tiny_rn.supports("deep_vision")
    assert why and "ResNet" in why
    assert tiny_rn.supports("lora_image")
    with pytest.raises(BackboneError, match="IVLP needs deep vision"):
        tiny_rn.require("deep_vision", "IVLP")
