"""The written-out originals of KgCoOp, ProGrad, TaskRes and CLIP-Adapter (tests/originals/) run on the tiny models,
the quantities they compute vary, and they agree with independent formulas where one exists: open_clip's own
``encode_text``, torch's SGD / Adam / schedulers, a KL written with ``F.kl_div``, the tokenizer's token positions.
Their checkpoint writers produce files vlprompt's restricted loader reads."""
import math
import sys

import pytest
import torch
import torch.nn.functional as F
import yaml

from originals import clip_adapter, coop_base, kgcoop, prograd, taskres
from vlprompt.data.templates import DATASET_TEMPLATES
from vlprompt.safe_pickle import Placeholder, load_checkpoint

# merging names ("x.", "cup (drinking)"), underscores, spaces
NAMES = ["golden_retriever", "sword lily", "banded", "cup (drinking)", "x."]


def feats(n, dim, seed=0):
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def model(tiny_vit):
    return tiny_vit.model


# -- the shared substrate -------------------------------------------------------------------------------------
def test_coop_text_path_is_open_clips_encode_text(model):
    tokens = coop_base.tokenize([f"a photo of a {n}." for n in NAMES])
    with torch.no_grad():
        ours = coop_base.encode_text(model, tokens)
        torch.testing.assert_close(ours, model.encode_text(tokens), rtol=0, atol=1e-6)
    assert ours.std(dim=0).min() > 1e-3  # the classes' features differ


def test_template_tables_differ_from_coops_exactly_where_recorded():
    """Every original's table keyed by Dassl's names against vlprompt's CoOp table (RECIPES_regularised.md)."""
    coop = {dassl: DATASET_TEMPLATES[ours] for dassl, ours in coop_base.DASSL_DATASET_NAMES.items()}
    expected = {kgcoop: {"DescribableTextures"},
                prograd: {"OxfordPets", "OxfordFlowers", "FGVCAircraft", "DescribableTextures", "Food101"},
                taskres: set(), clip_adapter: set()}
    for module, differing in expected.items():
        assert set(module.CUSTOM_TEMPLATES) == set(coop), module.__name__
        assert {k for k in coop if module.CUSTOM_TEMPLATES[k] != coop[k]} == differing, module.__name__
        assert all(t.count("{}") == 1 for t in module.CUSTOM_TEMPLATES.values())
    assert all(t.endswith(" {}.") for t in prograd.CUSTOM_TEMPLATES.values())  # its init strips " {}."


def test_dassl_schedule_and_optimizer_steps_equal_torch():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = coop_base.dassl_optimizer([p], "sgd", 0.002)
    sched = coop_base.dassl_scheduler(opt, 10)
    seen = []
    for epoch in range(10):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [coop_base.dassl_epoch_lr(e, 0.002, 10) for e in range(10)]
    assert seen[0] == 1e-5 and seen[1] == 0.002 and len(set(seen)) == 10
    torch.testing.assert_close(torch.tensor(seen, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64),
                               rtol=1e-12, atol=0)
    # SGD (momentum, L2 weight decay) and Adam (L2, not decoupled) written out, three steps each
    for name in ("sgd", "adam"):
        param = torch.nn.Parameter(feats(4, 5, seed=1))
        opt = coop_base.dassl_optimizer([param], name, 0.01)
        mine, state = param.detach().clone(), None
        for step in range(3):
            grad = feats(4, 5, seed=10 + step)
            param.grad = grad.clone()
            opt.step()
            if name == "sgd":
                mine, state = coop_base.sgd_step(mine, grad, state, 0.01)
            else:
                mine, state = coop_base.adam_l2_step(mine, grad, state, 0.01)
            torch.testing.assert_close(mine, param.detach(), rtol=1e-6, atol=1e-7)


# -- KgCoOp -------------------------------------------------------------------------------------------------------
def test_kgcoop_any_truthy_init_is_a_photo_of_a_with_four_vectors(model):
    for ctx_init in (True, "a photo of a dog", "itap of my"):
        ctx, prefix = kgcoop.init_context(model, len(NAMES), ctx_init=ctx_init, n_ctx=16, csc=True)
        assert prefix == "a photo of a" and ctx.shape == (4, model.ln_final.weight.shape[0])
        tp, ts, tok = kgcoop.prompt_buffers(model, NAMES, prefix, 4)
        sentence = model.token_embedding(coop_base.tokenize([f"a photo of a {n.replace('_', ' ')}." for n in NAMES]))
        torch.testing.assert_close(kgcoop.build_prompts(tp, ctx, ts), sentence.detach(), rtol=0, atol=0)
    for ctx_init, csc, shape in ((False, False, (16, 64)), ("", True, (len(NAMES), 16, 64))):
        ctx, prefix = kgcoop.init_context(model, len(NAMES), ctx_init=ctx_init, n_ctx=16, csc=csc,
                                          generator=torch.Generator().manual_seed(0))
        assert ctx.shape == shape and prefix == " ".join(["X"] * 16)
        assert 0.015 < ctx.std().item() < 0.025


def test_kgcoop_logits_score_and_loss(model):
    ctx, prefix = kgcoop.init_context(model, len(NAMES))
    tp, ts, tok = kgcoop.prompt_buffers(model, NAMES, prefix, 4)
    prompts = kgcoop.build_prompts(tp, ctx, ts)
    torch.testing.assert_close(kgcoop.build_prompts(tp, ctx, ts, "middle"), prompts, rtol=0, atol=0)  # ignored
    image = feats(6, 64)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    # at init the learned prompt IS the Caltech101 hand-crafted one: no distance
    _, score0 = kgcoop.forward(model, image, prompts, tok, kgcoop.anchor_text_features(model, NAMES, "Caltech101"))
    assert abs(score0.item()) < 1e-6
    anchor = kgcoop.anchor_text_features(model, NAMES, "DescribableTextures")  # "a photo of a {}, a type of ..."
    logits, score = kgcoop.forward(model, image, prompts, tok, anchor)
    assert logits.shape == (6, len(NAMES)) and logits.std(dim=1).min() > 0.1
    text = F.normalize(coop_base.text_encoder(model, prompts, tok), dim=-1)
    torch.testing.assert_close(logits, coop_base.cosine_logits(model, image, text), rtol=0, atol=1e-5)
    # 1 - mean cos == half the mean squared distance of unit vectors (an independent formula)
    torch.testing.assert_close(score, 0.5 * (text - anchor).pow(2).sum(-1).mean(), rtol=1e-4, atol=1e-6)
    assert 1e-3 < score.item() < 2
    total = kgcoop.loss(logits, score, labels)
    torch.testing.assert_close(total, F.cross_entropy(logits, labels) + 8.0 * score)
    # one step: Dassl's SGD on ctx (the only tensor with a gradient) equals the written-out SGD of the gradient
    param = torch.nn.Parameter(ctx.clone())
    opt = coop_base.dassl_optimizer([param], "sgd", 0.002)
    prompts_p = kgcoop.build_prompts(tp, param, ts)
    grad, = torch.autograd.grad(kgcoop.loss(*kgcoop.forward(model, image, prompts_p, tok, anchor), labels), param)
    assert grad.abs().sum(-1).min() > 0 and torch.isfinite(grad).all()
    kgcoop.reference_step(model, param, tp, ts, tok, anchor, image, labels, opt)
    expected, _ = coop_base.sgd_step(ctx, grad, None, 0.002)
    torch.testing.assert_close(param.detach(), expected, rtol=1e-6, atol=1e-8)


def test_kgcoop_issue2_log_is_a_squared_cosine_schedule():
    logged = {91: 1.197732e-06, 92: 7.882957e-07, 93: 4.935089e-07, 94: 2.900012e-07, 95: 1.568707e-07,
              96: 7.578848e-08, 97: 3.108897e-08, 98: 9.848079e-09, 99: 1.946900e-09, 100: 1.217413e-10}
    for epoch, value in logged.items():  # the log prints 7 significant digits
        assert math.isclose(kgcoop.issue2_printed_lr(epoch), value, rel_tol=1e-6), epoch
    assert math.isclose(kgcoop.released_epoch_lr(91), 4.894348e-05, rel_tol=1e-6)  # what the released code prints


# -- ProGrad -------------------------------------------------------------------------------------------------------
def test_prograd_init_puts_the_phrase_in_the_last_slots_counting_words(model):
    spill = {"OxfordPets", "OxfordFlowers", "FGVCAircraft", "Food101"}
    for dataset in prograd.CUSTOM_TEMPLATES:
        phrase = prograd.init_phrase(dataset)
        p = len(phrase.split(" "))
        assert coop_base.bpe_length(phrase) - p == (1 if dataset in spill else 0), dataset
    ctx, prefix = prograd.init_context(model, "OxfordPets")
    assert prefix == "X X X X X X X X a type of pet, a photo of a"
    assert torch.count_nonzero(ctx[:8]) == 0 and ctx[8:].abs().sum(-1).min() > 0
    phrase_tokens = coop_base.tokenize(["a type of pet, a photo of a"])[0]
    torch.testing.assert_close(ctx[8:], model.token_embedding(phrase_tokens[1:9]).detach(), rtol=0, atol=0)
    tp, ts, tok, _ = prograd.prompt_buffers(model, NAMES, prefix, 16)
    # the prompt's tokens 9..16 are the phrase's first 8 (so each slot replaces its own token), the phrase's last
    # token ("a") is position 17: the first row of the fixed suffix
    assert torch.equal(tok[:, 9:17], phrase_tokens[1:9].expand(len(NAMES), -1))
    assert torch.equal(tok[:, 17], phrase_tokens[9].expand(len(NAMES)))
    torch.testing.assert_close(ts[:, 0], model.token_embedding(phrase_tokens[9:10]).detach().expand(len(NAMES), -1),
                               rtol=0, atol=0)
    random_ctx, prefix = prograd.init_context(model, "OxfordPets", ctx_init=False, csc=True, n_cls=3,
                                              generator=torch.Generator().manual_seed(0))
    assert random_ctx.shape == (3, 16, 64) and prefix == " ".join(["X"] * 16)


def test_prograd_layouts(model):
    ctx, prefix = prograd.init_context(model, "DescribableTextures")
    tp, ts, tok, name_lens = prograd.prompt_buffers(model, NAMES, prefix, 16)
    end = prograd.build_prompts(tp, ctx, ts)
    assert end.shape == (len(NAMES), 77, 64)
    front = prograd.build_prompts(tp, ctx, ts, "front", name_lens)
    assert (front - end).abs().sum() > 0
    for i, n in enumerate(name_lens):  # the class block moved in front of the context
        torch.testing.assert_close(front[i, 1:1 + n], ts[i, :n], rtol=0, atol=0)
        torch.testing.assert_close(front[i, 1 + n:17 + n], ctx, rtol=0, atol=0)
    with pytest.raises(NameError):
        prograd.build_prompts(tp, ctx, ts, "middle", name_lens)


def test_prograd_losses_are_cross_entropy_and_the_teachers_soft_cross_entropy(model):
    ctx, prefix = prograd.init_context(model, "OxfordPets")
    tp, ts, tok, _ = prograd.prompt_buffers(model, NAMES, prefix, 16)
    zs = prograd.zero_shot_text_features(model, NAMES, "OxfordPets")
    image = feats(8, 64, seed=3)
    labels = torch.arange(8) % len(NAMES)
    tea = prograd.zero_shot_logits(model, image, zs)
    stu = prograd.student_logits(model, image, prograd.build_prompts(tp, ctx, ts), tok)
    assert tea.std(dim=1).min() > 0.1 and (stu - tea).abs().max() > 0.1  # zero slots: the student is not the teacher
    xe, kl = prograd.prograd_loss(stu, tea, labels)
    torch.testing.assert_close(xe, F.cross_entropy(stu, labels))
    p_t = F.softmax(tea, dim=-1)
    kl_div = F.kl_div(F.log_softmax(stu, dim=-1), p_t, reduction="batchmean")
    entropy = -(p_t * p_t.log()).sum(1).mean()
    torch.testing.assert_close(kl, kl_div + entropy, rtol=1e-5, atol=1e-6)
    _, kl_t = prograd.prograd_loss(stu, tea, labels, T=2.0)  # T^2 * soft CE of the tempered distributions
    torch.testing.assert_close(kl_t, 4 * -(F.softmax(tea / 2, -1) * F.log_softmax(stu / 2, -1)).sum(1).mean())


def test_prograd_projection_branches():
    kl = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    ce = torch.tensor([[-2.0, 1.0], [0.5, 0.0]])  # cos < 0
    g, cos = prograd.project_gradient(ce, kl, 1.0)
    assert cos < 0 and abs(torch.dot(g.flatten(), kl.flatten()).item()) < 1e-7
    torch.testing.assert_close(g, torch.tensor([[0.0, 1.0], [0.5, 0.0]]))
    g8, _ = prograd.project_gradient(ce, kl, 0.8)
    torch.testing.assert_close(g8, torch.tensor([[-0.4, 1.0], [0.5, 0.0]]))
    same, cos = prograd.project_gradient(-ce, kl, 1.0)  # cos > 0: unchanged
    assert cos > 0 and torch.equal(same, -ce)
    kept, cos = prograd.project_gradient(ce, torch.zeros_like(kl), 1.0)  # 0/0 -> NaN, NaN < 0 is False
    assert torch.isnan(cos) and torch.equal(kept, ce)


def test_prograd_full_update_step(model):
    """The written-out step (autograd.grad, projection, SGD math) equals the original's .grad choreography with a
    torch SGD; in a conflicting step the update direction is orthogonal to the KL gradient and never contains it."""
    ctx, prefix = prograd.init_context(model, "OxfordPets")
    tp, ts, tok, _ = prograd.prompt_buffers(model, NAMES, prefix, 16)
    zs = prograd.zero_shot_text_features(model, NAMES, "OxfordPets")
    for seed in range(8):  # labels against the teacher make a conflict likely; find one
        image = feats(8, 64, seed=seed)
        labels = prograd.zero_shot_logits(model, image, zs).argmin(1)
        out = prograd.reference_update_step(model, ctx, tp, ts, tok, image, labels, zs, lr=0.002)
        if out["cos"] < 0:
            break
    assert out["cos"] < 0, "no conflicting batch among 8 seeds"
    g_ce, g_kl, g = out["grad_ce"], out["grad_kl"], out["grad"]
    assert g_ce.norm() > 0 and g_kl.norm() > 0
    assert abs(torch.dot(g.flatten(), g_kl.flatten())) < 1e-5 * g.norm() * g_kl.norm()
    assert (g - g_ce).norm() > 1e-3 * g_ce.norm()
    expected, _ = coop_base.sgd_step(ctx, g, None, 0.002)
    torch.testing.assert_close(out["ctx"], expected, rtol=0, atol=0)
    with_kl, _ = coop_base.sgd_step(ctx, g_ce + g_kl, None, 0.002)
    assert (with_kl - out["ctx"]).abs().max() > 1e-7
    # the original's choreography on a Parameter with Dassl's SGD
    param = torch.nn.Parameter(ctx.clone())
    opt = coop_base.dassl_optimizer([param], "sgd", 0.002)
    stu = prograd.student_logits(model, image, prograd.build_prompts(tp, param, ts), tok)
    xe, kl = prograd.prograd_loss(stu, prograd.zero_shot_logits(model, image, zs), labels)
    prograd.prograd_backward_and_update([param], xe, kl, opt, 1.0)
    torch.testing.assert_close(param.detach(), out["ctx"], rtol=1e-6, atol=1e-8)


def test_prograd_recipe_tables():
    assert prograd.recipe_lambda("OxfordFlowers", 16) == 0.8 and prograd.recipe_lambda("EuroSAT", 8) == 0.8
    assert prograd.recipe_lambda("DescribableTextures", 4) == 1.0 and prograd.recipe_lambda("ImageNet", 16) == 1.0
    assert [prograd.recipe_epochs(k) for k in (1, 2, 4, 8, 16)] == [50, 100, 100, 200, 200]


# -- TaskRes -------------------------------------------------------------------------------------------------------
def test_taskres_base_is_the_unnormalised_mean_over_raw_name_prompts(model):
    base = taskres.base_text_features(model, NAMES, "ImageNet")
    templates = taskres.base_templates("ImageNet")
    assert len(templates) == 8 and templates[-1] == "a photo of a {}."
    with torch.no_grad():  # open_clip's own encode_text, template by template
        per_template = torch.stack([model.encode_text(coop_base.tokenize([t.format(n) for n in NAMES]))
                                    for t in templates])
        torch.testing.assert_close(base, per_template.mean(0), rtol=1e-5, atol=1e-6)
        ensemble = F.normalize(F.normalize(per_template, dim=-1).mean(0), dim=-1)  # CoOp's ensemble: not this
        assert (F.normalize(base, dim=-1) - ensemble).abs().max() > 1e-4
    cleaned = taskres.base_text_features(model, ["golden retriever"], "ImageNet")
    assert NAMES[0] == "golden_retriever" and (cleaned[0] - base[0]).abs().max() > 1e-3  # the raw name was encoded
    assert base.std(dim=0).min() > 1e-3


def test_taskres_imagenet_template_list_grows_with_each_build(model):
    assert len(taskres.base_templates("ImageNet", 1)) == 9 and len(taskres.base_templates("ImageNet", 2)) == 10
    assert taskres.base_templates("OxfordPets", 3) == ["a photo of a {}, a type of pet."]
    once = taskres.base_text_features(model, NAMES[:1], "ImageNet")
    twice = taskres.base_text_features(model, NAMES[:1], "ImageNet", imagenet_builds_before=1)
    assert (once - twice).abs().max() > 1e-5  # the custom template weighs 2/9 instead of 1/8


def test_taskres_logits_residual_and_alpha(model):
    base = taskres.base_text_features(model, NAMES, "OxfordPets")
    image = feats(5, 64, seed=4)
    residual = taskres.init_residual(base)
    assert torch.count_nonzero(residual) == 0
    torch.testing.assert_close(taskres.logits(model, image, base, residual, 0.5),
                               coop_base.cosine_logits(model, image, base), rtol=0, atol=0)
    residual = feats(*base.shape, seed=5) * base.norm(dim=-1, keepdim=True) * 0.1
    half, one = (taskres.logits(model, image, base, residual, a) for a in (0.5, 1.0))
    assert (half - one).abs().max() > 1e-3
    torch.testing.assert_close(one, coop_base.cosine_logits(model, image, base + residual))
    # an Adam step with L2 on the zero residual: the decay term is zero at first, the gradient moves it
    x = torch.nn.Parameter(taskres.init_residual(base))
    opt = coop_base.dassl_optimizer([x], "adam", 2e-3)
    grad, = torch.autograd.grad(F.cross_entropy(taskres.logits(model, image, base, x, 0.5), torch.arange(5)), x)
    x.grad = grad
    opt.step()
    mine, _ = coop_base.adam_l2_step(torch.zeros_like(base), grad, None, 2e-3)
    torch.testing.assert_close(x.detach(), mine, rtol=1e-6, atol=1e-9)
    assert x.detach().abs().max() > 1e-3  # Adam's first step is ~lr per coordinate with a nonzero gradient


def test_taskres_recipe_and_imagenet_subset_indexes():
    assert taskres.recipe("OxfordFlowers", 1)["alpha"] == 1.0
    assert taskres.recipe("DescribableTextures", 1)["alpha"] == 0.5
    assert taskres.recipe("ImageNet", 16)["lr"] == 2e-4 and taskres.recipe("ImageNet", 16)["max_epoch"] == 200
    assert taskres.recipe("EuroSAT", 4)["config"] == "adam_lr2e-3_B256_ep100"
    assert taskres.imagenet_subset_indexes(["b", "missile"], ["a", "missile", "b", "missile"]) == [2, 1]


# -- CLIP-Adapter --------------------------------------------------------------------------------------------------
def test_clip_adapter_any_width(model):
    weights = clip_adapter.init_adapter(64, generator=torch.Generator().manual_seed(0))
    assert weights["fc.0.weight"].shape == (16, 64) and weights["fc.2.weight"].shape == (64, 16)
    image = feats(6, 64, seed=6)
    text = clip_adapter.text_features(model, NAMES, "OxfordPets")
    with torch.no_grad():
        names = [f"a photo of a {n.replace('_', ' ')}, a type of pet." for n in NAMES]
        torch.testing.assert_close(text, model.encode_text(coop_base.tokenize(names)), rtol=0, atol=1e-6)
    out = clip_adapter.adapter(image, weights)
    assert out.min() >= 0 and out.std() > 1e-3
    logits = clip_adapter.logits(model, image, weights, text)
    zero_shot = coop_base.cosine_logits(model, image, text)
    assert (logits - zero_shot).abs().max() > 1e-3 and logits.std(dim=1).min() > 0.1
    torch.testing.assert_close(logits, coop_base.cosine_logits(model, 0.2 * out + 0.8 * image, text))
    silent = dict(weights, **{"fc.2.weight": torch.zeros(64, 16)})  # A(f) = 0: the zero-shot logits
    torch.testing.assert_close(clip_adapter.logits(model, image, silent, text), zero_shot, rtol=1e-6, atol=1e-5)
    params = {k: v.clone().requires_grad_(True) for k, v in weights.items()}
    loss = F.cross_entropy(clip_adapter.logits(model, image, params, text), torch.arange(6) % len(NAMES))
    grads = torch.autograd.grad(loss, list(params.values()))
    assert all(g.abs().sum() > 0 for g in grads)
    # LP++ and CLAP re-implementations are other functions of the same weights
    w_tip = F.normalize(text, dim=-1).t()
    assert (clip_adapter.lpp_logits(model, image, weights, w_tip, alpha=0.2) - logits).abs().max() > 1e-3
    torch.testing.assert_close(clip_adapter.clap_logits(model, image, weights, text), logits)


# -- checkpoint files ------------------------------------------------------------------------------------------------
def _checkpoint_cases(model):
    d, e = model.ln_final.weight.shape[0], model.text_projection.shape[1]
    ctx, prefix = kgcoop.init_context(model, len(NAMES))
    tp, ts, _ = kgcoop.prompt_buffers(model, NAMES, prefix, 4)
    pctx, pprefix = prograd.init_context(model, "OxfordPets")
    ptp, pts, _, _ = prograd.prompt_buffers(model, NAMES, pprefix, 16)
    base = feats(len(NAMES), e, seed=7)
    return [
        (kgcoop, {"ctx": ctx, "token_prefix": tp, "token_suffix": ts}, 100, "prompt_learner",
         ["ctx", "bias_vectors", "token_prefix", "token_suffix", "meta_net.linear1.weight", "meta_net.linear1.bias"],
         ["ctx", "bias_vectors", "meta_net.linear1.weight", "meta_net.linear1.bias"], False,
         {"ctx": torch.float16, "meta_net.linear1.weight": torch.float16, "bias_vectors": torch.float16}),
        (prograd, {"ctx": pctx, "token_prefix": ptp, "token_suffix": pts}, 200, "prompt_learner",
         ["ctx", "token_prefix", "token_suffix"], ["ctx"], False, {"ctx": torch.float16}),
        (taskres, {"text_feature_residuals": feats(len(NAMES), e, seed=8) * 0.01, "base_text_features": base}, 200,
         "prompt_learner", ["text_feature_residuals", "base_text_features"],
         ["text_feature_residuals", "base_text_features"], True, {"base_text_features": torch.float32}),
        (clip_adapter, clip_adapter.init_adapter(e), 200, "clip_adapter", ["fc.0.weight", "fc.2.weight"],
         ["fc.0.weight", "fc.2.weight"], False, {"fc.0.weight": torch.float32}),
    ], d


def test_checkpoints_have_the_originals_layout_and_load_without_running_code(model, tmp_path):
    cases, _ = _checkpoint_cases(model)
    for module, tensors, epoch, folder, keys, kept, val_result, dtypes in cases:
        run = tmp_path / module.__name__.split(".")[-1]
        path = module.write_original_checkpoint(run, tensors, epoch)
        assert path == run / folder / f"model.pth.tar-{epoch}"
        assert (run / folder / "checkpoint").read_text() == f"model.pth.tar-{epoch}\n"
        assert "dassl" not in sys.modules
        ckpt = load_checkpoint(path)
        extra = {"val_result"} if val_result else set()
        assert set(ckpt) == {"state_dict", "epoch", "optimizer", "scheduler"} | extra
        assert ckpt["epoch"] == epoch and list(ckpt["state_dict"]) == keys
        for key, dtype in dtypes.items():
            assert ckpt["state_dict"][key].dtype == dtype, (module.__name__, key)
        for key, value in tensors.items():
            saved = ckpt["state_dict"][key]
            torch.testing.assert_close(saved.float(), value.detach().to(saved.dtype).float(), rtol=0, atol=0)
        assert list(module.loaded_state(ckpt)) == kept
        optim = ckpt["optimizer"]
        trained = 2 if module is clip_adapter else 1  # KgCoOp's group also holds its 3 frozen dead parameters
        assert len(optim["param_groups"]) == 1 and len(optim["state"]) == trained
        assert len(optim["param_groups"][0]["params"]) == (4 if module is kgcoop else trained)
        sched = ckpt["scheduler"]
        assert isinstance(sched["successor"], Placeholder) and sched["last_epoch"] == 1
        assert sched["successor"].global_name == "torch.optim.lr_scheduler.CosineAnnealingLR"
        assert sched["successor"].attrs["last_epoch"] == epoch - 1
        lr = coop_base.dassl_epoch_lr(epoch, optim["param_groups"][0]["initial_lr"], epoch)  # the next epoch's
        assert math.isclose(optim["param_groups"][0]["lr"], lr, rel_tol=1e-9)


def test_kgcoop_checkpoint_in_fp32_keeps_the_dead_meta_net_fp16(model, tmp_path):
    ctx, prefix = kgcoop.init_context(model, 2)
    tp, ts, _ = kgcoop.prompt_buffers(model, NAMES[:2], prefix, 4)
    path = kgcoop.write_original_checkpoint(tmp_path, {"ctx": ctx, "token_prefix": tp, "token_suffix": ts}, 5,
                                            dtype=torch.float32, max_epoch=100)
    state = load_checkpoint(path)["state_dict"]
    assert state["ctx"].dtype == torch.float32 and state["meta_net.linear1.weight"].dtype == torch.float16
    assert state["bias_vectors"].shape == (1, 512) and state["meta_net.linear1.weight"].shape == (512, 512)


def test_dassl_log_config_block_reads_back(tmp_path):
    cfg = {"OPTIM": {"NAME": "sgd", "LR": 0.002, "MAX_EPOCH": 100}, "TRAINER": {"COOP": {"CTX_INIT": True, "W": 8.0}},
           "DATASET": {"NAME": "EuroSAT", "NUM_SHOTS": 16, "SUBSAMPLE_CLASSES": "base"}, "SEED": 1}
    text = coop_base.write_dassl_log(tmp_path, {"seed": 1, "trainer": "KgCoOp"}, cfg).read_text()
    block = text.split("** Config **\n************\n")[1].split("Collecting env info")[0]
    assert yaml.safe_load(block) == cfg
    assert text.index("seed: 1") < text.index("trainer: KgCoOp")
