"""vlprompt.backbone.attention: the towers' self-attention computed batch-first equals nn.MultiheadAttention's."""
from __future__ import annotations

import copy

import pytest
import torch

from vlprompt.backbone.attention import BatchFirstSelfAttention, use_batch_first_self_attention


def _pair(bias=True):
    torch.manual_seed(0)
    plain = torch.nn.MultiheadAttention(32, 4, batch_first=True, bias=bias).eval()
    ours = copy.deepcopy(plain)
    assert use_batch_first_self_attention(ours) == 1 and type(ours) is BatchFirstSelfAttention
    return plain, ours


def _masks(n, length, heads):
    g = torch.Generator().manual_seed(1)
    causal = torch.full((length, length), float("-inf")).triu(1)
    return {"none": None, "causal_additive": causal, "causal_bool": causal.isinf(),
            "per_head_additive": torch.randn(n * heads, length, length, generator=g)}


@pytest.mark.parametrize("mask", ["none", "causal_additive", "causal_bool", "per_head_additive"])
@pytest.mark.parametrize("bias", [True, False])
def test_self_attention_and_its_input_gradient_equal_multihead_attention(mask, bias):
    plain, ours = _pair(bias)
    x = torch.randn(3, 7, 32, generator=torch.Generator().manual_seed(2), requires_grad=True)
    m = _masks(3, 7, 4)[mask]
    outs, grads = [], []
    for module in (plain, ours):
        y = module(x, x, x, need_weights=False, attn_mask=m)[0]
        (g,) = torch.autograd.grad((y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum(), x)
        outs.append(y)
        grads.append(g)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)
    assert (outs[0] - outs[0].roll(1, 0)).abs().max() > 1e-2  # the comparison can tell inputs apart


def test_calls_it_does_not_cover_go_to_multihead_attention():
    plain, ours = _pair()
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(3))
    kv = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(4))
    pad = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    for args, kwargs in (((x, x, x), {"need_weights": True}), ((x, kv, kv), {"need_weights": False}),
                         ((x, x, x), {"need_weights": False, "key_padding_mask": pad})):
        a, b = plain(*args, **kwargs), ours(*args, **kwargs)
        torch.testing.assert_close(b[0], a[0], rtol=1e-5, atol=1e-6)
        assert (a[1] is None) == (b[1] is None)


def test_only_plain_batch_first_modules_change_and_the_state_dict_stays():
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"a": torch.nn.MultiheadAttention(8, 2, batch_first=True),
                                 "seq_first": torch.nn.MultiheadAttention(8, 2),
                                 "kv_bias": torch.nn.MultiheadAttention(8, 2, batch_first=True, add_bias_kv=True)})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert use_batch_first_self_attention(model) == 1
    assert type(model["a"]) is BatchFirstSelfAttention
    assert type(model["seq_first"]) is torch.nn.MultiheadAttention
    assert type(model["kv_bias"]) is torch.nn.MultiheadAttention
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
