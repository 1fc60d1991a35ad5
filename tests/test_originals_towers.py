"""The written-out originals of the methods that put prompts or LoRA inside both towers (tests/originals: IVLP,
deep language prompting, VPT and MaPLe of muzairkhattak/multimodal-prompt-learning, PromptSRC, CLIP-LoRA) run on
tiny open_clip models, compute quantities that vary, and agree with independent formulas where one exists.
The equality tests of vlprompt's own implementations (to come) test against these functions."""
import copy
import math
import sys

import open_clip
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from originals import clip_lora, ivlp, maple, mpl_clip, promptsrc, vpt
from originals.mpl_dassl import ConstantWarmupScheduler, epoch_lr, loaded_by_original
from vlprompt.safe_pickle import Placeholder, load_checkpoint
from vlprompt.testing import sharpen_

NAMES = ["banded", "golden_retriever", "sword lily"]
TEXT_W, VISION_W, LAYERS = 64, 96, 4


@pytest.fixture(scope="module")
def towers():
    """4 layers per tower, text width 64 != vision width 96 (a swapped width fails), made less degenerate."""
    torch.manual_seed(0)
    model = open_clip.CLIP(embed_dim=48, vision_cfg={"image_size": 32, "layers": LAYERS, "width": VISION_W,
                                                     "patch_size": 8, "head_width": 32},
                           text_cfg={"context_length": 77, "vocab_size": 49408, "width": TEXT_W, "heads": 2,
                                     "layers": LAYERS}, quick_gelu=True)
    sharpen_(model)
    with torch.no_grad():  # random ViTs map every image to nearly the same feature
        for block in model.visual.transformer.resblocks:
            block.attn.in_proj_weight.mul_(3.0)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def images(n=4, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def labels(n=4):
    return torch.arange(n) % len(NAMES)


def trainable(learned):
    return {k: v.clone().requires_grad_(True) for k, v in learned.items()}


def assert_varies(logits, min_std=0.05):
    """Logits that differ between images and between classes (random towers can be nearly constant)."""
    assert logits.std(dim=0).min() > min_std and logits.std(dim=1).min() > min_std, logits


# -- the prompted CLIP of the MaPLe repo -----------------------------------------------------------------------
def test_unprompted_towers_equal_open_clip(towers):
    ctx, prefix = mpl_clip.context_init(towers, 4, "a photo of a")
    parts = mpl_clip.class_prompts(towers, NAMES, prefix, 4)
    prompts = mpl_clip.construct_prompts(ctx, parts["token_prefix"], parts["token_suffix"])
    tokens = mpl_clip.tokenize([f"a photo of a {n.replace('_', ' ')}." for n in NAMES])
    with torch.no_grad():
        torch.testing.assert_close(prompts, towers.token_embedding(tokens), rtol=0, atol=0)
        torch.testing.assert_close(mpl_clip.text_features(towers, prompts, parts["tokenized_prompts"]),
                                   towers.encode_text(tokens), rtol=1e-5, atol=1e-6)
        x = images()
        torch.testing.assert_close(mpl_clip.image_features(towers, x), towers.encode_image(x), rtol=1e-5, atol=1e-6)


def test_word_init_learns_the_first_tokens_and_keeps_the_rest_of_the_init_fixed(towers):
    emb = towers.token_embedding.weight
    tokens = mpl_clip.tokenize(["a photo of a"])[0]
    ctx, prefix = mpl_clip.context_init(towers, 2, "a photo of a")
    assert prefix == "a photo of a"  # the prompts still read "a photo of a {class}."
    torch.testing.assert_close(ctx, emb[tokens[1:3]], rtol=0, atol=0)
    parts = mpl_clip.class_prompts(towers, NAMES, prefix, 2)
    torch.testing.assert_close(parts["token_suffix"][:, :2], emb[tokens[3:5]].expand(3, -1, -1), rtol=0, atol=0)
    # more context than init tokens: the EOT and padding embeddings become context vectors
    ctx, prefix = mpl_clip.context_init(towers, 4, "a photo")
    torch.testing.assert_close(ctx[2:], emb[torch.tensor([49407, 0])], rtol=0, atol=0)
    # more than 4: the init text is ignored
    ctx, prefix = mpl_clip.context_init(towers, 5, "a photo of a", torch.Generator().manual_seed(0))
    assert prefix == "X X X X X" and 0.01 < ctx.std() < 0.03


def test_text_prompts_replace_positions_one_to_n_at_the_deeper_blocks(towers):
    learned, fixed = ivlp.init_ivlp(towers, NAMES, n_ctx_text=3, depth_text=LAYERS + 2,
                                    generator=torch.Generator().manual_seed(1))
    deep = mpl_clip.deep_prompt_list(learned, "text_encoder")
    assert len(deep) == LAYERS - 1  # depth past the layer count: prompts only for the existing blocks
    prompts = mpl_clip.construct_prompts(learned["prompt_learner.ctx"], fixed["prompt_learner.token_prefix"],
                                         fixed["prompt_learner.token_suffix"])
    with torch.no_grad():
        feats, inputs = mpl_clip.text_features(towers, prompts, fixed["tokenized_prompts"], deep, True)
        with_position = learned["prompt_learner.ctx"] + towers.positional_embedding[1:4]  # input ctx: like any token
        torch.testing.assert_close(inputs[0][:, 1:4], with_position.expand(3, -1, -1), rtol=0, atol=0)
        for j in range(1, LAYERS):
            torch.testing.assert_close(inputs[j][:, 1:4], deep[j - 1].expand(3, -1, -1), rtol=0, atol=0)
            out = towers.transformer.resblocks[j - 1](inputs[j - 1], attn_mask=towers.attn_mask)
            torch.testing.assert_close(inputs[j][:, :1], out[:, :1], rtol=0, atol=0)
            torch.testing.assert_close(inputs[j][:, 4:], out[:, 4:], rtol=0, atol=0)
        for j in range(LAYERS - 1):  # every deep prompt matters (a constant shift would vanish in ln_1)
            g = torch.Generator().manual_seed(j)
            moved = [p + (0.5 * torch.randn(p.shape, generator=g) if i == j else 0.0) for i, p in enumerate(deep)]
            other = mpl_clip.text_features(towers, prompts, fixed["tokenized_prompts"], moved)
            assert (other - feats).abs().max() > 1e-3
        unused = mpl_clip.text_features(towers, prompts, fixed["tokenized_prompts"], deep + [torch.ones(3, TEXT_W)])
        torch.testing.assert_close(unused, feats, rtol=0, atol=0)


def test_vision_prompts_are_appended_before_ln_pre_without_positional_embedding(towers):
    learned, _ = ivlp.init_ivlp(towers, NAMES, n_ctx_vision=3, depth_vision=3,
                                generator=torch.Generator().manual_seed(2))
    shallow, deep = learned["image_encoder.VPT"], mpl_clip.deep_prompt_list(learned, "image_encoder")
    assert shallow.shape == (3, VISION_W) and len(deep) == 2
    x = images()
    with torch.no_grad():
        feats, inputs = mpl_clip.image_features(towers, x, shallow, deep, True)
        assert inputs[0].shape[1] == 1 + 16 + 3
        torch.testing.assert_close(inputs[0][:, -3:], towers.visual.ln_pre(shallow).expand(4, -1, -1),
                                   rtol=0, atol=0)
        for j in (1, 2):
            torch.testing.assert_close(inputs[j][:, -3:], deep[j - 1].expand(4, -1, -1), rtol=0, atol=0)
            out = towers.visual.transformer.resblocks[j - 1](inputs[j - 1])
            torch.testing.assert_close(inputs[j][:, :-3], out[:, :-3], rtol=0, atol=0)
        torch.testing.assert_close(inputs[3], towers.visual.transformer.resblocks[2](inputs[2]), rtol=0, atol=0)
        assert (feats - towers.encode_image(x)).abs().max() > 1e-3


# -- IVLP / deep language prompting ----------------------------------------------------------------------------
def test_ivlp_tensors_follow_the_depths_and_widths(towers, tiny_rn):
    learned, fixed = ivlp.init_ivlp(towers, NAMES, depth_text=3, depth_vision=9)
    assert {k: tuple(v.shape) for k, v in learned.items()} == {
        "prompt_learner.ctx": (2, TEXT_W), "image_encoder.VPT": (2, VISION_W),
        **{f"image_encoder.transformer.resblocks.{i}.VPT_shallow": (2, VISION_W) for i in (1, 2, 3)},
        **{f"text_encoder.transformer.resblocks.{i}.VPT_shallow": (2, TEXT_W) for i in (1, 2)}}
    assert fixed["prompt_prefix"] == "a photo of a" and fixed["prompt_learner.token_suffix"].shape == (3, 74, TEXT_W)
    language_only, lo_fixed = ivlp.init_ivlp(towers, NAMES, **{k: v for k, v in ivlp.RECIPES["language_only"].items()
                                                               if k in ("n_ctx_text", "n_ctx_vision", "depth_text",
                                                                        "depth_vision", "ctx_init")})
    assert not any(k.startswith("image_encoder") for k in language_only)
    assert language_only["prompt_learner.ctx"].shape == (4, TEXT_W) and lo_fixed["prompt_prefix"] == "a photo of a"
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(ivlp.ivlp_image_features(towers, language_only, x), towers.encode_image(x))
    with pytest.raises(AssertionError, match="Language prompt depth"):
        ivlp.init_ivlp(towers, NAMES, depth_text=0)
    # a ResNet tower: the original silently builds no vision prompt, the text prompts still train
    rn = tiny_rn.model
    rn_learned, rn_fixed = ivlp.init_ivlp(rn, NAMES, depth_text=2)
    assert set(rn_learned) == {"prompt_learner.ctx", "text_encoder.transformer.resblocks.1.VPT_shallow"}
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ivlp.ivlp_image_features(rn, rn_learned, x), rn.encode_image(x))
    assert ivlp.ivlp_logits(rn, rn_learned, rn_fixed, x).shape == (2, 3)


def test_ivlp_logits_vary_and_every_prompt_gets_a_gradient(towers):
    learned, fixed = ivlp.init_ivlp(towers, NAMES, depth_text=LAYERS, depth_vision=LAYERS,
                                    generator=torch.Generator().manual_seed(3))
    learned = trainable(learned)
    assert_varies(ivlp.ivlp_logits(towers, learned, fixed, images()).detach())
    ivlp.ivlp_loss(towers, learned, fixed, images(), labels()).backward()
    for name, tensor in learned.items():
        assert tensor.grad is not None and tensor.grad.abs().max() > 0, name


# -- VPT --------------------------------------------------------------------------------------------------------
def test_vpt_text_is_the_hand_crafted_prompt_and_only_vision_prompts_learn(towers, tiny_rn):
    text = vpt.fixed_text_features(towers, NAMES)
    with torch.no_grad():
        expected = towers.encode_text(open_clip.get_tokenizer("RN50")([f"a photo of a {n.replace('_', ' ')}."
                                                                      for n in NAMES]))
    torch.testing.assert_close(text, expected, rtol=0, atol=0)
    learned = trainable(vpt.init_vpt(towers, **vpt.RECIPES["train_py_defaults"]))
    assert list(learned) == ["image_encoder.VPT"]  # depth 1: shallow
    deep = trainable(vpt.init_vpt(towers, n_ctx_vision=8, depth_vision=12, generator=torch.Generator().manual_seed(4)))
    assert len(deep) == LAYERS and deep["image_encoder.VPT"].shape == (8, VISION_W)
    logits = vpt.vpt_logits(towers, deep, images(), text)
    assert_varies(logits.detach())
    vpt.vpt_loss(towers, deep, images(), text, labels()).backward()
    assert all(t.grad.abs().max() > 0 for t in deep.values())
    with pytest.raises(AssertionError, match="PROMPT_DEPTH_VISION"):
        vpt.init_vpt(towers, depth_vision=0)
    assert vpt.init_vpt(tiny_rn.model) == {}  # ResNet: nothing to train (the original's backward then fails)


# -- MaPLe ------------------------------------------------------------------------------------------------------
def test_maple_coupling_layers_start_identical_and_map_text_to_vision_width(towers):
    learned, fixed = maple.init_maple(towers, NAMES, depth=3)
    assert learned["prompt_learner.proj.weight"].shape == (VISION_W, TEXT_W)
    assert learned["prompt_learner.ctx"].shape == (2, TEXT_W) and fixed["prompt_prefix"] == "a photo of a"
    w0, w1 = (learned[f"prompt_learner.compound_prompt_projections.{j}.weight"] for j in (0, 1))
    assert torch.equal(w0, w1) and not torch.equal(w0, learned["prompt_learner.proj.weight"])
    assert not torch.equal(learned["prompt_learner.compound_prompts_text.0"],
                           learned["prompt_learner.compound_prompts_text.1"])
    assert sum(t.numel() for t in learned.values()) == maple.parameter_count(TEXT_W, VISION_W, 2, 3)
    assert maple.parameter_count(512, 768, 2, 9) == 3_555_072  # the paper's "3.55M"
    shared, deep_text, deep_vision = maple.maple_prompts(learned)
    assert shared.shape == (2, VISION_W) and len(deep_text) == len(deep_vision) == 2
    torch.testing.assert_close(deep_vision[1], deep_text[1] @ w1.t() + learned[
        "prompt_learner.compound_prompt_projections.1.bias"])


def test_maple_init_draws_like_the_original_modules(towers):
    """From one RNG state: ctx (random), proj, the J-1 deep text prompts, then one Linear cloned J-1 times."""
    torch.manual_seed(11)
    learned, _ = maple.init_maple(towers, NAMES, n_ctx=3, depth=4, ctx_init=None)
    torch.manual_seed(11)
    ctx = nn.init.normal_(torch.empty(3, TEXT_W), std=0.02)
    proj = nn.Linear(TEXT_W, VISION_W)
    texts = nn.ParameterList([nn.Parameter(torch.empty(3, TEXT_W)) for _ in range(3)])
    for t in texts:
        nn.init.normal_(t, std=0.02)
    single = nn.Linear(TEXT_W, VISION_W)
    clones = nn.ModuleList([copy.deepcopy(single) for _ in range(3)])
    torch.testing.assert_close(learned["prompt_learner.ctx"], ctx, rtol=0, atol=0)
    torch.testing.assert_close(learned["prompt_learner.proj.weight"], proj.weight.detach(), rtol=0, atol=0)
    torch.testing.assert_close(learned["prompt_learner.proj.bias"], proj.bias.detach(), rtol=0, atol=0)
    for j in range(3):
        torch.testing.assert_close(learned[f"prompt_learner.compound_prompts_text.{j}"], texts[j].detach(),
                                   rtol=0, atol=0)
        torch.testing.assert_close(learned[f"prompt_learner.compound_prompt_projections.{j}.weight"],
                                   clones[j].weight.detach(), rtol=0, atol=0)


def test_maple_gradients_reach_every_used_tensor_and_not_the_unused_ones(towers, tiny_rn):
    learned, fixed = maple.init_maple(towers, NAMES, depth=LAYERS + 1, generator=torch.Generator().manual_seed(5))
    learned = trainable(learned)
    assert_varies(maple.maple_logits(towers, learned, fixed, images()).detach())
    maple.maple_loss(towers, learned, fixed, images(), labels()).backward()
    last = LAYERS - 1  # deep prompt j is used at block j + 1: j = LAYERS - 1 has no block
    for name, tensor in learned.items():
        if name.startswith(("prompt_learner.compound_prompts_text.", "prompt_learner.compound_prompt_projections.")) \
                and name.split(".")[2] == str(last):
            assert tensor.grad is None, name
        else:
            assert tensor.grad is not None and tensor.grad.abs().max() > 0, name
    with pytest.raises(TypeError):
        maple.maple_image_features(tiny_rn.model, learned, torch.randn(1, 3, 64, 64))


# -- PromptSRC --------------------------------------------------------------------------------------------------
def test_promptsrc_teacher_averages_unnormalised_features_of_the_60_templates(towers):
    assert len(promptsrc.IMAGENET_TEMPLATES) == 60 == len(set(promptsrc.IMAGENET_TEMPLATES))
    templates = promptsrc.IMAGENET_TEMPLATES[:3] + promptsrc.IMAGENET_TEMPLATES[-2:]
    teacher = promptsrc.teacher_text_features(towers, NAMES, templates)
    tok = open_clip.get_tokenizer("RN50")
    with torch.no_grad():  # the original's loop over templates
        per = torch.stack([towers.encode_text(tok([t.format(n.replace("_", " ")) for n in NAMES]))
                           for t in templates])  # (T, K, E)
    torch.testing.assert_close(teacher, per.mean(dim=0), rtol=1e-5, atol=1e-6)
    ensembled = F.normalize(F.normalize(per, dim=-1).mean(dim=0), dim=-1)  # CLIP's prompt ensembling, not this
    assert (F.normalize(teacher, dim=-1) - ensembled).abs().max() > 1e-4
    assert promptsrc.teacher_text_features(towers, NAMES).shape == (3, 48)


def test_promptsrc_loss_terms_equal_independent_formulas(towers):
    learned, fixed = promptsrc.init_promptsrc(towers, NAMES, depth_text=3, depth_vision=3,
                                              generator=torch.Generator().manual_seed(6))
    learned = trainable(learned)
    with torch.no_grad():  # move the prompts off their init so that the terms are not near zero
        learned["prompt_learner.ctx"].add_(0.3 * torch.randn(learned["prompt_learner.ctx"].shape))
    out = promptsrc.promptsrc_forward(towers, learned, fixed, images(), promptsrc.teacher_text_features(towers, NAMES))
    assert_varies(out["logits"].detach()) and assert_varies(out["zs_logits"])
    assert not out["zs_logits"].requires_grad and not out["zs_image"].requires_grad
    terms = promptsrc.loss_terms(out, labels())
    b, k = out["logits"].shape
    kl = F.kl_div(F.log_softmax(out["logits"], 1), F.log_softmax(out["zs_logits"], 1), reduction="batchmean",
                  log_target=True)
    torch.testing.assert_close(terms["scl_logits"], kl / k)
    torch.testing.assert_close(terms["scl_text"], 25 * F.l1_loss(out["text"], out["zs_text"]))
    torch.testing.assert_close(terms["scl_image"], 10 * F.l1_loss(out["image"], out["zs_image"]))
    torch.testing.assert_close(terms["ce"], F.cross_entropy(out["logits"], labels()))
    total = terms["ce"] + terms["scl_logits"] + terms["scl_text"] + terms["scl_image"]
    torch.testing.assert_close(terms["loss"], total)
    assert min(float(terms[t].detach()) for t in ("scl_logits", "scl_text", "scl_image")) > 1e-4
    terms["loss"].backward()
    assert all(t.grad.abs().max() > 0 for t in learned.values())


def test_gpa_weights_of_the_recipes():
    w = promptsrc.gpa_weights(20, 15, 1)  # base-to-new
    assert math.isclose(sum(w), 1.0, rel_tol=1e-12)
    assert [round(x, 4) for x in w[11:18]] == [0.0044, 0.054, 0.242, 0.3989, 0.242, 0.054, 0.0044]
    few = promptsrc.gpa_weights(50, 45, 5)
    assert sum(few[34:]) > 0.97  # concentrated on epochs 35..50
    flat = promptsrc.gpa_weights(20, 6, 10)  # cross-dataset: nearly uniform
    assert 0.02 < min(flat) and max(flat) < 0.07


def test_gpa_average_of_prompts_is_exact_and_the_originals_fp16_average_moves_frozen_weights():
    weights = promptsrc.gpa_weights(20, 15, 1)
    g = torch.Generator().manual_seed(7)
    prompt, frozen = torch.randn(4, 8, generator=g), torch.randn(64, 64, generator=g).half()
    states = [{"p": prompt + 0.01 * e} for e in range(20)]
    avg = promptsrc.gpa_average(states, weights)["p"]
    torch.testing.assert_close(avg, prompt + 0.01 * sum(e * w for e, w in enumerate(weights)), rtol=0, atol=1e-6)
    whole = promptsrc.gpa_average_like_original([{"p": prompt, "frozen": frozen}] * 20, weights)
    torch.testing.assert_close(whole["p"], prompt, rtol=0, atol=1e-6)
    moved = (whole["frozen"] != frozen).float().mean()
    assert whole["frozen"].dtype == torch.float16 and moved > 0.05  # the fp16 artefact, not the method


# -- CLIP-LoRA ---------------------------------------------------------------------------------------------------
def random_b(factors, seed=8, std=0.5):
    g = torch.Generator().manual_seed(seed)
    for layer in factors.values():
        for f in layer.values():
            f["B"] = torch.randn(f["B"].shape, generator=g) * std
    return factors


def test_lora_attention_equals_torch_attention_with_the_merged_weight(towers):
    factors = random_b(clip_lora.init_lora(towers, params=("q", "k", "v", "o"), r=4))
    scale = clip_lora.scaling(4, 2)
    assert scale == 2 / math.sqrt(4) == 1.0
    block = towers.transformer.resblocks[1]
    layer = factors[("text", 1)]
    x = torch.randn(3, 77, TEXT_W, generator=torch.Generator().manual_seed(9))
    mask = towers.attn_mask
    merged = copy.deepcopy(block.attn)
    with torch.no_grad():
        d = TEXT_W
        for i, p in enumerate("qkv"):
            merged.in_proj_weight[i * d:(i + 1) * d] += layer[p]["B"] @ layer[p]["A"] * scale
        merged.out_proj.weight += layer["o"]["B"] @ layer["o"]["A"] * scale
        expected = merged(x, x, x, need_weights=False, attn_mask=mask)[0]
        got = clip_lora.lora_attention(block.attn, x, mask, layer, scale)  # eval: merged weights
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        unmerged = clip_lora.lora_attention(block.attn, x, mask, layer, scale, training=True, dropout_rate=1e-12)
        torch.testing.assert_close(unmerged, expected, rtol=1e-5, atol=1e-5)
        plain = block.attn(x, x, x, need_weights=False, attn_mask=mask)[0]
        assert (got - plain).abs().max() > 1e-2


def test_lora_at_init_is_clip_and_only_b_gets_a_gradient(towers):
    factors = clip_lora.init_lora(towers)
    assert list(factors) == [("text", i) for i in range(LAYERS)] + [("vision", i) for i in range(LAYERS)]
    for (tower, _), layer in factors.items():
        d = TEXT_W if tower == "text" else VISION_W
        assert set(layer) == {"q", "k", "v"}
        for f in layer.values():
            assert f["A"].shape == (2, d) and f["B"].shape == (d, 2) and not f["B"].any()
            assert 0 < f["A"].abs().max() <= 1 / math.sqrt(d)
    for p in clip_lora.lora_parameters(factors):
        p.requires_grad_(True)
    scale = clip_lora.scaling(2, 1)
    assert math.isclose(scale, 1 / math.sqrt(2))  # alpha / sqrt(r), not alpha / r
    tokens = mpl_clip.tokenize(clip_lora.class_texts(NAMES))
    text = clip_lora.text_features(towers, tokens, factors, scale, training=True, dropout_rate=0.25)
    image = clip_lora.image_features(towers, images(), factors, scale, training=True, dropout_rate=0.25)
    torch.testing.assert_close(text, towers.encode_text(tokens), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(image, towers.encode_image(images()), rtol=1e-5, atol=1e-5)
    logits = clip_lora.logits(image, text)
    assert_varies(logits.detach())
    torch.testing.assert_close(logits, 100 * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).t())
    F.cross_entropy(logits, labels()).backward()
    for layer in factors.values():
        for f in layer.values():
            assert not f["A"].grad.any() and f["B"].grad.abs().max() > 0


def test_lora_init_draws_like_the_original_modules(towers):
    """Per LoRA'd attention: four nn.Linear(d, d), then per enabled projection one nn.Linear(d, d) and its A."""
    torch.manual_seed(12)
    factors = clip_lora.init_lora(towers, encoder="vision", position="bottom", params=("v", "q"), r=3)
    torch.manual_seed(12)
    for i in range(LAYERS):
        _ = [nn.Linear(VISION_W, VISION_W) for _ in range(4)]
        for p in ("v", "q"):
            nn.Linear(VISION_W, VISION_W)
            a = nn.init.kaiming_uniform_(torch.empty(3, VISION_W), a=math.sqrt(5))
            torch.testing.assert_close(factors[("vision", i)][p]["A"], a, rtol=0, atol=0)


def test_lora_block_tables(towers, tiny_vit, tiny_rn):
    model = tiny_vit.model  # 2 layers: the 12-layer tables keep the indices that exist
    assert clip_lora.lora_blocks(model) == [("text", 0), ("text", 1), ("vision", 0), ("vision", 1)]
    assert clip_lora.lora_blocks(model, position="up") == []
    assert clip_lora.lora_blocks(towers, encoder="text", position="half-bottom") == [("text", i) for i in range(4)]
    with pytest.raises(KeyError):
        clip_lora.lora_blocks(model, position="top3", backbone="ViT-B/32")
    with pytest.raises(KeyError):
        clip_lora.lora_blocks(model, position="bottom", backbone="ViT-L/14")
    with pytest.raises(KeyError):
        clip_lora.lora_blocks(tiny_rn.model, backbone="RN50")
    assert clip_lora.lora_blocks(tiny_rn.model, encoder="text") == [("text", 0), ("text", 1)]


def test_lora_training_loop_steps_per_iteration_and_evaluates_the_last_iterate(towers):
    x, y = images(6, seed=10), torch.tensor([0, 1, 2, 0, 1, 2])
    batches = [(x[:4], y[:4]), (x[4:], y[4:])]  # one epoch: 2 batches (the last one short)

    def run(seed):
        factors = random_b(clip_lora.init_lora(towers, generator=torch.Generator().manual_seed(0)), std=0.05)
        torch.manual_seed(seed)  # dropout masks come from the global RNG
        return factors, clip_lora.train(towers, factors, lambda: batches, NAMES, shots=1, n_iters=3)

    factors, out = run(0)
    assert len(out["losses"]) == 3  # 500 * shots iterations: here 3 * 1, the second epoch cut after one batch
    for t, lr in enumerate(out["lrs"]):
        assert math.isclose(lr, clip_lora.iteration_lr(t, 3), rel_tol=1e-9)
    assert out["losses"] != run(1)[1]["losses"]  # another dropout draw
    acc = clip_lora.evaluate(towers, factors, x, y, NAMES)
    with torch.no_grad():
        scale = clip_lora.scaling(2, 1)
        text = clip_lora.text_features(towers, mpl_clip.tokenize(clip_lora.class_texts(NAMES)), factors, scale)
        pred = clip_lora.logits(clip_lora.image_features(towers, x, factors, scale), text).argmax(1)
    assert acc == 100.0 * float((pred == y).sum()) / 6


# -- the originals' checkpoint files -----------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["ivlp", "maple", "vpt", "promptsrc"])
def test_dassl_checkpoints_hold_what_the_original_saves(towers, tmp_path, method):
    g = torch.Generator().manual_seed(13)
    if method == "vpt":
        learned, fixed, module = vpt.init_vpt(towers, n_ctx_vision=3, depth_vision=3, generator=g), {}, vpt
    else:
        module = {"ivlp": ivlp, "maple": maple, "promptsrc": promptsrc}[method]
        init = {"ivlp": ivlp.init_ivlp, "maple": maple.init_maple, "promptsrc": promptsrc.init_promptsrc}[method]
        learned, fixed = init(towers, NAMES, generator=g)
    tensors = {**learned, **{k: v for k, v in fixed.items() if k.startswith("prompt_learner.")}}
    path = module.write_original_checkpoint(tmp_path, tensors, towers, epoch=3)
    assert path == tmp_path / module.MODEL_NAME / "model.pth.tar-3"
    assert (path.parent / "checkpoint").read_text() == "model.pth.tar-3\n"
    assert "dassl" not in sys.modules
    ckpt = load_checkpoint(path)
    sd = ckpt["state_dict"]
    assert ckpt["epoch"] == 3 and ckpt["val_result"] is None
    assert list(sd)[0] == "logit_scale"
    fp16 = method != "vpt"
    for name, value in learned.items():
        kept_fp32 = "VPT" in name or "compound" in name or not fp16
        assert sd[name].dtype == (torch.float32 if kept_fp32 else torch.float16), name
        torch.testing.assert_close(sd[name].float(), value if kept_fp32 else value.half().float(), rtol=0, atol=0)
    assert sd["image_encoder.conv1.weight"].dtype == (torch.float16 if fp16 else torch.float32)
    assert sd["image_encoder.ln_pre.weight"].dtype == torch.float32
    torch.testing.assert_close(sd["text_encoder.transformer.resblocks.0.attn.in_proj_weight"].float(),
                               towers.transformer.resblocks[0].attn.in_proj_weight.half().float() if fp16
                               else towers.transformer.resblocks[0].attn.in_proj_weight)
    assert "token_embedding.weight" not in sd and not any(k.startswith("visual.") for k in sd)
    if method == "promptsrc":
        assert any(k.startswith("prompt_learner.ZS_image_encoder.transformer.") for k in sd)
    if method != "vpt":
        assert {"prompt_learner.token_prefix", "prompt_learner.token_suffix"} <= set(sd)
        assert not {"prompt_learner.token_prefix", "prompt_learner.token_suffix"} & set(loaded_by_original(sd))
    n_params = len([k for k in sd if "token_" not in k])
    assert len(ckpt["optimizer"]["param_groups"][0]["params"]) == n_params
    assert len(ckpt["optimizer"]["state"]) == len(learned)  # momentum buffers of the trained tensors only
    successor = ckpt["scheduler"]["successor"]
    assert isinstance(successor, Placeholder) and successor.global_name.endswith("CosineAnnealingLR")
    # Dassl's warm-up wrapper stops counting after the warm-up; its successor counts the cosine epochs
    assert ckpt["scheduler"]["last_epoch"] == 1 and ckpt["scheduler"]["cons_lr"] == 1e-5
    assert successor.attrs["last_epoch"] == 2 and successor.attrs["T_max"] == 3.0


def test_dassl_epoch_lr_is_the_warmup_then_cosine_schedule():
    param = nn.Parameter(torch.zeros(1))
    optim = torch.optim.SGD([param], lr=0.0035, momentum=0.9)
    sched = ConstantWarmupScheduler(optim, torch.optim.lr_scheduler.CosineAnnealingLR(optim, 5.0), 1, 1e-5)
    for epoch in range(5):
        assert math.isclose(optim.param_groups[0]["lr"], epoch_lr(epoch, 0.0035, 5), rel_tol=1e-9, abs_tol=1e-15)
        optim.step()
        sched.step()
    assert epoch_lr(0, 0.0035, 5) == 1e-5 and epoch_lr(1, 0.0035, 5) == 0.0035
    # a log of the released MaPLe config (multimodal-prompt-learning issue #17): epoch 4/5 "lr 2.2908e-03",
    # epoch 5/5 "lr 1.2092e-03"
    assert f"{epoch_lr(3, 0.0035, 5):.4e}" == "2.2908e-03" and f"{epoch_lr(4, 0.0035, 5):.4e}" == "1.2092e-03"


def test_clip_lora_checkpoint_is_save_loras_nesting(towers, tmp_path):
    factors = random_b(clip_lora.init_lora(towers, params=("q", "k", "v", "o")))
    path = clip_lora.write_original_checkpoint(tmp_path, factors, dataset="oxford_flowers", shots=4, seed=2,
                                               params=("q", "k", "v", "o"))
    assert path == tmp_path / "vitb16" / "oxford_flowers" / "4shots" / "seed2" / "lora_weights.pt"
    saved = load_checkpoint(path)
    assert saved["metadata"] == {"r": 2, "alpha": 1, "encoder": "both", "params": ["q", "k", "v", "o"],
                                 "position": "all"}
    assert list(saved["weights"]) == [f"layer_{i}" for i in range(2 * LAYERS)]
    for i, layer in enumerate(factors.values()):  # text blocks first, then vision
        entry = saved["weights"][f"layer_{i}"]
        assert list(entry) == ["q_proj", "k_proj", "v_proj", "proj"]
        torch.testing.assert_close(entry["proj"]["w_lora_B"], layer["o"]["B"], rtol=0, atol=0)
        torch.testing.assert_close(entry["q_proj"]["w_lora_A"], layer["q"]["A"], rtol=0, atol=0)


def test_ivlp_checkpoint_of_a_resnet_tower_holds_text_prompts_only(tiny_rn, tmp_path):
    model = tiny_rn.model
    learned, fixed = ivlp.init_ivlp(model, NAMES, depth_text=2)
    path = ivlp.write_original_checkpoint(tmp_path, {**learned, **fixed}, model)
    ckpt = load_checkpoint(path)
    sd = ckpt["state_dict"]
    assert not any("VPT" in k for k in sd if k.startswith("image_encoder."))
    assert "image_encoder.bn1.running_mean" in sd and sd["image_encoder.conv1.weight"].dtype == torch.float16
    buffers = [k for k in sd if "running_" in k or "num_batches_tracked" in k or "token_" in k]
    assert len(ckpt["optimizer"]["param_groups"][0]["params"]) == len(sd) - len(buffers)
    assert len(ckpt["optimizer"]["state"]) == 2  # ctx and the one text VPT_shallow


def test_dassl_configs_name_the_recipes_the_way_the_trainers_read_them():
    cfg = maple.dassl_config("cross_datasets", dataset="ImageNet", subsample="all")
    assert cfg["TRAINER"] == {"NAME": "MaPLe", "MAPLE": {"N_CTX": 2, "PROMPT_DEPTH": 3, "CTX_INIT": "a photo of a",
                                                           "PREC": "fp16"}}
    assert cfg["OPTIM"]["LR"] == 0.0026 and cfg["OPTIM"]["MAX_EPOCH"] == 2 and cfg["DATASET"]["NUM_SHOTS"] == 16
    src = promptsrc.dassl_config("few_shot", shots=4, subsample="all")["TRAINER"]["PROMPTSRC"]
    assert (src["GPA_MEAN"], src["GPA_STD"], src["PROMPT_DEPTH_TEXT"], src["TEXT_LOSS_WEIGHT"]) == (30, 30, 9, 25)
    assert ivlp.dassl_config("language_only")["TRAINER"]["IVLP"]["N_CTX_VISION"] == 0
    assert vpt.dassl_config()["TRAINER"]["VPT"] == {"N_CTX_VISION": 8, "PROMPT_DEPTH_VISION": 12, "PREC": "fp16",
                                                     "CTX_INIT": "a photo of a"}
