"""The learned-prompt layout against the reference's own construction (KaiyangZhou/CoOp ``PromptLearner``,
CoCoOp's ``construct_prompts``), class-specific contexts bound to their classes, ``n_ctx`` with word init,
prompts that do not fit the context length, and the interpretation hook."""
import json

import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from vlprompt.errors import ConfigError, VLPromptError
from vlprompt.methods import build_method
from vlprompt.methods.base import Features
from vlprompt.methods.prompts.cocoop import CoCoOp, CoCoOpConfig
from vlprompt.methods.prompts.coop import CoOp, CoOpConfig
from vlprompt.methods.prompts.plot import PLOT, PLOTConfig
from vlprompt.methods.parts.context import check_prompts_fit

# names whose last BPE run merges with the full stop (")." "..", ").."), and plain ones
MERGING = ["cup (drinking)", "mr. bean's car.", "a (b).", "x."]
NAMES = MERGING + ["black-footed ferret", "golden_retriever", "sword lily"]
POSITIONS = ["end", "middle", "front"]

_tokenizer = open_clip.get_tokenizer("RN50")  # CLIP's BPE: the reference's clip.tokenize and _tokenizer.encode


# -- the reference, written out from its code ------------------------------------------------------------
def reference_prompts(model, classnames, ctx, position, prompt_prefix=None):
    """KaiyangZhou/CoOp trainers/coop.py PromptLearner.__init__ + forward on ``model``'s token embedding.

    ``ctx``: (M, D) unified or (K, M, D) class-specific. Returns prompts (K, 77, D) and tokenized prompts."""
    n_cls, n_ctx = len(classnames), ctx.shape[-2]
    if prompt_prefix is None:
        prompt_prefix = " ".join(["X"] * n_ctx)
    classnames = [name.replace("_", " ") for name in classnames]
    name_lens = [len(_tokenizer.encode(name)) for name in classnames]
    prompts = [prompt_prefix + " " + name + "." for name in classnames]
    tokenized_prompts = torch.cat([_tokenizer(p) for p in prompts])
    with torch.no_grad():
        embedding = model.token_embedding(tokenized_prompts)
    prefix = embedding[:, :1, :]
    suffix = embedding[:, 1 + n_ctx:, :]
    if ctx.dim() == 2:
        ctx = ctx.unsqueeze(0).expand(n_cls, -1, -1)
    if position == "end":
        return torch.cat([prefix, ctx, suffix], dim=1), tokenized_prompts
    out = []
    for i in range(n_cls):
        name_len = name_lens[i]
        prefix_i = prefix[i:i + 1]
        class_i = suffix[i:i + 1, :name_len]
        suffix_i = suffix[i:i + 1, name_len:]
        if position == "middle":
            half = n_ctx // 2
            parts = [prefix_i, ctx[i:i + 1, :half], class_i, ctx[i:i + 1, half:], suffix_i]
        else:
            parts = [prefix_i, class_i, ctx[i:i + 1], suffix_i]
        out.append(torch.cat(parts, dim=1))
    return torch.cat(out), tokenized_prompts


def reference_text(model, prompts, tokenized_prompts):
    """The reference's TextEncoder (open_clip's transformer is batch-first: no permute)."""
    x = prompts + model.positional_embedding
    x = model.transformer(x, attn_mask=model.attn_mask)
    x = model.ln_final(x)
    return x[torch.arange(x.shape[0]), tokenized_prompts.argmax(dim=-1)] @ model.text_projection


def reference_logits(model, image, text):
    image = image / image.norm(dim=-1, keepdim=True)
    text = text / text.norm(dim=-1, keepdim=True)
    return model.logit_scale.exp() * image @ text.t()


def images(n, dim, seed=0):
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))


def assert_eot_is_pooled(prompt, full, tokenized):
    eot_emb = prompt.text.embed(torch.tensor([[_tokenizer.eot_token_id]]))[0, 0]
    assert torch.equal(prompt.eot.cpu(), tokenized.argmax(dim=-1))
    for k in range(full.shape[0]):
        assert torch.equal(full[k, int(prompt.eot[k])], eot_emb)


# -- 1. the layout ----------------------------------------------------------------------------------------
def test_merging_names_really_merge_with_the_full_stop():
    """The test names exercise the case: the sentence has fewer tokens than name + '.' counted apart."""
    for name in MERGING:
        in_sentence = len(_tokenizer.encode(f"X {name}.")) - 1
        assert in_sentence == len(_tokenizer.encode(name)), name


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("csc", [False, True])
def test_coop_layout_and_logits_equal_the_reference(tiny_vit, position, csc):
    model = tiny_vit.model
    coop = CoOp(CoOpConfig(n_ctx=4, csc=csc, class_position=position, text_mode="plain"), tiny_vit, NAMES)
    with torch.no_grad():  # contexts far from the token embeddings: a wrong layout shows in the logits
        coop.prompt.ctx.normal_(0, 0.5)
    ctx = coop.prompt.ctx[0, :, :, :].detach()
    ctx = ctx if csc else ctx[0]
    expected, tokenized = reference_prompts(model, NAMES, ctx, position)
    full = coop.prompt.full_embeddings()[0]
    torch.testing.assert_close(full, expected, rtol=0, atol=0)
    assert_eot_is_pooled(coop.prompt, full, tokenized)
    image = images(6, tiny_vit.embed_dim)
    ref = reference_logits(model, image, reference_text(model, expected, tokenized))
    coop.eval()
    with torch.no_grad():
        torch.testing.assert_close(coop(Features(global_=image)), ref, rtol=0, atol=1e-6)
        coop.config.text_mode = coop.prompt.text_mode = "auto"  # the fast exact paths
        torch.testing.assert_close(coop(Features(global_=image)), ref, rtol=0, atol=2e-5)


@pytest.mark.parametrize("position", POSITIONS)
def test_word_init_layout_equals_the_reference(tiny_vit, position):
    model = tiny_vit.model
    coop = CoOp(CoOpConfig(init="a photo of a", class_position=position), tiny_vit, NAMES)
    expected, tokenized = reference_prompts(model, NAMES, coop.prompt.ctx[0, 0].detach(), position,
                                            prompt_prefix="a photo of a")
    torch.testing.assert_close(coop.prompt.full_embeddings()[0], expected, rtol=0, atol=0)
    torch.testing.assert_close(coop.prompt.encode()[0], reference_text(model, expected, tokenized),
                               rtol=0, atol=1e-5)


def test_new_class_list_gets_the_reference_layout(tiny_vit):
    coop = CoOp(CoOpConfig(n_ctx=6, class_position="middle"), tiny_vit, ["cat", "dog"])
    coop.set_classnames(NAMES)
    expected, tokenized = reference_prompts(tiny_vit.model, NAMES, coop.prompt.ctx[0, 0].detach(), "middle")
    full = coop.prompt.full_embeddings()[0]
    torch.testing.assert_close(full, expected, rtol=0, atol=0)
    assert_eot_is_pooled(coop.prompt, full, tokenized)


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("csc", [False, True])
def test_plot_prompt_sets_equal_the_reference(tiny_vit, position, csc):
    model = tiny_vit.model
    plot = PLOT(PLOTConfig(n_ctx=4, n_prompts=3, csc=csc, class_position=position), tiny_vit, NAMES)
    with torch.no_grad():
        plot.prompt.ctx.normal_(0, 0.5)
    full = plot.prompt.full_embeddings()
    text = plot.prompt.encode()  # (N, K, E)
    for n in range(3):
        ctx = plot.prompt.ctx[n].detach()
        expected, tokenized = reference_prompts(model, NAMES, ctx if csc else ctx[0], position)
        torch.testing.assert_close(full[n], expected, rtol=0, atol=0)
        assert_eot_is_pooled(plot.prompt, full[n], tokenized)
        torch.testing.assert_close(text[n], reference_text(model, expected, tokenized), rtol=0, atol=1e-5)


@pytest.mark.parametrize("position", POSITIONS)
def test_cocoop_logits_equal_the_reference(tiny_vit, position):
    """CoCoOp's construct_prompts: the meta-net's bias added to every context vector, prompt per image (the
    reference has the class at the end only; middle / front follow CoOp's cut)."""
    model = tiny_vit.model
    method = CoCoOp(CoCoOpConfig(class_position=position), tiny_vit, NAMES)
    with torch.no_grad():
        for p in method.meta_net.parameters():
            p.normal_(0, 0.3)
    image = images(3, tiny_vit.embed_dim, seed=2)
    with torch.no_grad():
        bias = method.meta_net(F.normalize(image, dim=-1))  # (B, D)
        ctx = method.prompt.ctx[0, 0]
        rows = []
        for b in range(image.shape[0]):
            prompts, tokenized = reference_prompts(model, NAMES, ctx + bias[b:b + 1], position,
                                                   prompt_prefix="a photo of a")
            rows.append(reference_logits(model, image[b:b + 1], reference_text(model, prompts, tokenized))[0])
        ref = torch.stack(rows)
        torch.testing.assert_close(method.forward_per_image(Features(global_=image)), ref, rtol=0, atol=1e-6)
        torch.testing.assert_close(method(Features(global_=image)), ref, rtol=0, atol=2e-5)


def test_name_shortened_by_the_full_stop_keeps_eot_last(tiny_vit):
    """'x(..' is 3 tokens alone but 'x(...' only 2: the reference's cut would take <eot> into the class block
    (and pool another token); here the block stops before <eot>, which stays where the sentence has it."""
    name = "x(.."
    assert len(_tokenizer.encode(name)) > len(_tokenizer.encode(f"X {name}.")) - 1
    coop = CoOp(CoOpConfig(n_ctx=4, class_position="front"), tiny_vit, [name, "cat"])
    tokens = _tokenizer([f"X X X X {name}."])
    eot = int(tokens.argmax(dim=-1)[0])
    sentence = coop.prompt.text.embed(tokens)[0]
    full = coop.prompt.full_embeddings()[0, 0]
    assert int(coop.prompt.eot[0]) == eot
    n_name = eot - 1 - 4
    torch.testing.assert_close(full[1:1 + n_name], sentence[1 + 4:eot], rtol=0, atol=0)  # the whole name block
    torch.testing.assert_close(full[1 + n_name:eot], coop.prompt.ctx[0, 0].detach(), rtol=0, atol=0)
    torch.testing.assert_close(full[eot:], sentence[eot:], rtol=0, atol=0)


# -- 2. class-specific contexts belong to their classes -------------------------------------------------
CLASSES = ["banded", "golden_retriever", "sword lily", "x"]


def test_csc_context_refuses_another_class_list(tiny_vit):
    coop = CoOp(CoOpConfig(n_ctx=4, csc=True), tiny_vit, CLASSES)
    coop.set_classnames(["banded", "golden retriever", " sword_lily ", "x"])  # the same names once cleaned
    before = list(coop.classnames)
    cases = {  # other list -> a class the message must name
        ("banded", "golden_retriever", "sword lily", "dotted"): "dotted",  # same count
        ("golden_retriever", "banded", "sword lily", "x"): "golden retriever",  # other order
        ("banded", "golden_retriever", "sword lily"): "'x'",  # fewer
        ("banded", "golden_retriever", "sword lily", "x", "cat"): "cat",  # more
        ("cat", "dog"): "cat",
    }
    for names, named in cases.items():
        with pytest.raises(VLPromptError, match="class-specific") as e:
            coop.set_classnames(list(names))
        assert named in str(e.value)
        assert coop.classnames == before  # a refused list changes nothing
        assert coop.prompt.classnames == [c.replace("_", " ") for c in CLASSES]


def test_csc_class_names_survive_save_and_load(tmp_path, tiny_vit):
    """The runner's path: prompt.safetensors + method.json (config, classnames), build_method on the saved
    classes, load_learned_state, then set_classnames for another class list."""
    for name, options in (("coop", {"n_ctx": 4, "csc": True, "class_position": "middle"}),
                          ("plot", {"n_ctx": 4, "csc": True, "n_prompts": 2})):
        method = build_method(name, options, tiny_vit, CLASSES)
        save_file({k: v.contiguous() for k, v in method.learned_state().items()}, str(tmp_path / f"{name}.st"))
        meta = json.loads(json.dumps({"config": method.config.to_dict(), "classnames": list(method.classnames)}))
        loaded = build_method(name, meta["config"], tiny_vit, meta["classnames"])
        loaded.load_learned_state(load_file(str(tmp_path / f"{name}.st")))
        torch.testing.assert_close(loaded.prompt.encode(), method.prompt.encode())
        loaded.set_classnames(CLASSES)
        with pytest.raises(VLPromptError, match="'dotted'"):
            loaded.set_classnames(["banded", "golden_retriever", "dotted", "x"])


def test_unified_context_moves_to_any_class_list(tiny_vit):
    coop = CoOp(CoOpConfig(n_ctx=4), tiny_vit, CLASSES)
    for names in (CLASSES[::-1], ["cat", "dog"], ["cat", "dog", "bird", "fish", "cow"]):
        coop.set_classnames(names)
        assert coop.prompt.encode().shape == (1, len(names), tiny_vit.embed_dim)
        assert coop.classnames == list(names)


# -- 3. n_ctx and word init --------------------------------------------------------------------------------
def test_n_ctx_defaults_and_records_what_was_learned(tiny_vit):
    d = tiny_vit.text.width
    cases = [(CoOp, CoOpConfig(), 16), (CoOp, CoOpConfig(init="a photo of a"), 4),
             (CoOp, CoOpConfig(n_ctx=4, init="a photo of a"), 4), (CoOp, CoOpConfig(n_ctx=7), 7),
             (PLOT, PLOTConfig(n_prompts=2, init="a photo of a"), 4), (PLOT, PLOTConfig(n_prompts=2), 16),
             (CoCoOp, CoCoOpConfig(), 4), (CoCoOp, CoCoOpConfig(init=None), 16)]
    for cls, cfg, m in cases:
        given = cfg.n_ctx
        method = cls(cfg, tiny_vit, CLASSES)
        assert method.prompt.ctx.shape[-2:] == (m, d)
        assert method.config.n_ctx == m and method.config.to_dict()["n_ctx"] == m
        assert cfg.n_ctx == given  # the caller's config is not changed
        # the recorded config rebuilds the same method
        rebuilt = build_method(cls.name, method.config.to_dict(), tiny_vit, CLASSES)
        assert rebuilt.prompt.ctx.shape == method.prompt.ctx.shape


def test_n_ctx_contradicting_word_init_is_an_error(tiny_vit):
    for name, options in (("coop", {"n_ctx": 16, "init": "a photo of a"}),
                          ("plot", {"n_ctx": 16, "init": "a photo of a"}),
                          ("cocoop", {"n_ctx": 16})):  # CoCoOp's default init is "a photo of a"
        with pytest.raises(ConfigError, match=r"n_ctx.*16.*4 tokens"):
            build_method(name, options, tiny_vit, CLASSES)
    for bad in (0, -1):  # refused when the config is constructed
        with pytest.raises(VLPromptError, match=r"n_ctx \(--n-ctx\) must be >= 1"):
            CoOp(CoOpConfig(n_ctx=bad), tiny_vit, CLASSES)


def test_word_init_learns_one_vector_per_token(tiny_vit):
    te = tiny_vit.text
    words = "itap of a"  # "itap" is more than one BPE token (the reference counts words: 3)
    n_tokens = len(_tokenizer.encode(words))
    assert n_tokens > len(words.split())
    coop = CoOp(CoOpConfig(init=words), tiny_vit, CLASSES)
    assert coop.config.n_ctx == n_tokens
    torch.testing.assert_close(coop.prompt.ctx[0, 0], te.embed(te.tokenize([words]))[0, 1:1 + n_tokens])


@pytest.mark.parametrize("position", POSITIONS)
def test_word_count_init_keeps_the_further_init_tokens_fixed_as_the_reference(tiny_vit, position):
    """The reference's count (``n_ctx = len(ctx_init.split(" "))``): "itap of a" learns the first 3 token vectors
    and its 4th token stays in the fixed suffix of ``"itap of a {name}."`` tokenized whole, at every position."""
    model = tiny_vit.model
    words = "itap of a"
    assert len(_tokenizer.encode(words)) == 4
    coop = CoOp(CoOpConfig(init=words, init_length="words", class_position=position, text_mode="plain"),
                tiny_vit, NAMES)
    assert coop.prompt.n_ctx == coop.config.n_ctx == 3
    with torch.no_grad():
        first = model.token_embedding(_tokenizer(words))[0, 1:4]
    torch.testing.assert_close(coop.prompt.ctx[0, 0].detach(), first, rtol=0, atol=0)
    with torch.no_grad():  # a context far from the init: the fixed 4th token must not move with it
        coop.prompt.ctx.normal_(0, 0.5)
    expected, tokenized = reference_prompts(model, NAMES, coop.prompt.ctx[0, 0].detach(), position,
                                            prompt_prefix=words)
    torch.testing.assert_close(coop.prompt.full_embeddings()[0], expected, rtol=0, atol=0)
    image = images(6, tiny_vit.embed_dim)
    ref = reference_logits(model, image, reference_text(model, expected, tokenized))
    coop.eval()
    with torch.no_grad():
        torch.testing.assert_close(coop(Features(global_=image)), ref, rtol=0, atol=1e-5)
        coop.config.text_mode = coop.prompt.text_mode = "auto"
        torch.testing.assert_close(coop(Features(global_=image)), ref, rtol=0, atol=2e-5)
    # the recorded config rebuilds the same layout (method.json), PLOT's prompt sets too
    rebuilt = build_method("coop", coop.config.to_dict(), tiny_vit, NAMES)
    assert rebuilt.prompt.n_ctx == 3 and torch.equal(rebuilt.prompt.tail, coop.prompt.tail)
    plot = PLOT(PLOTConfig(init=words, init_length="words", n_prompts=2, class_position=position), tiny_vit, NAMES)
    assert plot.prompt.n_ctx == 3 and torch.equal(plot.prompt.tail, coop.prompt.tail)


@pytest.mark.parametrize("length", ["words", "tokens"])
@pytest.mark.parametrize("position", POSITIONS)
def test_init_placed_at_the_end_of_a_zero_padded_context(tiny_vit, position, length):
    """``init_placement end`` (ProGrad's rule, for any prompt learner): the init's p vectors are the last of n_ctx,
    zeros before, and the prompt text is ``"X" * (n_ctx - p) + init``: counting words, "itap of a"'s 4th token stays
    a fixed token right after the context; counting tokens, all 4 are learned."""
    model = tiny_vit.model
    words, n_ctx = "itap of a", 7
    p = 3 if length == "words" else 4
    coop = CoOp(CoOpConfig(init=words, init_length=length, init_placement="end", n_ctx=n_ctx,
                           class_position=position, text_mode="plain"), tiny_vit, NAMES)
    assert coop.prompt.n_ctx == coop.config.n_ctx == n_ctx
    with torch.no_grad():
        first = model.token_embedding(_tokenizer(words))[0, 1:1 + p]
    torch.testing.assert_close(coop.prompt.ctx[0, 0, n_ctx - p:].detach(), first, rtol=0, atol=0)
    assert torch.count_nonzero(coop.prompt.ctx[0, 0, :n_ctx - p]) == 0
    with torch.no_grad():
        coop.prompt.ctx.normal_(0, 0.5)
    prefix = " ".join(["X"] * (n_ctx - p) + [words]) if length == "words" else None
    expected, tokenized = reference_prompts(model, NAMES, coop.prompt.ctx[0, 0].detach(), position,
                                            prompt_prefix=prefix)
    torch.testing.assert_close(coop.prompt.full_embeddings()[0], expected, rtol=0, atol=0)
    image = images(6, tiny_vit.embed_dim)
    coop.eval()
    with torch.no_grad():
        ref = reference_logits(model, image, reference_text(model, expected, tokenized))
        torch.testing.assert_close(coop(Features(global_=image)), ref, rtol=0, atol=1e-5)
    rebuilt = build_method("coop", coop.config.to_dict(), tiny_vit, NAMES)
    assert torch.equal(rebuilt.prompt.tail, coop.prompt.tail)
    with pytest.raises(ConfigError, match=r"give --n-ctx 3 or more \(got 2\)"):
        CoOp(CoOpConfig(init=words, init_length="words", init_placement="end", n_ctx=2), tiny_vit, NAMES)
    with pytest.raises(ConfigError, match="init_placement.*--init"):
        CoOpConfig(init_placement="end")  # a random context has no words to place: refused by the config
    with pytest.raises(ConfigError, match="pad it with zeros"):
        CoOp(CoOpConfig(init=words, n_ctx=7), tiny_vit, NAMES)


def test_word_count_init_is_refused_where_it_means_nothing(tiny_vit):
    with pytest.raises(ConfigError, match="init_length.*--init"):
        CoOp(CoOpConfig(init_length="words"), tiny_vit, CLASSES)
    with pytest.raises(ConfigError, match=r"n_ctx.*4 but.*3 words"):
        CoOp(CoOpConfig(init="itap of a", init_length="words", n_ctx=4), tiny_vit, CLASSES)
    with pytest.raises(ConfigError, match="repeated spaces"):
        CoOp(CoOpConfig(init="a  photo", init_length="words"), tiny_vit, CLASSES)


# -- 4. prompts that do not fit --------------------------------------------------------------------------
def test_check_prompts_fit_names_the_first_text_too_long():
    tok = _tokenizer
    fits = " ".join(["x"] * 75)  # 75 BPE tokens + start + end = 77
    check_prompts_fit(tok, ["a photo of a cat.", fits], 77)
    check_prompts_fit(tok, [], 77)
    over = fits + " y"
    with pytest.raises(VLPromptError, match=r"class name 'x x .* y'.*78 tokens.*at most 77"):
        check_prompts_fit(tok, ["cat", over, over + " z"], 77, what="class name")
    check_prompts_fit(tok, ["a b c"], 5)
    with pytest.raises(VLPromptError, match="'a b c d'"):
        check_prompts_fit(tok, ["a b c", "a b c d"], 5)


def test_learned_prompt_length_limit_is_exact(tiny_vit):
    """A class name filling the 77 positions exactly is used; one token more is refused, naming it."""
    m = 4
    exact = " ".join(["y"] * (77 - 2 - m - 1))  # start + context + name + "." + end = 77
    coop = CoOp(CoOpConfig(n_ctx=m), tiny_vit, ["cat", exact])
    assert int(coop.prompt.eot[1]) == 76
    with pytest.raises(VLPromptError, match=r"too long .* 4 context vectors"):
        coop.set_classnames(["cat", exact + " y"])
    with pytest.raises(VLPromptError, match="init"):
        CoOp(CoOpConfig(init=" ".join(["a"] * 80)), tiny_vit, ["cat"])


# -- 5. interpretation ------------------------------------------------------------------------------------
def test_interpretable_vectors_label_every_context_block(tiny_vit):
    coop = CoOp(CoOpConfig(n_ctx=4), tiny_vit, CLASSES)
    (label, vec), = coop.interpretable_vectors()
    assert label == {"prompt": 0, "class": None}
    assert torch.equal(vec, coop.prompt.ctx[0, 0]) and not vec.requires_grad
    plot = PLOT(PLOTConfig(n_ctx=3, n_prompts=2, csc=True), tiny_vit, CLASSES)
    blocks = plot.interpretable_vectors()
    assert [b[0] for b in blocks] == [{"prompt": n, "class": c.replace("_", " ")} for n in range(2) for c in CLASSES]
    for (label, vec) in blocks:
        ci = [c.replace("_", " ") for c in CLASSES].index(label["class"])
        assert torch.equal(vec, plot.prompt.ctx[label["prompt"], ci]) and vec.shape == (3, tiny_vit.text.width)
    cocoop = CoCoOp(CoCoOpConfig(), tiny_vit, CLASSES)
    (label, vec), = cocoop.interpretable_vectors()
    assert label == {"prompt": 0, "class": None} and vec.shape == (4, tiny_vit.text.width)
