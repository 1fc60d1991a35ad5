"""The written-out originals of the adapters on cached features (tests/originals: Tip-Adapter / Tip-Adapter-F,
LP++, ZS-LP / CLAP): they run on the tiny models, the quantities they compute vary, and each rule is checked
against an independent formulation (hand-written optimizer updates, closed-form gradients, loops, torch's own
schedulers, brute-force grid searches); the files they write load through vlprompt's restricted unpickler."""
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from originals import clap, lp_plus_plus as lpp, tip_adapter as tip
from vlprompt.safe_pickle import Placeholder, load_checkpoint

NAMES = ["golden_retriever", "sword lily", "black-footed ferret", "x"]


def unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def support(n_classes=3, shots=4, dim=16, seed=0, spread=0.6, sample_seed=None):
    """Seeded features (N, D) clustered around one direction per class (``seed`` draws the directions,
    ``sample_seed`` the images: two splits of one problem share ``seed``), so accuracies are neither 0 nor
    100 %; labels (N,) in the original's list order (class-major); text weights (D, C) near the directions."""
    g = torch.Generator().manual_seed(seed)
    centers = F.normalize(torch.randn(n_classes, dim, generator=g), dim=-1)
    text = F.normalize(centers + 0.8 * torch.randn(n_classes, dim, generator=g), dim=-1).t()
    if sample_seed is not None:
        g = torch.Generator().manual_seed(sample_seed)
    labels = torch.arange(n_classes).repeat_interleave(shots)
    feats = F.normalize(centers[labels] + spread * torch.randn(len(labels), dim, generator=g), dim=-1)
    return feats, labels, text


def images(n, size=32, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# -- 1. Tip-Adapter ---------------------------------------------------------------------------------------
def test_written_out_text_encoder_equals_open_clip_and_classes_differ(tiny_vit):
    model = tiny_vit.model
    tokens = tip.tokenize([f"a photo of a {n}." for n in NAMES])
    with torch.no_grad():
        torch.testing.assert_close(tip.encode_text(model, tokens), model.encode_text(tokens), rtol=0, atol=1e-6)
        weights = tip.clip_classifier(model, NAMES, tip.TEMPLATES["imagenet"])  # (D, C)
    assert weights.shape == (tiny_vit.embed_dim, len(NAMES))
    torch.testing.assert_close(weights.norm(dim=0), torch.ones(len(NAMES)))
    cos = weights.t() @ weights
    assert cos[~torch.eye(len(NAMES), dtype=torch.bool)].max() < 0.95  # the classes are told apart
    with pytest.raises(RuntimeError, match="too long"):
        tip.tokenize(["word " * 80])


def test_tip_classifier_equals_vlprompt_zero_shot_ensemble(tiny_vit):
    """Cross-check of two independent writings: Tip's clip_classifier (normalise, mean, renormalise) and
    vlprompt's zero-shot prompt ensembling, on names with underscores."""
    from vlprompt.methods.parts.handcrafted import class_text_features

    templates = tip.TEMPLATES["imagenet"]
    with torch.no_grad():
        ours = class_text_features(tiny_vit, NAMES, templates)  # (C, D)
        theirs = tip.clip_classifier(tiny_vit.model, NAMES, templates)
    torch.testing.assert_close(ours, theirs.t(), rtol=0, atol=1e-5)


def test_cache_keys_average_the_raw_passes_then_normalise(tiny_vit):
    model = tiny_vit.model
    views = torch.stack([images(6, seed=s) for s in range(3)])  # 3 augmented passes of 6 training images
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    keys, values = tip.build_cache_model(model, views, labels)
    assert keys.shape == (tiny_vit.embed_dim, 6) and values.shape == (6, 3)
    torch.testing.assert_close(keys.norm(dim=0), torch.ones(6))
    assert torch.equal(values, torch.eye(3)[labels])
    with torch.no_grad():
        raw = torch.stack([model.encode_image(v) for v in views])  # (3, 6, D)
    means = raw.mean(0)
    torch.testing.assert_close(keys.t(), means / means.norm(dim=-1, keepdim=True), rtol=0, atol=1e-6)
    aff = tip.affinity(F.normalize(means, dim=-1), keys)
    assert torch.equal(aff.argmax(dim=1), torch.arange(6))  # each image is closest to its own key
    assert aff.std() > 1e-3  # the tiny tower still tells the images apart


def test_tip_logits_equal_a_loop_over_the_cache():
    feats, labels, text = support(seed=1)
    query = unit(5, 16, seed=2)
    keys, values = feats.t(), tip.build_cache_values(labels)
    alpha, beta = 1.7, 5.5
    logits = tip.tip_logits(query, text, values, alpha, beta, cache_keys=keys)
    expected = torch.zeros(5, 3)
    for b in range(5):
        for c in range(3):
            cache = sum(math.exp(-beta * (1 - float(query[b] @ feats[j])))
                        for j in range(len(labels)) if labels[j] == c)
            expected[b, c] = 100 * float(query[b] @ text[:, c]) + alpha * cache
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(tip.tip_logits(query, text, values, alpha, beta, adapter_weight=keys.t()), logits)
    torch.testing.assert_close(tip.tip_logits(query, text, values, 0.0, beta, cache_keys=keys), 100 * query @ text)


def test_search_keeps_the_first_strictly_better_pair_in_beta_major_order():
    feats, labels, _ = support(n_classes=4, shots=4, seed=6, spread=0.9)
    val, val_labels, _ = support(n_classes=4, shots=6, seed=6, spread=0.9, sample_seed=4)
    text = unit(4, 16, seed=9).t()  # a poor zero-shot classifier: the cache has something to add
    keys, values = feats.t(), tip.build_cache_values(labels)
    scale, steps = [12, 60], [30, 12]
    betas, alphas = tip.search_grid(scale, steps)
    assert len(betas) == 30 and len(alphas) == 12 and betas[0] == alphas[0] == 0.1
    assert betas[-1] < 12 and alphas[-1] < 60  # the index stops at steps - 1
    grid = np.array([[tip.cls_acc(tip.tip_logits(val, text, values, a, b, cache_keys=keys), val_labels)
                      for a in alphas] for b in betas])
    first = np.unravel_index(np.argmax(grid), grid.shape)  # numpy: the first maximum in row-major order
    assert grid.max() > grid[0, 0] and (grid == grid.max()).sum() > 1  # a later pair wins, and there are ties
    beta, alpha, acc = tip.search_hp(keys, values, val, val_labels, text, scale, steps)
    assert (beta, alpha, acc) == (betas[first[0]], alphas[first[1]], grid.max())
    # nothing above 0 %: the starting (0, 0) stays
    assert tip.search_hp(keys, values, val, torch.full_like(val_labels, -1), text, scale, steps) == (0, 0, 0)


def _adamw_by_hand(weight, grads_fn, lrs, wd=0.01, betas=(0.9, 0.999), eps=1e-4):
    """AdamW (decoupled decay, bias-corrected moments) written from its definition."""
    m, v = torch.zeros_like(weight), torch.zeros_like(weight)
    for t, lr in enumerate(lrs, start=1):
        g = grads_fn(weight, t - 1)
        weight = weight * (1 - lr * wd)
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        m_hat, v_hat = m / (1 - betas[0] ** t), v / (1 - betas[1] ** t)
        weight = weight - lr * m_hat / (v_hat.sqrt() + eps)
    return weight


def test_tip_adapter_f_is_adamw_eps_1e4_with_a_per_iteration_cosine():
    feats, labels, text = support(n_classes=3, shots=4, seed=5)
    keys, values = feats.t().clone(), tip.build_cache_values(labels)
    epochs, batch, lr, alpha, beta = 3, 5, 0.02, 1.17, 1.0
    views = torch.stack([F.normalize(feats + 0.2 * unit(12, 16, seed=10 + e), dim=-1) for e in range(epochs)])
    orders = torch.stack([torch.randperm(12, generator=torch.Generator().manual_seed(20 + e)) for e in range(epochs)])
    sel, sel_labels, _ = support(n_classes=3, shots=5, seed=5, spread=1.0, sample_seed=6)
    out = tip.tip_adapter_f_train(keys, values, text, views, labels, sel, sel_labels, alpha, beta, lr=lr,
                                  epochs=epochs, batch_size=batch, orders=orders)
    torch.testing.assert_close(keys, feats.t())  # the caller's keys are left alone (the original's alias is not)
    iters = [(e, orders[e][i:i + batch]) for e in range(epochs) for i in range(0, 12, batch)]
    assert len(out["losses"]) == len(iters) == 9  # ceil(12 / 5) = 3 batches per epoch, the last one of 2
    total = len(iters)
    lrs = [lr * (1 + math.cos(math.pi * t / total)) / 2 for t in range(total)]  # eta_min 0, T_max = 9
    np.testing.assert_allclose(out["lrs"], lrs, rtol=1e-12)

    def grad(weight, t):
        e, idx = iters[t]
        w = weight.detach().requires_grad_(True)
        aff = views[e][idx] @ w.t()
        logits = 100 * views[e][idx] @ text + alpha * torch.exp(-beta * (1 - aff)) @ values
        F.cross_entropy(logits, labels[idx]).backward()
        return w.grad

    expected = _adamw_by_hand(feats.clone(), grad, lrs)
    assert (expected - feats).abs().max() > 1e-3  # the keys did move
    torch.testing.assert_close(out["weight"], expected, rtol=1e-5, atol=1e-6)
    accs = out["epoch_accs"]
    assert out["best_epoch"] == int(np.argmax(accs)) and out["best_acc"] == max(accs)  # first of the maxima
    assert tip.cls_acc(tip.tip_logits(sel, text, values, alpha, beta, adapter_weight=out["best_weight"]),
                       sel_labels) == out["best_acc"]


def test_run_tip_adapter_f_prints_the_larger_of_selection_and_test_accuracy():
    feats, labels, text = support(n_classes=3, shots=4, seed=7)
    val, val_labels, _ = support(n_classes=3, shots=5, seed=7, spread=1.0, sample_seed=8)
    test, test_labels, _ = support(n_classes=3, shots=7, seed=7, spread=1.0, sample_seed=9)
    out = tip.run_tip_adapter_f(feats.t(), tip.build_cache_values(labels), text, feats, labels, test, test_labels,
                                val, val_labels, test, test_labels, 1.17, 1.0, [7, 3], [20, 5], lr=0.01, epochs=4,
                                generator=torch.Generator().manual_seed(0))
    assert out["printed_acc"] == max(out["best_acc"], out["test_acc"])
    assert out["best_acc"] == max(out["epoch_accs"])  # selected on the split given (the test set, as main.py)
    values = tip.build_cache_values(labels)
    free = tip.run_tip_adapter(feats.t(), values, val, val_labels, test, test_labels, text, 1.17, 1.0, [7, 3], [20, 5])
    betas, alphas = tip.search_grid([7, 3], [20, 5])
    assert free["beta"] in betas and free["alpha"] in alphas  # the test set is scored with the searched pair
    assert free["test_acc"] == tip.cls_acc(tip.tip_logits(test, text, values, free["alpha"], free["beta"],
                                                          cache_keys=feats.t()), test_labels)


def test_tip_files_load_through_the_restricted_unpickler(tmp_path):
    feats, labels, _ = support(seed=11)
    keys, values = feats.t(), tip.build_cache_values(labels)
    best = keys.t() + 0.01
    test_f, test_l = unit(7, 16, seed=12), torch.arange(7) % 3
    paths = tip.write_original_checkpoint(tmp_path, "dtd", 16, keys, values, best, {"test": (test_f, test_l)})
    assert paths["keys"] == tmp_path / "caches" / "dtd" / "keys_16shots.pt"
    assert {p.name for p in (tmp_path / "caches" / "dtd").iterdir()} == {
        "keys_16shots.pt", "values_16shots.pt", "best_F_16shots.pt", "test_f.pt", "test_l.pt"}
    loaded_keys, loaded_values = load_checkpoint(paths["keys"]), load_checkpoint(paths["values"])
    assert loaded_keys.dtype == torch.float16 and loaded_keys.shape == (16, 12)
    torch.testing.assert_close(loaded_keys.float(), keys, rtol=0, atol=1e-3)
    assert torch.equal(loaded_values.float(), values)
    adapter = load_checkpoint(paths["best_F"])
    assert isinstance(adapter, torch.nn.Parameter) and adapter.shape == (12, 16) and not adapter.is_contiguous()
    torch.testing.assert_close(adapter.detach().float(), best, rtol=0, atol=1e-3)
    assert torch.equal(load_checkpoint(paths["test_l"]), test_l)


# -- 2. LP++ ----------------------------------------------------------------------------------------------
def test_lpp_initialisation_and_step_sizes_equal_their_definitions():
    feats, labels, text = support(n_classes=3, shots=4, dim=16, seed=13)
    n = len(labels)
    torch.manual_seed(5)
    reference = torch.nn.Linear(16, 3)
    torch.manual_seed(5)
    head = lpp.init_classifier(feats, labels, shots=4)
    assert torch.equal(head.bias, reference.bias)  # the default random bias, drawn as the original draws it
    assert head.bias.abs().max() <= 1 / math.sqrt(16) and head.bias.abs().min() > 0
    sums = torch.stack([feats[labels == c].sum(0) for c in range(3)])
    torch.testing.assert_close(head.weight, sums)  # class sums, not means
    own = [float((feats[labels == c] @ text[:, c]).mean()) for c in range(3)]
    assert lpp.calculate_init_alpha(feats, labels, 4, text).item() == pytest.approx(250 * np.mean(own), rel=1e-6)
    assert len(set(np.round(own, 4))) == 3  # the own-class cosines differ
    spectral = float(torch.linalg.matrix_norm(feats.double(), ord=2)) ** 2
    assert lpp.calculate_lr_w(feats) == pytest.approx(4 * n / spectral, rel=1e-5)
    col = max(float(((feats @ text[:, c]) ** 2).sum()) for c in range(3))
    assert lpp.calculate_lr_alpha(feats, text).item() == pytest.approx(n / (4 * col), rel=1e-5)


def _lpp_by_hand(feats, labels, text, weight, bias, steps, zero_alpha_grad=False):
    """LP++'s loop with closed-form CE gradients, hand-written momentum SGD, alpha moved every 10 steps by the
    running SUM of its gradients (or, with ``zero_alpha_grad``, by the last 10 steps' only)."""
    n, c = feats.shape[0], weight.shape[0]
    onehot = F.one_hot(labels, c).to(feats.dtype)
    lr_w = lpp.calculate_lr_w(feats)
    lr_a = float(lpp.calculate_lr_alpha(feats, text))
    alpha = torch.full((1, c), float(lpp.calculate_init_alpha(feats, labels, 4, text)))
    buf_w = buf_b = None
    grad_sum = torch.zeros(1, c)
    zs = feats @ text
    for step in range(steps):
        logits = feats @ weight.t() + bias + alpha * zs
        g = (torch.softmax(logits, 1) - onehot) / n  # dCE/dlogits
        gw, gb, ga = g.t() @ feats, g.sum(0), (g * zs).sum(0, keepdim=True)
        buf_w = gw if buf_w is None else 0.9 * buf_w + gw
        buf_b = gb if buf_b is None else 0.9 * buf_b + gb
        weight, bias = weight - lr_w * buf_w, bias - lr_w * buf_b
        grad_sum = grad_sum + ga
        if (step + 1) % 10 == 0:
            alpha = alpha - lr_a * grad_sum
            if zero_alpha_grad:
                grad_sum = torch.zeros(1, c)
    return weight, bias, alpha


def test_lpp_loop_moves_alpha_by_the_never_zeroed_gradient_sum():
    feats, labels, text = support(n_classes=3, shots=4, dim=16, seed=14, spread=1.2)
    val, val_labels, _ = support(n_classes=3, shots=4, dim=16, seed=14, spread=1.2, sample_seed=15)
    torch.manual_seed(1)
    head = lpp.init_classifier(feats, labels, shots=4)
    w0, b0 = head.weight.detach().clone(), head.bias.detach().clone()
    out = lpp.lpp_train(feats, labels, val, val_labels, text, shots=4, epochs=25, classifier=head)
    weight, bias, alpha = _lpp_by_hand(feats, labels, text, w0, b0, 25)
    torch.testing.assert_close(out["weight"], weight, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["bias"], bias, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["alpha"], alpha, rtol=1e-5, atol=1e-5)
    _, _, zeroed = _lpp_by_hand(feats, labels, text, w0, b0, 25, zero_alpha_grad=True)
    assert (zeroed - alpha).abs().max() > 1e-3 * alpha.abs().max()  # the running sum is what moves it
    assert (alpha - out["alpha_init"].float()).abs().max() > 0  # two alpha updates happened (steps 9 and 19)


def test_lpp_selection_lets_the_later_step_win_ties():
    feats, labels, text = support(seed=16)
    out = lpp.lpp_train(feats, labels, feats[:2], torch.full((2,), -1), text, shots=4, epochs=12)
    assert out["best_val_acc"] == 0.0 and out["best_epoch"] == 11  # 0 >= 0 at every step: the last one kept
    weight, bias, alpha = out["best_state"]
    assert torch.equal(weight, out["weight"]) and torch.equal(alpha, out["alpha"])


def test_lpp_runs_on_tiny_model_features(tiny_vit):
    model = tiny_vit.model
    names = ["cat", "dog", "car"]
    feats = tip.pre_load_features(model, images(12, seed=20))
    labels = torch.arange(3).repeat_interleave(4)
    val = tip.pre_load_features(model, images(6, seed=21))
    test = tip.pre_load_features(model, images(9, seed=22))
    text = tip.clip_classifier(model, names, tip.TEMPLATES["oxford_pets"])
    out = lpp.lpp_train(feats, labels, val, torch.arange(3).repeat(2), text, shots=4, epochs=30,
                        test_features=test, test_labels=torch.arange(3).repeat(3))
    assert math.isfinite(out["lr_w"]) and out["lr_w"] > 0 and float(out["lr_alpha"]) > 0
    assert not torch.equal(out["alpha"], out["alpha_init"] * torch.ones_like(out["alpha"]))
    logits = lpp.lpp_logits(test, out["weight"], out["bias"], out["alpha"], text)
    assert logits.std(dim=0).min() > 0 and out["test_acc"] is not None


def test_lpp_tasks_resample_the_same_pool_for_presampled_datasets(tmp_path):
    items = [f"img{i}" for i in range(40)]
    labels = [i % 4 for i in range(40)]
    pool = lpp.generate_fewshot(items, labels, 3, random.Random(1))  # eurosat & co. at construction (seed 1)
    pool_labels = [int(p[3:]) % 4 for p in pool]
    tasks = [lpp.generate_fewshot(pool, pool_labels, 3, random.Random(i + 1)) for i in range(3)]
    assert all(sorted(t) == sorted(pool) for t in tasks)  # the same images every task
    free = [lpp.generate_fewshot(items, labels, 3, random.Random(i + 1)) for i in range(3)]
    assert len({tuple(sorted(t)) for t in free}) == 3  # the datasets sampled from the full split do differ
    paths = lpp.write_original_outputs(tmp_path, "eurosat", 4, [70.0, 72.0, 71.0])
    lpp.write_original_outputs(tmp_path, "eurosat", 8, [75.0, 75.0])
    rows = paths["csv"].read_text().splitlines()
    half = 1.96 * np.std([70.0, 72.0, 71.0]) / math.sqrt(3)
    assert rows[0] == "acc,std,method,num_shots,tasks" and rows[1] == f"71.0,{round(half, 4)},LinearProbe_P2,4,3"
    assert rows[2] == "75.0,0.0,LinearProbe_P2,8,2"


# -- 3. ZS-LP / CLAP --------------------------------------------------------------------------------------
def test_clap_text_features_keep_underscores_and_average_unnormalised(tiny_vit):
    model = tiny_vit.model
    base, every = clap.base_text_features(model, ["golden_retriever", "sword lily"], "OxfordPets")
    with torch.no_grad():
        raw = model.encode_text(tip.tokenize(["a photo of a golden_retriever, a type of pet."]))[0]
        spaced = model.encode_text(tip.tokenize(["a photo of a golden retriever, a type of pet."]))[0]
    torch.testing.assert_close(base[0], raw, rtol=0, atol=1e-5)
    assert (raw - spaced).norm() > 1e-2 * raw.norm()  # the underscore changes the prompt
    base, every = clap.base_text_features(model, NAMES, "ImageNet")
    assert every.shape == (len(NAMES), 8, tiny_vit.embed_dim)
    torch.testing.assert_close(base, every.mean(1))
    ensemble = F.normalize(F.normalize(every, dim=-1).mean(1), dim=-1)
    assert (F.normalize(base, dim=-1) - ensemble).abs().max() > 1e-4  # not the normalised (Tip-style) ensemble
    assert len(clap.templates_for("ImageNet")) == len(clap.templates_for("ImageNet")) == 8


def test_clap_multipliers_and_penalty_equal_their_loops():
    feats, labels, text = support(n_classes=3, shots=6, dim=16, seed=17, spread=1.0)
    base = text.t() * torch.tensor([[2.0], [0.5], [1.3]])  # unnormalised class features
    logits = clap.zs_lp_logits(feats, base, torch.tensor(math.log(100.0)))
    probs = torch.softmax(logits, 1)
    loop = torch.tensor([float(probs[labels == c, c].mean()) for c in range(3)])
    lam = clap.init_lagrangian_multipliers(labels, logits)
    torch.testing.assert_close(lam, loop)
    assert lam.max() - lam.min() > 1e-3 and lam.max() < 1  # class-adaptive
    torch.testing.assert_close(clap.init_lagrangian_multipliers(labels, logits, "l2_corrected"), lam * 3 / lam.sum())
    torch.testing.assert_close(clap.init_lagrangian_multipliers(labels, logits, "l2_constant"),
                               torch.full((3,), float(lam.mean())))
    assert torch.equal(clap.init_lagrangian_multipliers(labels, logits, "l2_balanced"), torch.ones(3))
    protos = (base + 0.3 * unit(3, 16, seed=18)).requires_grad_(True)
    penalty = clap.zero_shot_constraint(protos, base, lam)
    expected = sum(float(lam[c]) * float(((protos[c] - base[c]) ** 2).sum().detach()) for c in range(3)) / 3
    assert penalty.item() == pytest.approx(expected, rel=1e-6)
    penalty.backward()
    torch.testing.assert_close(protos.grad, 2 * lam[:, None] * (protos - base).detach() / 3)


def test_dassl_schedule_equals_torch_cosine_after_one_warmup_epoch():
    param = torch.nn.Parameter(torch.zeros(1))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(torch.optim.SGD([param], lr=0.1), 10.0)
    expected = [1e-5]
    for _ in range(1, 10):  # the successor starts at the warm-up's end and steps after each later epoch
        expected.append(sched.get_last_lr()[0])
        sched.optimizer.step()
        sched.step()
    np.testing.assert_allclose([clap.dassl_lr(e, 0.1, 10) for e in range(10)], expected, rtol=1e-12)
    assert [clap.num_batches(n) for n in (47, 255, 256, 600, 1000)] == [1, 1, 1, 2, 3]


def test_clap_loop_equals_momentum_sgd_written_by_hand():
    feats, labels, text = support(n_classes=3, shots=4, dim=16, seed=19, spread=1.0)
    pool = torch.cat([feats + 0.1 * unit(12, 16, seed=30 + r) for r in range(20)])  # 20 "augmented" passes, raw
    pool_labels = labels.repeat(20)
    base = 3 * text.t()
    scale = torch.tensor(math.log(100.0))
    epochs, n_images = 4, 12
    orders = torch.stack([torch.randperm(240, generator=torch.Generator().manual_seed(40 + e)) for e in range(epochs)])
    out = clap.clap_train(pool, pool_labels, base, scale, n_images, epochs=epochs, lr=0.1, orders=orders)
    assert len(out["losses"]) == epochs  # N = 12 < 256: one step per epoch
    lam = torch.tensor([float(torch.softmax(100 * F.normalize(pool[pool_labels == c], dim=-1)
                                            @ F.normalize(base, dim=-1).t(), 1)[:, c].mean()) for c in range(3)])
    torch.testing.assert_close(out["multipliers"], lam)
    w, buf = base.clone(), None
    for e in range(epochs):
        lr = 1e-5 if e == 0 else 0.1 * (1 + math.cos(math.pi * (e - 1) / epochs)) / 2
        idx = orders[e][:256]
        p = w.clone().requires_grad_(True)
        logits = 100 * F.normalize(pool[idx], dim=-1) @ (p / p.norm(dim=-1, keepdim=True)).t()
        loss = F.cross_entropy(logits, pool_labels[idx]) + (lam * ((p - base) ** 2).sum(-1)).mean()
        loss.backward()
        buf = p.grad if buf is None else 0.9 * buf + p.grad
        w = w - lr * buf
    assert (w - base).abs().max() > 1e-3
    torch.testing.assert_close(out["prototypes"], w, rtol=1e-5, atol=1e-6)
    zs_lp = clap.clap_train(pool, pool_labels, base, scale, n_images, constraint="none", epochs=epochs, orders=orders)
    assert (zs_lp["prototypes"] - out["prototypes"]).abs().max() > 0  # the penalty acts


def test_clap_outer_step_sets_rho_to_the_distances_then_moves_lambda():
    base = unit(3, 8, seed=21)
    protos = base + 0.5 * unit(3, 8, seed=22)
    lam = torch.tensor([0.2, 0.5, 0.9])
    h = ((protos - base) ** 2).sum(-1)
    lam1, rho1 = clap.outer_step(protos, base, lam, torch.zeros(3))
    assert torch.equal(lam1, lam) and torch.equal(rho1, h)  # rho starts at 0: lambda unchanged, rho := h
    lam2, _ = clap.outer_step(protos, base, lam1, rho1)
    torch.testing.assert_close(lam2, torch.clamp(lam + h * h, min=0))
    out = clap.clap_train(protos.repeat(4, 1), torch.arange(3).repeat(4), base, torch.tensor(0.0), 3,
                          constraint="l2_adaptative", epochs=3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out["penalty"] > 0, torch.ones(3, dtype=torch.bool))


def test_clap_runs_on_tiny_model_features(tiny_vit):
    model = tiny_vit.model
    names = ["cat", "dog", "car"]
    views = torch.stack([images(6, seed=50 + r) for r in range(2)])  # 2 passes over 6 support images
    labels = torch.tensor([0, 0, 1, 1, 2, 2]).repeat(2)
    feats = clap.extract_features(model, views)
    assert feats.shape == (12, tiny_vit.embed_dim) and F.normalize(feats, dim=-1).std(0).max() > 1e-3
    base, _ = clap.base_text_features(model, names, "Caltech101")
    logits = clap.zs_lp_logits(feats, base, model.logit_scale)
    assert logits.std(0).min() > 0
    lam = clap.init_lagrangian_multipliers(labels, logits)
    assert ((lam > 0) & (lam < 1)).all() and lam.max() > lam.min()
    out = clap.clap_train(feats, labels, base, model.logit_scale.detach(), 6, epochs=3,
                          generator=torch.Generator().manual_seed(0))
    assert (out["prototypes"] - base).abs().max() > 0


def test_clap_checkpoint_loads_through_the_restricted_unpickler(tmp_path):
    base = unit(3, 16, seed=23) * 2
    protos = base + 0.1
    path = clap.write_original_checkpoint(tmp_path, protos, base, momentum_buffer=torch.full_like(base, 0.5),
                                          config={"DATASET": {"NAME": "DescribableTextures", "NUM_SHOTS": 4},
                                                  "TRAINER": {"ADAPTER": {"INIT": "ZS", "CONSTRAINT": "l2"}}})
    assert path == tmp_path / "adapter" / "model.pth.tar-300"
    assert (tmp_path / "adapter" / "checkpoint").read_text() == "model.pth.tar-300\n"
    ckpt = load_checkpoint(path)
    assert list(ckpt["state_dict"]) == ["prototypes", "base_text_features"] and ckpt["epoch"] == 300
    assert torch.equal(ckpt["state_dict"]["prototypes"], protos)
    assert torch.equal(ckpt["state_dict"]["base_text_features"], base)
    assert torch.equal(ckpt["optimizer"]["state"][0]["momentum_buffer"], torch.full_like(base, 0.5))
    successor = ckpt["scheduler"]["successor"]
    assert isinstance(successor, Placeholder) and successor.global_name.endswith("CosineAnnealingLR")
    assert successor.attrs["T_max"] == 300 and successor.attrs["last_epoch"] == 299
    assert ckpt["scheduler"]["_last_lr"][0] == pytest.approx(clap.dassl_lr(300), rel=1e-9)
    assert "CONSTRAINT: l2" in (tmp_path / "log.txt").read_text()
