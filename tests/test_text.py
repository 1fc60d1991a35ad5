"""The text encoder's fast paths equal the plain (77-token) path, in features and in gradients."""
import pytest
import torch

CLASSES = ["cat", "golden retriever", "x", "sword lily", "bird of paradise", "a"]


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def prompt_parts(te, n_ctx=4, classes=CLASSES):
    tokens = te.tokenize([" ".join(["X"] * n_ctx) + " " + c + "." for c in classes])
    emb = te.embed(tokens)
    return emb, te.eot_positions(tokens)


def test_token_embeddings_of_sentences_equal_encode_text(tiny_backbone):
    te = tiny_backbone.text
    texts = [f"a photo of a {c}." for c in CLASSES]
    ref = tiny_backbone.encode_text(texts, fast=False)
    assert rel(tiny_backbone.encode_text(texts), ref) < 1e-5  # the default (cut) path
    tokens = te.tokenize(texts)
    emb, eot = te.embed(tokens), te.eot_positions(tokens)
    assert emb.shape == (len(texts), 77, te.width)
    for mode in ("plain", "cut"):
        assert rel(te(emb, eot, mode=mode), ref) < 1e-5
    # the shared prefix "<sot> a photo of a" (5 tokens)
    out = te.encode_prompts(emb[0, :5], emb[:, 5:], eot, mode="prefix")
    assert rel(out, ref) < 1e-5
    assert torch.equal(te(emb, eot, mode="plain"), tiny_backbone.model.encode_text(tokens))


@pytest.mark.parametrize("mode", ["cut", "prefix"])
@pytest.mark.parametrize("split", ["end", "middle"])
def test_fast_paths_equal_plain_in_features_and_gradient(tiny_backbone, mode, split):
    te = tiny_backbone.text
    n_ctx = 8
    emb, eot = prompt_parts(te, n_ctx)
    ctx = torch.nn.Parameter(torch.randn(n_ctx, te.width) * 0.5)
    results = {}
    for m in ("plain", mode):
        ctx.grad = None
        if split == "end":  # SOT + whole context shared
            prefix, suffix = torch.cat([emb[0, :1], ctx]), emb[:, 1 + n_ctx:]
        else:  # SOT + first half of the context shared, the second half after the class tokens
            half = n_ctx // 2
            prefix = torch.cat([emb[0, :1], ctx[:half]])
            suffix = torch.cat([ctx[half:].expand(len(CLASSES), -1, -1), emb[:, 1 + n_ctx:]], dim=1)
        out = te.encode_prompts(prefix, suffix, eot, mode=m)
        weights = torch.randn_like(out, generator=torch.Generator().manual_seed(1))
        (out * weights).sum().backward()
        results[m] = (out.detach(), ctx.grad.clone())
    assert results["plain"][1].abs().sum() > 0
    assert rel(results[mode][0], results["plain"][0]) < 1e-5
    assert rel(results[mode][1], results["plain"][1]) < 1e-5


def test_grouped_prefix_equals_plain(tiny_backbone):
    """A prefix per group (CoCoOp: per image) with suffixes shared by the groups."""
    te = tiny_backbone.text
    emb, eot = prompt_parts(te, 4)
    base = torch.cat([emb[0, :1], torch.randn(4, te.width) * 0.3])
    prefix = torch.nn.Parameter(base[None] + 0.2 * torch.randn(3, 5, te.width))
    outs = {}
    for m in ("plain", "prefix"):
        prefix.grad = None
        out = te.encode_prompts(prefix, emb[:, 5:], eot, mode=m)
        out.square().sum().backward()
        outs[m] = (out.detach(), prefix.grad.clone())
    assert outs["plain"][0].shape == (3, len(CLASSES), tiny_backbone.embed_dim)
    # groups really differ
    assert (outs["plain"][0][0] - outs["plain"][0][1]).abs().max() > 1e-3
    assert rel(outs["prefix"][0], outs["plain"][0]) < 1e-5
    assert rel(outs["prefix"][1], outs["plain"][1]) < 1e-5
    # per-group suffixes (G, K, S, D)
    suffix4 = emb[None, :, 5:].repeat(3, 1, 1, 1) + 0.1 * torch.randn(3, len(CLASSES), 72, te.width)
    a = te.encode_prompts(prefix.detach(), suffix4, eot, mode="plain")
    b = te.encode_prompts(prefix.detach(), suffix4, eot, mode="prefix")
    assert rel(b, a) < 1e-5


@pytest.mark.parametrize("mode", ["plain", "cut", "prefix"])
def test_chunked_encoding_equals_unchunked(tiny_vit, mode):
    te = tiny_vit.text
    classes = [f"class number {i}" for i in range(37)]
    emb, eot = prompt_parts(te, 4, classes)
    ctx = torch.nn.Parameter(torch.randn(4, te.width) * 0.3)
    res = []
    for chunk in (None, 8):
        ctx.grad = None
        out = te.encode_prompts(torch.cat([emb[0, :1], ctx]), emb[:, 5:], eot, mode=mode, chunk_size=chunk)
        out.square().sum().backward()
        res.append((out.detach(), ctx.grad.clone()))
    assert rel(res[1][0], res[0][0]) < 1e-6
    assert rel(res[1][1], res[0][1]) < 1e-6


def test_auto_mode_picks_prefix_and_falls_back_without_causal_mask(tiny_vit):
    from vlprompt.backbone.text_encoder import TextEncoder

    te = tiny_vit.text
    assert te._pick_mode("auto", prefix_len=5) == "prefix"
    assert te._pick_mode("auto", prefix_len=1) == "cut"
    model = tiny_vit.model
    bidir = TextEncoder(token_embedding=model.token_embedding, positional_embedding=model.positional_embedding,
                        transformer=model.transformer, ln_final=model.ln_final,
                        text_projection=model.text_projection, attn_mask=None, pool_type="argmax", eos_id=None)
    assert bidir._pick_mode("auto", prefix_len=5) == "plain"
    emb, eot = prompt_parts(te, 4)
    # without a causal mask every position sees the padding: the plain path is the only exact one
    full = bidir(emb, eot)
    assert full.shape == (len(CLASSES), tiny_vit.embed_dim)
    with pytest.raises(Exception, match="causal"):
        bidir(emb, eot, mode="cut")


def test_bad_prompt_shapes_are_refused(tiny_vit):
    te = tiny_vit.text
    emb, eot = prompt_parts(te, 4)
    with pytest.raises(ValueError, match="context length"):
        te.encode_prompts(torch.zeros(10, te.width), emb[:, 1:], eot)
    with pytest.raises(ValueError, match="EOT"):
        te.encode_prompts(emb[0, :20], emb[:, 20:], eot)


@pytest.mark.parametrize("rows", [0, 256])
@pytest.mark.parametrize("chunk", [None, 3])
def test_length_buckets_equal_plain(tiny_rn, chunk, rows):
    """Rows sorted by EOT position and cut per bucket equal the plain path: one bucket per length (no minimum of
    token rows) or buckets holding prompts of several lengths (the default minimum of 256 token rows)."""
    te = tiny_rn.text
    classes = ["a", "golden retriever", "bird of paradise flower", "x", "sword lily", "cat", "king protea"]
    emb, eot = prompt_parts(te, 4, classes)
    prefix = torch.nn.Parameter(torch.cat([emb[0, :1], torch.randn(4, te.width) * 0.3])[None].repeat(2, 1, 1))
    res = []
    for fn in ("plain", "buckets"):
        prefix.grad = None
        if fn == "plain":
            out = te.encode_prompts(prefix, emb[:, 5:], eot, mode="plain")
        else:
            out = te._run_prefixed(prefix, emb[None, :, 5:], eot[None].expand(2, -1), chunk, min_bucket=1,
                                       min_rows=rows)
        out.square().sum().backward()
        res.append((out.detach(), prefix.grad.clone()))
    assert len(set(eot.tolist())) >= 4  # several lengths, so several buckets
    assert rel(res[1][0], res[0][0]) < 1e-5
    assert rel(res[1][1], res[0][1]) < 1e-5
