"""PLOT: N prompts per class matched to local image features by optimal transport.

Random towers give nearly identical local features, so a transport plan is then uniform and PLOT cannot be told
from plain averaging; every test here runs on a sharpened RN (or checks the quantity it tests actually varies)
and the first test asserts that the plan is clearly non-uniform and PLOT's logits differ from averaging.
"""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import require_shared
from vlprompt.errors import NonFiniteError, VLPromptError
from vlprompt.methods import build_method
from vlprompt.methods.base import Features
from vlprompt.methods.prompts.coop import CoOp, CoOpConfig
from vlprompt.methods.prompts.plot import PLOT, PLOTConfig, transport_similarity
from vlprompt.methods.parts.ot import reference_sinkhorn, sinkhorn_plan

CLASSES = ["banded", "golden retriever", "sword lily", "x", "cat"]


def images(backbone, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = backbone.image_size
    # smooth structure plus noise, so that grid cells differ
    ramp = torch.linspace(-1, 1, s)
    base = torch.stack([ramp[None, :].expand(s, s), ramp[:, None].expand(s, s), (ramp[None, :] * ramp[:, None])])
    return base[None] * torch.randn(n, 3, 1, 1, generator=g) + 0.5 * torch.randn(n, 3, s, s, generator=g)


@pytest.fixture(scope="module")
def rn_feats(sharp_rn):
    return sharp_rn.encode_image(images(sharp_rn), local=True)


def sim_of(method, local):
    """(B, K, M, N) cosines of local features and the method's prompts, float64."""
    text = F.normalize(method.prompt.encode().detach().double(), dim=-1)
    return torch.einsum("bme,nke->bkmn", F.normalize(local.double(), dim=-1), text)


def reference_loop(cost, eps=0.1, iters=100, thresh=1e-2):
    """The reference iteration written plainly, one problem at a time."""
    plans = []
    for c in cost:
        m, n = c.shape
        kmat = torch.exp(-c / eps)
        u, v = torch.full((m,), 1.0 / m, dtype=c.dtype), torch.full((n,), 1.0 / n, dtype=c.dtype)
        r, col = torch.ones_like(u), torch.ones_like(v)
        for _ in range(iters):
            r0 = r
            r = u / (kmat @ col)
            col = v / (kmat.t() @ r)
            if (r - r0).abs().mean().item() < thresh:
                break
        plans.append(r[:, None] * kmat * col[None, :])
    return torch.stack(plans)


# -- first: the quantities under test vary -------------------------------------------------------------
def test_plan_is_not_uniform_and_differs_from_averaging(sharp_rn, rn_feats):
    g, local = rn_feats
    method = PLOT(PLOTConfig(n_ctx=4), sharp_rn, CLASSES)
    logits, plans = method.transport(Features(g, local), return_plans=True)
    b, k, m, n = plans.shape
    assert (b, k, n) == (6, 5, 4) and m >= 4
    uniform = 1.0 / (m * n)
    assert (plans - uniform).abs().max() > 0.15 * uniform  # clearly not uniform
    averaged = method.logit_scale * sim_of(method, local).mean(dim=(-2, -1))
    assert (logits.double() - averaged).abs().max() > 1e-3  # >> every tolerance used below


# -- the transport ----------------------------------------------------------------------------------------
def test_batched_plan_equals_pot_and_the_reference_iteration(sharp_rn, rn_feats):
    import ot

    method = PLOT(PLOTConfig(n_ctx=4), sharp_rn, CLASSES)
    sim = sim_of(method, rn_feats[1])
    b, k, m, n = sim.shape
    sim = sim.reshape(b * k, m, n)
    cost = 1.0 - sim
    ours = sinkhorn_plan(cost)  # defaults: eps 0.1, 100 iterations, thresh 1e-2; float64 in, float64 out
    # a plain loop of the reference iteration, each problem on its own: the same plans
    torch.testing.assert_close(ours, reference_loop(cost), rtol=0, atol=1e-12)
    # the reference's batch-pooled loop: an image's plan depends on its batch-mates, by < 1e-6 on logits (x100)
    pooled = reference_sinkhorn(cost)
    assert (100 * ((ours - pooled) * sim).sum((1, 2))).abs().max() < 1e-6
    # POT's single-problem solver, run to convergence: same plans, and at the defaults the same logits
    a, bm = np.full(m, 1.0 / m), np.full(n, 1.0 / n)
    pot = torch.stack([torch.from_numpy(ot.sinkhorn(a, bm, c.numpy(), 0.1, stopThr=1e-13, numItermax=20000))
                       for c in cost])
    converged = sinkhorn_plan(cost, thresh=0.0, max_iter=5000)
    torch.testing.assert_close(converged, pot, rtol=0, atol=1e-12)
    assert (100 * ((ours - pot) * sim).sum((1, 2))).abs().max() < 1e-6
    # the method's own fp32 logits agree with the reference formula
    ref_logits = method.logit_scale * (reference_loop(cost) * sim).sum((1, 2)).reshape(b, k)
    torch.testing.assert_close(method(Features(*rn_feats)).double(), ref_logits, rtol=0, atol=1e-5)


def test_plan_marginals(sharp_rn, rn_feats):
    g, local = rn_feats
    for marginals in ("uniform", "global_similarity"):
        method = PLOT(PLOTConfig(n_ctx=4, marginals=marginals, ot_thresh=1e-9, ot_iters=2000), sharp_rn, CLASSES)
        _, plans = method.transport(Features(g, local), return_plans=True)
        b, k, m, n = plans.shape
        if marginals == "uniform":
            a = torch.full((b, m), 1.0 / m)
        else:
            a = torch.softmax(torch.einsum("bme,be->bm", F.normalize(local, dim=-1), F.normalize(g, dim=-1)) / 0.1, 1)
            assert (a - 1.0 / m).abs().max() > 0.1 / m  # the option changes the marginals
        torch.testing.assert_close(plans.sum(-1), a[:, None].expand(b, k, m), rtol=0, atol=1e-6)
        torch.testing.assert_close(plans.sum(-2), torch.full((b, k, n), 1.0 / n), rtol=0, atol=1e-6)
    uni = PLOT(PLOTConfig(n_ctx=4), sharp_rn, CLASSES)
    glob = PLOT(PLOTConfig(n_ctx=4, marginals="global_similarity"), sharp_rn, CLASSES)
    assert (uni(Features(g, local)) - glob(Features(g, local))).abs().max() > 1e-3


def test_one_prompt_one_local_feature_equals_coop(sharp_rn, rn_feats):
    g = rn_feats[0]
    coop = CoOp(CoOpConfig(n_ctx=4), sharp_rn, CLASSES)
    plot = PLOT(PLOTConfig(n_ctx=4, n_prompts=1), sharp_rn, CLASSES)
    plot.load_learned_state(coop.learned_state())
    feats = Features(global_=g, local=g[:, None, :])  # the global feature as the only "local" one
    expected = coop(feats)
    assert (expected[:, 0] - expected[:, 1]).abs().max() > 1e-3
    torch.testing.assert_close(plot(feats), expected, rtol=1e-5, atol=1e-5)
    both = PLOT(PLOTConfig(n_ctx=4, n_prompts=1, global_logits=True), sharp_rn, CLASSES)
    both.load_learned_state(coop.learned_state())
    torch.testing.assert_close(both(feats), 2 * expected, rtol=1e-5, atol=1e-5)


def test_class_chunks_and_global_logits(sharp_rn, rn_feats):
    g, local = rn_feats
    method = PLOT(PLOTConfig(n_ctx=4), sharp_rn, CLASSES)
    text = method.prompt.encode().detach()
    whole = transport_similarity(g, local, text)
    torch.testing.assert_close(transport_similarity(g, local, text, class_chunk=2), whole, rtol=0, atol=1e-7)
    glob = PLOT(PLOTConfig(n_ctx=4, global_logits=True), sharp_rn, CLASSES)
    glob.load_learned_state(method.learned_state())
    pooled = F.normalize(text.mean(0), dim=-1)
    extra = method.logit_scale * F.normalize(g, dim=-1) @ pooled.t()
    torch.testing.assert_close(glob(Features(g, local)), method(Features(g, local)) + extra, rtol=1e-5, atol=1e-5)


def test_text_features_are_encoded_once_per_evaluation(sharp_rn, rn_feats):
    from vlprompt.engine.trainer import CachedViews, predict_logits

    method = PLOT(PLOTConfig(n_ctx=4), sharp_rn, CLASSES)
    calls = []
    encode = method.prompt.encode
    method.prompt.encode = lambda *a, **k: calls.append(1) or encode(*a, **k)
    logits = predict_logits(method, CachedViews(rn_feats[0][None], rn_feats[1][None]), 6, batch_size=2)
    assert len(calls) == 1
    method.train()
    torch.testing.assert_close(logits, method(Features(*rn_feats)).detach(), rtol=1e-5, atol=1e-5)
    assert len(calls) == 2  # training recomputes them at every step


def test_detached_and_differentiated_plans_give_the_same_forward(sharp_rn, rn_feats):
    g, local = rn_feats
    labels = torch.arange(6) % len(CLASSES)
    out, grads = [], []
    for grad in (False, True):
        torch.manual_seed(0)
        method = PLOT(PLOTConfig(n_ctx=4, ot_grad=grad), sharp_rn, CLASSES)
        logits = method(Features(g, local))
        F.cross_entropy(logits, labels).backward()
        out.append(logits.detach())
        grads.append(method.prompt.ctx.grad.clone())
    torch.testing.assert_close(out[0], out[1], rtol=0, atol=1e-6)
    assert torch.isfinite(grads[1]).all()
    assert ((grads[0] - grads[1]).norm() / grads[0].norm()) > 1e-4  # the option is not ignored


def test_half_precision_inputs_give_a_finite_plan(sharp_rn, rn_feats):
    g, local = rn_feats
    method = PLOT(PLOTConfig(n_ctx=4), sharp_rn, CLASSES)
    method.eval()
    with torch.no_grad():
        full = method(Features(g, local))
        for dtype in (torch.float16, torch.bfloat16):
            feats = Features(g.to(dtype), local.to(dtype))
            logits, plans = method.transport(feats, return_plans=True)
            assert torch.isfinite(plans).all() and torch.isfinite(logits).all()
            torch.testing.assert_close(logits.float(), full, rtol=0, atol=0.05)
            with torch.autocast("cpu", dtype=dtype):
                auto = method(feats)
            assert torch.isfinite(auto).all()
    # a small eps: exp(-cost/eps) underflows in the reference's non-log loop; the log domain stays finite
    sim = sim_of(method, local).float().reshape(-1, *local.shape[1:2], 4)
    assert not torch.isfinite(reference_sinkhorn(1 - sim, eps=0.002)).all()
    assert torch.isfinite(sinkhorn_plan(1 - sim.half(), eps=0.002)).all()


def test_forced_nonfinite_plan_is_a_clear_error(tmp_path, sharp_rn, rn_feats):
    from vlprompt.engine.trainer import CachedViews, Trainer, TrainConfig

    g, local = rn_feats
    bad = local.clone()
    bad[2, 1] = float("nan")
    method = PLOT(PLOTConfig(n_ctx=4, ot_eps=0.05), sharp_rn, CLASSES)
    trainer = Trainer(method, TrainConfig(epochs=1, batch_size=6, warmup_epochs=0, checkpoint_every=0), tmp_path,
                      seed=1, progress=False)
    with pytest.raises(NonFiniteError, match=r"training step 1 .*eps=0\.05"):
        trainer.fit(CachedViews(g[None], bad[None]), torch.arange(6) % 5)
    with pytest.raises(VLPromptError, match="local image features"):
        method(Features(global_=g))
    with pytest.raises(VLPromptError, match="ot_eps"):
        PLOT(PLOTConfig(ot_eps=0.0), sharp_rn, CLASSES)
    with pytest.raises(VLPromptError, match="marginals"):
        build_method("plot", {"marginals": "softmax"}, sharp_rn, CLASSES)


# -- every variant, both towers ------------------------------------------------------------------------------
def _train_steps(method, feats, steps=3, lr=0.5):
    labels = torch.arange(feats.global_.shape[0]) % method.num_classes
    opt = torch.optim.SGD(method.trainable_parameters(), lr=lr)
    before = method.prompt.ctx.detach().clone()
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(method(feats), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert (method.prompt.ctx - before).abs().max() > 0
    return losses


def test_vit_and_resnet_local_features(tiny_backbone):
    g, local = tiny_backbone.encode_image(images(tiny_backbone, n=4), local=True)
    assert local.shape[1] in (4, 16)  # RN 64 px: 2x2 grid; ViT 32 px / patch 8: 4x4 patches
    method = PLOT(PLOTConfig(n_ctx=4, n_prompts=3), tiny_backbone, CLASSES)
    logits = method(Features(g, local))
    assert logits.shape == (4, 5)
    _train_steps(method, Features(g, local))


@pytest.mark.parametrize("variant", [dict(csc=True), dict(class_position="middle"), dict(class_position="front"),
                                     dict(init="a photo of a"), dict(csc=True, class_position="middle",
                                                                     init="a photo of a")])
def test_coop_variants_run_and_train(sharp_rn, rn_feats, variant):
    method = PLOT(PLOTConfig(n_ctx=4, n_prompts=3, **variant), sharp_rn, CLASSES)
    n_cls_ctx = len(CLASSES) if variant.get("csc") else 1
    assert method.prompt.ctx.shape[:2] == (3, n_cls_ctx)
    # every prompt of every class through the fast path equals the whole sequence through the plain path
    full = method.prompt.full_embeddings()
    plain = torch.stack([sharp_rn.text(full[i], method.prompt.eot, mode="plain") for i in range(3)])
    text = method.prompt.encode()
    torch.testing.assert_close(text, plain, rtol=1e-5, atol=1e-5)
    assert (text[0] - text[1]).abs().max() > 1e-4  # the prompts differ (word init too: it is jittered)
    _train_steps(method, Features(*rn_feats))


# -- runs: training on DTD, another class list, export / predict, the picture ------------------------------
@pytest.fixture(scope="module")
def dtd_run(tmp_path_factory):
    """A PLOT run on DTD's base classes (16 shots, cached features of the test view) trained through the CLI.

    A tiny random RN learns slowly (CoOp too): AdamW and the un-augmented view make 12 epochs enough to get
    below the loss of uniform guessing."""
    from vlprompt.cli import main
    from vlprompt.testing import make_tiny_checkpoint

    root = require_shared("dtd").parent
    tmp = tmp_path_factory.mktemp("plot_dtd")
    cfg, weights = make_tiny_checkpoint(tmp / "m", "tiny-rn", seed=1, sharpen=True)
    args = ["--quiet", "train", "--method", "plot", "--backbone", str(cfg), "--pretrained", str(weights),
            "--dataset", "dtd", "--root", str(root), "--shots", "16", "--classes", "base", "--no-augment",
            "--sampler", "sorted",  # the images these thresholds were measured on (a tiny random tower learns slowly)
            "--epochs", "12", "--batch-size", "16", "--optimizer", "adamw", "--lr", "0.003", "--warmup-epochs", "1",
            "--n-ctx", "4", "--n-prompts", "4", "--ot-eps", "0.1", "--ot-iters", "100", "--ot-thresh", "0.01",
            "--output", str(tmp / "run"), "--cache-dir", str(tmp / "cache")]
    assert main(args) == 0
    return tmp


def test_training_on_dtd_lowers_the_loss(dtd_run):
    hist = [json.loads(line) for line in (dtd_run / "run" / "metrics.jsonl").read_text().splitlines()]
    meta = json.loads((dtd_run / "run" / "method.json").read_text())
    assert meta["method"] == "plot" and meta["config"]["n_prompts"] == 4 and meta["config"]["n_ctx"] == 4
    assert len(hist) == 12
    assert hist[-1]["loss"] < 0.6 * hist[0]["loss"]  # epoch 1 is the warm-up (lr 1e-5): the initial loss
    # below the loss of uniform guessing over the 5 base classes: the prompts tell the classes apart
    assert hist[-1]["loss"] < 0.97 * math.log(5)
    assert hist[-1]["train_accuracy"] > 100 / 5 + 5


def test_saved_run_evaluates_on_another_class_list(dtd_run):
    from vlprompt.runs import DataConfig, evaluate_run

    root = require_shared("dtd").parent
    res = evaluate_run(dtd_run / "run", DataConfig(dataset="dtd", root=str(root), shots=0, classes="new"),
                       split="val", cache_dir=str(dtd_run / "cache"), progress=False)
    assert res["method"] == "plot" and res["metrics"]["num_samples"] == 120
    assert 0 <= res["metrics"]["accuracy"] <= 100


def test_export_predict_round_trip(dtd_run, capsys):
    from vlprompt.cli import main
    from vlprompt.data import build_test_transform, load_image, load_split
    from vlprompt.runs import export_run, load_method, predict_images

    head = export_run(dtd_run / "run", dtd_run / "head")
    info = json.loads((head / "head.json").read_text())
    assert info["kind"] == "plot" and info["method"] == "plot" and info["n_prompts"] == 4
    paths = [s.path for s in load_split(dtd_run / "run" / "split.json").test[::30]]
    method, _, backbone = load_method(dtd_run / "run")
    method.eval()
    tf = build_test_transform(backbone.image_size)
    x = torch.stack([tf(load_image(p)) for p in paths])
    with torch.no_grad():
        g, local = backbone.encode_image(x, local=True)
        expected = method(Features(g, local)).softmax(-1)
    rows = predict_images(head, paths, topk=2)
    for row, p in zip(rows, expected):
        assert row["top"][0]["class"] == method.classnames[int(p.argmax())]
        assert row["top"][0]["probability"] == pytest.approx(float(p.max()), abs=1e-5)
    capsys.readouterr()
    assert main(["predict", str(head), paths[0], "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["top"][0]["class"] == rows[0]["top"][0]["class"]


def test_plot_transport_writes_a_png(dtd_run, capsys):
    from vlprompt.cli import main
    from vlprompt.data import load_split

    image = load_split(dtd_run / "run" / "split.json").test[0].path
    out = dtd_run / "transport.png"
    assert main(["plot-transport", str(dtd_run / "run"), image, "--class", "bubbly", "--output", str(out)]) == 0
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert "class bubbly" in capsys.readouterr().out
    assert main(["plot-transport", str(dtd_run / "run"), image, "--class", "no such class"]) == 2
    assert "not one of the run's 5 classes" in capsys.readouterr().err


def test_cli_options_map_to_the_config(capsys):
    from vlprompt.cli import build_parser, main
    from vlprompt.cli.train import request_from_args
    from vlprompt.runs import resolve

    base = ["train", "--backbone", "x.json", "--dataset", "dtd", "--root", ".", "--output", "o"]
    argv = base + ["--method", "plot", "--n-prompts", "3", "--ot-eps", "0.2", "--ot-iters", "50", "--ot-thresh",
                   "0.001", "--ot-grad", "--global-logits", "--method-option", "marginals=global_similarity"]
    req = request_from_args(build_parser(argv).parse_args(argv))
    assert req["method_options"] == {"n_prompts": 3, "ot_eps": 0.2, "ot_iters": 50, "ot_thresh": 0.001,
                                     "ot_grad": True, "global_logits": True, "marginals": "global_similarity"}
    plain = base + ["--method", "plot"]
    req = request_from_args(build_parser(plain).parse_args(plain))
    assert "method_options" not in req
    cfg = resolve(req)  # the reference's configs/trainers/PLOT/rn50.yaml unless given
    assert (cfg.train.batch_size, cfg.train.epochs) == (128, 50)
    assert main(base + ["--method", "coop", "--ot-eps", "0.2"]) == 2  # not an option of CoOp
    assert "--ot-eps" in capsys.readouterr().err
