"""KgCoOp: the method against its original written out (tests/originals/kgcoop.py, htyao89/KgCoOp) on the same
weights -- logits, the knowledge-guided term, the loss, its gradient and a whole training trajectory with Dassl's SGD
and schedule --, its recipe field by field, the schedule of the maintainer's posted log, a run on DTD through the
command line (train on the base classes, evaluate the new ones, export, predict), the import of an original
checkpoint, and the refusals."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import color_folder
from originals import coop_base
from originals import kgcoop as original
from test_cli_baselines import make_dtd_subset, run_cli
from vlprompt.data import load_dataset
from vlprompt.engine.schedule import lr_at_epoch
from vlprompt.engine.sources import CachedViews
from vlprompt.engine.trainer import TrainConfig, Trainer
from vlprompt.methods import build_method
from vlprompt.methods.base import Batch, Features
from vlprompt.testing import make_tiny_checkpoint

# merging names ("x.", "cup (drinking)"), underscores, spaces
NAMES = ["golden_retriever", "sword lily", "banded", "cup (drinking)", "x."]
DTD_KGCOOP = original.CUSTOM_TEMPLATES["DescribableTextures"]


def feats(n, dim, seed=0):
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))


def _perturb(method, seed=1, scale=0.3):
    """Move the context away from its init (at "a photo of a" the learned and hand-crafted prompts of a CoOp template
    coincide and the term under test would vanish)."""
    with torch.no_grad():
        method.prompt.ctx.add_(torch.randn(method.prompt.ctx.shape, generator=torch.Generator().manual_seed(seed))
                               * scale)


def _original_case(model, method, init: bool, csc: bool):
    """The original's prompt buffers for ``method``'s context (its CTX_INIT path or the random one)."""
    n_ctx = method.prompt.n_ctx
    prefix = original.INIT_TEXT if init else " ".join(["X"] * n_ctx)
    tp, ts, tok = original.prompt_buffers(model, NAMES, prefix, n_ctx)
    ctx = method.prompt.ctx[0] if csc else method.prompt.ctx[0, 0]  # (K, M, D) / (M, D), as the original holds it
    return tp, ts, tok, ctx


@pytest.mark.parametrize("init, csc", [(True, False), (False, False), (False, True)])
def test_logits_term_loss_and_gradient_equal_the_original(tiny_vit, init, csc):
    model = tiny_vit.model
    options = {"templates": [DTD_KGCOOP], "csc": csc}
    if not init:
        options.update(init=None, n_ctx=6)
    method = build_method("kgcoop", options, tiny_vit, NAMES, template="{} texture.")
    assert method.prompt.n_ctx == (4 if init else 6)
    _perturb(method)
    tp, ts, tok, ctx = _original_case(model, method, init, csc)
    anchor = original.anchor_text_features(model, NAMES, "DescribableTextures")
    torch.testing.assert_close(method.handcrafted.features(), anchor, rtol=0, atol=1e-6)
    image, labels = feats(7, tiny_vit.embed_dim, seed=2), torch.tensor([0, 1, 2, 3, 4, 0, 2])

    param = ctx.detach().clone().requires_grad_(True)
    logits, score = original.forward(model, image, original.build_prompts(tp, param, ts), tok, anchor)
    total = original.loss(logits, score, labels, w=8.0)
    grad, = torch.autograd.grad(total, param)
    out = method.training_step(Batch(Features(global_=image), labels))
    ours, = torch.autograd.grad(out.loss, method.prompt.ctx)
    ours = ours[0] if csc else ours[0, 0]

    assert logits.std(dim=1).min() > 0.1 and 1e-3 < score.item() < 1  # the quantities under test vary
    scale = tiny_vit.logit_scale
    torch.testing.assert_close(out.logits, logits, rtol=0, atol=1e-6 * scale)
    torch.testing.assert_close(out.parts["kg"], score.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.loss, total, rtol=1e-6, atol=1e-6)
    assert grad.norm() > 0 and ((ours - grad).norm() / grad.norm()).item() < 1e-5
    # evaluation is CoOp's: the same logits without the term, and the hand-crafted features are not part of them
    method.eval()
    with torch.no_grad():
        torch.testing.assert_close(method(Features(global_=image)), logits.detach(), rtol=0, atol=1e-6 * scale)


def test_training_trajectory_equals_the_originals_loop(tiny_vit, tmp_path):
    """5 epochs through vlprompt's trainer (full batches: Dassl's loader gives one batch when the shots are fewer than
    the batch size) = the original's steps (reference_step: zero_grad, backward of CE + W * score, Dassl's SGD) with
    Dassl's warm-up + cosine stepped after each epoch."""
    model = tiny_vit.model
    epochs, lr = 5, 0.5
    method = build_method("kgcoop", {"templates": [DTD_KGCOOP]}, tiny_vit, NAMES)
    _perturb(method, seed=3, scale=0.1)
    image, labels = feats(10, tiny_vit.embed_dim, seed=4), torch.arange(10) % len(NAMES)
    tp, ts, tok, ctx = _original_case(model, method, True, False)
    start = ctx.detach().clone()
    anchor = original.anchor_text_features(model, NAMES, "DescribableTextures")
    param = torch.nn.Parameter(start.clone())
    optimizer = coop_base.dassl_optimizer([param], "sgd", lr)
    scheduler = coop_base.dassl_scheduler(optimizer, epochs)
    seen = []
    for _ in range(epochs):
        seen.append(original.reference_step(model, param, tp, ts, tok, anchor, image, labels, optimizer)["score"])
        scheduler.step()

    cfg = TrainConfig(epochs=epochs, batch_size=16, lr=lr, warmup_epochs=1, warmup_lr=1e-5, checkpoint_every=0)
    trainer = Trainer(method, cfg, tmp_path, seed=1, progress=False)
    trainer.fit(CachedViews(image[None]), labels)
    assert (param.detach() - start).abs().max() > 1e-2  # the steps moved the context
    torch.testing.assert_close(method.prompt.ctx[0, 0].detach(), param.detach(), rtol=1e-5, atol=1e-6)
    logged = [r["loss_kg"] for r in trainer.state.history]
    torch.testing.assert_close(torch.tensor(logged), torch.stack(seen), rtol=1e-5, atol=1e-7)


def test_the_maintainers_log_schedule_is_the_squared_cosine():
    """htyao89/KgCoOp issue #2: the rates its log prints after epochs 91-100 (the next epoch's rate) are
    ``--scheduler cosine_squared``'s; the released code (the default, ``cosine``) prints others."""
    for display in range(91, 101):
        printed = original.issue2_printed_lr(display)
        assert math.isclose(lr_at_epoch(display, base_lr=0.002, epochs=100, scheduler="cosine_squared"), printed,
                            rel_tol=1e-12)
        assert math.isclose(lr_at_epoch(display, base_lr=0.002, epochs=100), original.released_epoch_lr(display),
                            rel_tol=1e-12)
    assert lr_at_epoch(0, base_lr=0.002, epochs=100, scheduler="cosine_squared") == 1e-5  # the warm-up epoch
    assert lr_at_epoch(91, base_lr=0.002, epochs=100) / lr_at_epoch(91, base_lr=0.002, epochs=100,
                                                                     scheduler="cosine_squared") > 40


def test_preset_is_the_originals_recipe_field_by_field():
    from vlprompt.runs import resolve

    rec = original.RECIPE  # configs/trainers/KgCoOp/vit_b16_ep100_ctxv1.yaml + scripts/base2new_train.sh
    for dataset, dassl in (("dtd", "DescribableTextures"), ("eurosat", "EuroSAT"), ("imagenet", "ImageNet")):
        for shots, classes in ((16, "base"), (4, "all")):  # base2new_train.sh; xd_train.sh: the same recipe
            cfg = resolve({"method": "kgcoop", "data": {"dataset": dataset, "root": "/data", "shots": shots,
                                                        "classes": classes}})
            t, o = cfg.train, cfg.method_options
            assert (t.optimizer, t.lr, t.momentum, t.weight_decay) == (rec["optimizer"], rec["lr"], rec["momentum"],
                                                                      rec["weight_decay"])
            assert (t.epochs, t.batch_size, t.scheduler) == (rec["max_epoch"], rec["batch_size"], "cosine")
            assert (t.warmup_epochs, t.warmup_lr) == (rec["warmup_epoch"], rec["warmup_lr"])
            assert o["init"] == original.INIT_TEXT and o["kg_weight"] == rec["w"] and o["csc"] is rec["csc"]
            assert o["class_position"] == rec["class_token_position"] and o["n_ctx"] is None  # 4: the init's length
            assert o["templates"] == ["dataset"]  # the same option on every dataset: one recipe to average


def test_anchor_templates_are_kgcoops_own_on_every_dataset(tiny_vit):
    """``--templates dataset`` on each dataset, as a run builds the method (with the dataset's own CoOp prompt), is
    KgCoOp's table (kgcoop.py:37-54): CoOp's except DTD's; an explicit template stays."""
    from vlprompt.data.registry import ALIASES
    from vlprompt.data.templates import template_for

    for dassl, expected in original.CUSTOM_TEMPLATES.items():
        method = build_method("kgcoop", {}, tiny_vit, ["cat"], template=template_for(ALIASES[dassl]))
        assert method.handcrafted.templates == [expected] and method.template_request == ["dataset"], dassl
    method = build_method("kgcoop", {"templates": ["{} texture."]}, tiny_vit, ["cat"], template="{} texture.")
    assert method.handcrafted.templates == ["{} texture."]


@pytest.fixture(scope="module")
def dtd_files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kgcoop_dtd")
    cfg, weights = make_tiny_checkpoint(tmp / "m", "tiny-vit", seed=2, sharpen=True)
    subset = make_dtd_subset(tmp, {"train": 8, "val": 4, "test": 6})
    common = ["--backbone", str(cfg), "--pretrained", str(weights), "--dataset", "dtd", "--root", subset["root"],
              "--dataset-option", f"split_file={subset['split_file']}", "--cache-dir", str(tmp / "cache"),
              "--quiet"]
    return tmp, common


def test_dtd_run_trains_evaluates_new_classes_exports_and_predicts(dtd_files, capsys):
    tmp, common = dtd_files
    out = tmp / "run"
    rc, stdout, err = run_cli(["train", "--method", "kgcoop", *common, "--shots", "8", "--classes", "base",
                               "--epochs", "6", "--batch-size", "16", "--lr", "0.01", "--views", "2",
                               "--output", str(out)], capsys)
    assert rc == 0, err
    results = json.loads(stdout)
    hist = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(hist) == 6 and all({"loss_ce", "loss_kg"} <= set(r) for r in hist)  # the named terms, per epoch
    assert hist[-1]["loss"] < 0.8 * hist[0]["loss"]
    meta = json.loads((out / "method.json").read_text())
    # epoch 1 runs at the warm-up rate: its term is the distance of "a photo of a {c}." to KgCoOp's DTD prompt
    from vlprompt.runs import load_method

    _, _, backbone = load_method(out)
    names = meta["classnames"]
    learned = backbone.encode_text([f"a photo of a {c}." for c in names], normalize=True)
    anchors = backbone.encode_text([DTD_KGCOOP.format(c) for c in names], normalize=True)
    distance = 1 - (learned * anchors).sum(-1).mean().item()
    assert distance > 1e-3 and hist[0]["loss_kg"] == pytest.approx(distance, rel=1e-3)
    assert meta["config"]["templates"] == [DTD_KGCOOP] and meta["config"]["n_ctx"] == 4
    assert results["method_info"]["templates"] == [DTD_KGCOOP]
    # the context is class-agnostic: base-to-new
    rc, stdout, err = run_cli(["eval", str(out), "--base-to-new", *common[4:]], capsys)
    assert rc == 0, err
    b2n = json.loads(stdout)
    assert b2n["harmonic_mean"] == pytest.approx(2 * b2n["base"] * b2n["new"] / (b2n["base"] + b2n["new"]))
    rc, _, err = run_cli(["export", str(out), "--output", str(tmp / "head"), "--quiet"], capsys)
    assert rc == 0, err
    assert json.loads((tmp / "head" / "head.json").read_text())["kind"] == "linear"
    from vlprompt.data import load_split

    path = load_split(out / "split.json").test[0].path
    rc, stdout, err = run_cli(["predict", str(tmp / "head"), path, "--json", "--quiet"], capsys)
    assert rc == 0, err
    assert json.loads(stdout)[0]["top"][0]["class"] in meta["classnames"]


def test_class_specific_context_refuses_another_class_list(dtd_files, capsys):
    tmp, common = dtd_files
    out = tmp / "csc"
    rc, _, err = run_cli(["train", "--method", "kgcoop", *common, "--shots", "2", "--classes", "base", "--csc",
                          "--init", "none", "--n-ctx", "4", "--epochs", "1", "--output", str(out)], capsys)
    assert rc == 0, err
    rc, _, err = run_cli(["eval", str(out), "--classes", "new", *common[4:]], capsys)
    assert rc == 2 and "class-specific" in err and err.strip().count("\n") == 0


@pytest.mark.parametrize("flags, message", [
    (["--kg-weight", "0"], "kg_weight (--kg-weight) must be > 0"),
    (["--kg-weight", "-1"], "kg_weight (--kg-weight) must be > 0"),
    (["--templates", "imagenet81"], "unknown prompt template set 'imagenet81'"),
    (["--templates", "a photo of {} and {}."], "exactly one '{}'"),
    (["--class-position", "top"], "argument --class-position: invalid choice: 'top'"),
    (["--n-ctx", "16"], "n_ctx (--n-ctx) = 16 but init (--init) 'a photo of a' is 4 tokens"),
    (["--init-placement", "end"], "give --n-ctx 4 or more"),
    (["--init", "none", "--init-placement", "end"], "init_placement (--init-placement) = end places the words"),
    (["--init", "none", "--init-length", "words"], "init_length (--init-length) = words counts the words"),
    (["--scheduler", "cosine2"], "argument --scheduler: invalid choice: 'cosine2'"),
])
def test_bad_option_values_are_one_clear_line(dtd_files, tmp_path, capsys, flags, message):
    _, common = dtd_files
    rc, _, err = run_cli(["train", "--method", "kgcoop", *common, "--shots", "2", *flags,
                          "--output", str(tmp_path / "out")], capsys)
    assert rc == 2 and message in err, err
    assert err.strip().count("\n") == 0 and not (tmp_path / "out").exists()


# -- import of an original run ---------------------------------------------------------------------------------
def _kgcoop_log(run_dir, *, ctx_init=True, w=8.0, csc=False, n_ctx=4, shots=2, dataset="DescribableTextures"):
    cfg = {"DATASET": {"NAME": dataset, "NUM_SHOTS": shots, "SUBSAMPLE_CLASSES": "all"}, "SEED": 2,
           "DATALOADER": {"TRAIN_X": {"BATCH_SIZE": 128}},
           "OPTIM": {"NAME": "sgd", "LR": 0.002, "MAX_EPOCH": 100, "WARMUP_EPOCH": 1, "WARMUP_CONS_LR": 1e-5},
           "TRAINER": {"NAME": "KgCoOp", "COOP": {"N_CTX": n_ctx, "CSC": csc, "CTX_INIT": ctx_init, "W": w,
                                                  "CLASS_TOKEN_POSITION": "middle", "PREC": "fp16"}}}
    coop_base.write_dassl_log(run_dir, {"trainer": "KgCoOp", "seed": 2}, cfg)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return color_folder(tmp_path_factory.mktemp("kg_import") / "things", per_class=8, size=(36, 40))


@pytest.mark.parametrize("case", ["init", "random-csc", "no-log"])
def test_original_checkpoint_imports_and_equals_the_original(tiny_vit, folder, tmp_path, capsys, case):
    from vlprompt.runs import load_method

    model, files = tiny_vit.model, make_tiny_checkpoint(tmp_path / "m", "tiny-vit")
    classnames = load_dataset("folder", str(folder)).classnames
    g = torch.Generator().manual_seed(7)
    if case == "random-csc":
        ctx, prefix = original.init_context(model, len(classnames), ctx_init=False, n_ctx=6, csc=True, generator=g)
    else:
        ctx, prefix = original.init_context(model, len(classnames))
    ctx = ctx + 0.3 * torch.randn(ctx.shape, generator=g)  # a trained context
    tp, ts, tok = original.prompt_buffers(model, classnames, prefix, ctx.shape[-2])
    run = tmp_path / "original"
    path = original.write_original_checkpoint(run, {"ctx": ctx, "token_prefix": tp, "token_suffix": ts}, 100,
                                              generator=g)
    if case != "no-log":
        _kgcoop_log(run, ctx_init=case == "init", csc=case == "random-csc", n_ctx=ctx.shape[-2])
    cfg, weights = files
    extra = ["--shots", "2"] if case == "no-log" else []
    rc, stdout, err = run_cli(["import", str(run), "--from", "kgcoop", "--backbone", str(cfg), "--pretrained",
                               str(weights), "--dataset", "folder", "--root", str(folder), "--cache-dir",
                               str(tmp_path / "cache"), "--output", str(tmp_path / "out"), "--quiet", *extra], capsys)
    assert rc == 0, err
    results = json.loads(stdout)
    assert results["imported_from"]["path"] == str(path.resolve())
    method, meta, _ = load_method(tmp_path / "out", backbone=tiny_vit)
    conf = meta["config"]
    # the original ignores CLASS_TOKEN_POSITION ("middle" in the log) and any CTX_INIT string
    assert conf["class_position"] == "end" and conf["csc"] is (case == "random-csc")
    assert conf["init"] == (None if case == "random-csc" else "a photo of a")
    if case != "no-log":
        assert results["config"]["train"]["epochs"] == 100 and results["config"]["train"]["batch_size"] == 128
    method.eval()
    image = feats(5, tiny_vit.embed_dim, seed=8)
    saved = ctx.half().float()  # PREC fp16: the file holds fp16
    expected = coop_base.cosine_logits(model, image, coop_base.text_encoder(
        model, original.build_prompts(tp, saved, ts), tok))
    with torch.no_grad():
        got = method(Features(global_=image))
    assert expected.std(dim=1).min() > 0.1
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6 * tiny_vit.logit_scale)


def test_import_refuses_another_trainer_and_another_class_order(tiny_vit, folder, tmp_path, capsys):
    model = tiny_vit.model
    cfg, weights = make_tiny_checkpoint(tmp_path / "m", "tiny-vit")
    classnames = load_dataset("folder", str(folder)).classnames
    ctx, prefix = original.init_context(model, len(classnames))
    tp, ts, _ = original.prompt_buffers(model, classnames[::-1], prefix, 4)  # another class order
    run = tmp_path / "original"
    original.write_original_checkpoint(run, {"ctx": ctx, "token_prefix": tp, "token_suffix": ts}, 100)
    _kgcoop_log(run)
    common = ["--backbone", str(cfg), "--pretrained", str(weights), "--dataset", "folder", "--root", str(folder),
              "--cache-dir", str(tmp_path / "cache"), "--quiet"]
    rc, _, err = run_cli(["import", str(run), "--from", "kgcoop", *common, "--output", str(tmp_path / "o1")], capsys)
    assert rc == 2 and "another class list or order" in err and err.strip().count("\n") == 0
    rc, _, err = run_cli(["import", str(run), "--from", "prograd", *common, "--output", str(tmp_path / "o2")], capsys)
    assert rc == 2 and "the run's trainer is KgCoOp" in err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_config_alone_is_validated_and_the_python_api_builds_it(tiny_vit):
    from vlprompt.errors import ConfigError
    from vlprompt.methods.prompts.kgcoop import KgCoOpConfig

    with pytest.raises(ConfigError, match="kg_weight"):
        KgCoOpConfig(kg_weight=0.0)
    method = build_method("kgcoop", {}, tiny_vit, ["cat", "dog"])
    assert set(method.learned_state()) == {"prompt.ctx"}  # the hand-crafted features are not learned state
    assert method.learned_tensor("prompt.ctx").shape == (1, 1, 4, tiny_vit.text.width)
    method.set_classnames(["cat", "dog", "bird"])  # class-agnostic
    assert method.handcrafted.features().shape == (3, tiny_vit.embed_dim)
    assert F.cosine_similarity(method.prompt.encode()[0], method.handcrafted.features()).min() > 1 - 1e-5


def test_a_resumed_run_continues_bit_for_bit(tiny_vit, tmp_path):
    """Stopped after 2 of 4 epochs and resumed on a freshly built method (the hand-crafted features encoded again):
    the same context as the uninterrupted run, to the bit."""
    views = feats(12, tiny_vit.embed_dim, seed=11).reshape(2, 6, -1)
    labels = torch.arange(6) % len(NAMES)
    common = dict(epochs=4, batch_size=3, lr=0.3, warmup_epochs=1, checkpoint_every=1)
    runs = {}
    for name, stop in (("full", 0), ("part", 4)):
        method = build_method("kgcoop", {"templates": [DTD_KGCOOP]}, tiny_vit, NAMES)
        Trainer(method, TrainConfig(**common, max_steps=stop), tmp_path / name, seed=5,
                progress=False).fit(CachedViews(views), labels)
        runs[name] = method
    assert not torch.equal(runs["part"].prompt.ctx, runs["full"].prompt.ctx)
    resumed = build_method("kgcoop", {"templates": [DTD_KGCOOP]}, tiny_vit, NAMES)
    trainer = Trainer(resumed, TrainConfig(**common), tmp_path / "part", seed=5, progress=False)
    assert trainer.resume() and trainer.state.epoch == 2
    trainer.fit(CachedViews(views), labels)
    assert torch.equal(resumed.prompt.ctx, runs["full"].prompt.ctx)
