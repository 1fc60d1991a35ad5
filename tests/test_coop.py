"""CoOp and CoCoOp: prompt layouts, equivalences with zero-shot and with the reference computations, the
engine's input modes, resumable runs and learning on real data."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import require_shared
from vlprompt.engine.trainer import CachedViews, OnlineImages, Trainer, TrainConfig
from vlprompt.methods import build_method
from vlprompt.methods.base import Features
from vlprompt.methods.prompts.coop import CoOp, CoOpConfig

CLASSES = ["banded", "golden retriever", "sword lily", "x"]


def make_folder_dataset(root: Path, classes=CLASSES, per_split=(6, 4, 3), size=40, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    for ci, name in enumerate(classes):
        base = rng.integers(0, 255, size=3)
        for split, n in zip(("train", "val", "test"), per_split):
            d = root / split / name.replace(" ", "_")
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                arr = np.clip(base + rng.normal(0, 40, size=(size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(arr).save(d / f"{i}.png")
    return root


def features(n, dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g)


# -- layouts ---------------------------------------------------------------------------------------
def test_word_init_after_zero_epochs_equals_zero_shot(tiny_backbone):
    coop = CoOp(CoOpConfig(init="a photo of a"), tiny_backbone, CLASSES)
    assert coop.prompt.n_ctx == 4
    image = features(5, tiny_backbone.embed_dim)
    text = tiny_backbone.encode_text([f"a photo of a {c}." for c in CLASSES])
    expected = tiny_backbone.logit_scale * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).t()
    coop.eval()
    with torch.no_grad():
        got = coop(Features(global_=image))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (got.argmax(1) == expected.argmax(1)).all()


@pytest.mark.parametrize("position", ["end", "middle", "front"])
def test_token_layout(tiny_vit, position):
    """The sequence the text tower sees, against the embeddings of real tokens placed by hand."""
    te = tiny_vit.text
    coop = CoOp(CoOpConfig(n_ctx=4, class_position=position), tiny_vit, CLASSES)
    seq = coop.prompt.full_embeddings()[0]  # (K, 77, D)
    ctx = coop.prompt.ctx[0, 0].detach()
    for k, name in enumerate(CLASSES):
        tokens = te.tokenize([f"{name}."])[0]
        n_name = int(te.eot_positions(tokens[None])[0]) - 2  # without <sot> and "."
        emb = te.embed(tokens[None])[0]
        sot, name_emb, rest = emb[0], emb[1:1 + n_name], emb[1 + n_name:]  # rest: ".", <eot>, padding
        if position == "end":
            parts = [ctx, name_emb]
        elif position == "middle":
            parts = [ctx[:2], name_emb, ctx[2:]]
        else:
            parts = [name_emb, ctx]
        expected = torch.cat([sot[None], *parts, rest])[:77]
        torch.testing.assert_close(seq[k], expected)
        assert int(coop.prompt.eot[k]) == 1 + 4 + n_name + 1


@pytest.mark.parametrize("position", ["end", "middle", "front"])
@pytest.mark.parametrize("csc", [False, True])
def test_every_variant_matches_plain_path_and_trains(tiny_vit, position, csc):
    coop = CoOp(CoOpConfig(n_ctx=4, csc=csc, class_position=position), tiny_vit, CLASSES)
    assert coop.prompt.ctx.shape == (1, len(CLASSES) if csc else 1, 4, tiny_vit.text.width)
    fast = coop.prompt.encode()
    prefix, suffix, eot = coop.prompt.prompt_embeddings()
    plain = tiny_vit.text.encode_prompts(prefix, suffix, eot, mode="plain")
    full = coop.prompt.full_embeddings()[0]
    reference = tiny_vit.text(full, eot, mode="plain")  # the whole sequence as the reference builds it
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast[0], reference, rtol=1e-5, atol=1e-5)
    image = features(8, tiny_vit.embed_dim)
    labels = torch.arange(8) % len(CLASSES)
    opt = torch.optim.SGD(coop.trainable_parameters(), lr=0.5)
    before = coop.prompt.ctx.detach().clone()
    loss = F.cross_entropy(coop(Features(global_=image)), labels)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert (coop.prompt.ctx - before).abs().max() > 0


def test_csc_with_word_init(tiny_vit):
    """The reference silently drops CSC with word init; here each class gets its own copy of the words."""
    coop = CoOp(CoOpConfig(csc=True, init="a photo of a"), tiny_vit, CLASSES)
    te = tiny_vit.text
    words = te.embed(te.tokenize(["a photo of a"]))[0, 1:5]
    assert coop.prompt.ctx.shape == (1, len(CLASSES), 4, te.width)
    for k in range(len(CLASSES)):
        torch.testing.assert_close(coop.prompt.ctx[0, k], words)
    assert coop.prompt.ctx.requires_grad


def test_context_is_portable_across_class_lists(tiny_vit):
    coop = CoOp(CoOpConfig(n_ctx=4), tiny_vit, CLASSES)
    state = coop.learned_state()
    assert set(state) == {"prompt.ctx"}  # no class-dependent tensor is saved
    other = CoOp(CoOpConfig(n_ctx=4), tiny_vit, ["cat", "dog"])
    other.load_learned_state(state)
    other.set_classnames(["cat", "dog", "bird"])
    assert other.prompt.encode().shape == (1, 3, tiny_vit.embed_dim)
    csc = CoOp(CoOpConfig(n_ctx=4, csc=True), tiny_vit, CLASSES)
    with pytest.raises(Exception, match="class-specific"):
        csc.set_classnames(["cat", "dog"])


# -- CoCoOp ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("memory_mb", [None, 1e-3])  # the batch in one text-tower call / in checkpointed chunks
@pytest.mark.parametrize("position", ["end", "middle"])
def test_cocoop_batched_equals_per_image_loop(tiny_backbone, position, memory_mb):
    method = build_method("cocoop", {"class_position": position, "text_memory_mb": memory_mb}, tiny_backbone,
                          CLASSES)
    # the default budget takes the whole batch at once (nothing recomputed); 1 kB forces one prompt per chunk
    assert method.text_chunk(7, grad=True) == (None if memory_mb is None else 1)
    with torch.no_grad():  # a non-trivial meta-net output
        for p in method.meta_net.parameters():
            p.normal_(0, 0.3)
    image = features(7, tiny_backbone.embed_dim, seed=3)
    batched = method(Features(global_=image))
    reference = method.forward_per_image(Features(global_=image))
    assert (reference[0] - reference[1]).abs().max() > 1e-4  # image-conditioned prompts differ
    torch.testing.assert_close(batched, reference, rtol=1e-5, atol=1e-5)
    # gradients to the meta-network and the context match too
    grads = []
    for fn in (method.forward, method.forward_per_image):
        method.zero_grad()
        F.cross_entropy(fn(Features(global_=image)), torch.arange(7) % 4).backward()
        grads.append(torch.cat([p.grad.flatten() for p in method.trainable_parameters()]))
    assert ((grads[0] - grads[1]).norm() / grads[1].norm()) < 1e-5


def test_cocoop_says_once_when_its_batch_is_recomputed(tiny_backbone, caplog):
    """Chunks recomputed in backward only where the memory budget forces it, and the log says so once."""
    image = Features(global_=features(6, tiny_backbone.embed_dim, seed=4))
    whole = build_method("cocoop", {}, tiny_backbone, CLASSES)
    with caplog.at_level("WARNING", logger="vlprompt"):
        F.cross_entropy(whole(image), torch.arange(6) % 4).backward()
    assert not [r for r in caplog.records if "recomputed in backward" in r.getMessage()]
    tight = build_method("cocoop", {"text_memory_mb": 1e-3}, tiny_backbone, CLASSES)
    with caplog.at_level("WARNING", logger="vlprompt"):
        for _ in range(2):
            F.cross_entropy(tight(image), torch.arange(6) % 4).backward()
        with torch.no_grad():
            tight(image)
    said = [r.getMessage() for r in caplog.records if "recomputed in backward" in r.getMessage()]
    assert len(said) == 1 and "the 24 image-conditioned prompts of a batch of 6" in said[0], said


# -- engine ----------------------------------------------------------------------------------------
def test_cached_views_follow_online_mode(tmp_path, tiny_vit):
    """With one view and no augmentation, cached features give the online mode's loss trajectory."""
    from vlprompt.backbone.cache import FeatureCache
    from vlprompt.data import ImageDataset, build_test_transform, load_dataset, transform_id

    splits = load_dataset("folder", make_folder_dataset(tmp_path / "data"))
    tf = build_test_transform(tiny_vit.image_size)
    labels = torch.tensor([s.label for s in splits.train])
    losses = {}
    for mode in ("cached", "online"):
        torch.manual_seed(0)
        method = CoOp(CoOpConfig(n_ctx=4), tiny_vit, splits.classnames)
        cfg = TrainConfig(epochs=3, batch_size=8, lr=0.05, warmup_epochs=0, checkpoint_every=0)
        if mode == "cached":
            f = FeatureCache(tmp_path / "cache", progress=False).get(
                tiny_vit, [s.path for s in splits.train], tf, transform_id=transform_id(tf))
            source = CachedViews(f.global_[None])
        else:
            source = OnlineImages(ImageDataset(splits.train, tf), tiny_vit, local=False, encode=True)
        trainer = Trainer(method, cfg, tmp_path / mode, seed=3, progress=False)
        trainer.fit(source, labels)
        losses[mode] = [r["loss"] for r in trainer.state.history]
    assert len(losses["cached"]) == 3 and losses["cached"][0] != losses["cached"][-1]
    np.testing.assert_allclose(losses["cached"], losses["online"], rtol=1e-5, atol=1e-6)


def test_lr_schedule_matches_dassl_warmup_cosine():
    from vlprompt.engine.schedule import lr_at_epoch
    from vlprompt.methods.parts.recipes import coop_epochs

    lrs = [lr_at_epoch(e, base_lr=0.002, epochs=10) for e in range(10)]
    assert lrs[0] == 1e-5 and lrs[1] == pytest.approx(0.002)
    assert lrs[2] == pytest.approx(0.001 * (1 + np.cos(np.pi / 10)))
    assert all(a > b for a, b in zip(lrs[1:], lrs[2:]))
    assert [coop_epochs(k, "dtd") for k in (1, 2, 4, 8, 16)] == [50, 100, 100, 200, 200]
    assert coop_epochs(16, "imagenet") == 50


def test_nonfinite_loss_is_a_clear_error(tmp_path, tiny_vit):
    from vlprompt.errors import NonFiniteError

    method = CoOp(CoOpConfig(n_ctx=4), tiny_vit, CLASSES)
    bad = features(8, tiny_vit.embed_dim)
    bad[3] = float("nan")
    cfg = TrainConfig(epochs=1, batch_size=8, warmup_epochs=0, checkpoint_every=0)
    trainer = Trainer(method, cfg, tmp_path, seed=1, progress=False)
    with pytest.raises(NonFiniteError, match="epoch 1, step 1"):
        trainer.fit(CachedViews(bad[None]), torch.arange(8) % 4)
    skip = Trainer(method, TrainConfig(epochs=1, batch_size=8, warmup_epochs=0, checkpoint_every=0,
                                       nonfinite="skip"), tmp_path, seed=1, progress=False)
    skip.fit(CachedViews(bad[None]), torch.arange(8) % 4)
    assert skip.state.skipped_steps == 1 and skip.state.step == 0


# -- runs that survive -------------------------------------------------------------------------------
def _cli(args, **kw):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONHASHSEED="0", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "vlprompt", "--quiet", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    from vlprompt.testing import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("m"), "tiny-vit", sharpen=True)


def train_args(tiny_files, data, out, cache, epochs=6, extra=()):
    cfg, weights = tiny_files
    return ["train", "--method", "coop", "--backbone", str(cfg), "--pretrained", str(weights), "--dataset", "folder",
            "--root", str(data), "--shots", "4", "--epochs", str(epochs), "--batch-size", "4", "--views", "2",
            "--n-ctx", "4", "--lr", "0.01", "--output", str(out), "--cache-dir", str(cache), *extra]


def test_resume_after_sigkill_equals_uninterrupted_run(tmp_path, tiny_files):
    data = make_folder_dataset(tmp_path / "data", per_split=(8, 4, 3))
    cache = tmp_path / "cache"
    full = _cli(train_args(tiny_files, data, tmp_path / "full", cache, epochs=8))
    out, err = full.communicate(timeout=300)
    assert full.returncode == 0, err
    # the same run, killed with SIGKILL once a checkpoint exists, in the middle of a later epoch
    victim = _cli(train_args(tiny_files, data, tmp_path / "killed", cache, epochs=8))
    pointer = tmp_path / "killed" / "checkpoints" / "latest.json"
    deadline = time.time() + 240
    while time.time() < deadline and victim.poll() is None:
        if pointer.exists() and json.loads(pointer.read_text())["epoch"] >= 2:
            break
        time.sleep(0.02)
    assert victim.poll() is None, "the run finished before it could be killed"
    time.sleep(0.15)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (tmp_path / "killed" / "results.json").exists()
    # without --resume the unfinished run is refused; with it, it finishes
    refused = _cli(train_args(tiny_files, data, tmp_path / "killed", cache, epochs=8))
    _, err = refused.communicate(timeout=120)
    assert refused.returncode == 2 and "--resume" in err
    resumed = _cli(train_args(tiny_files, data, tmp_path / "killed", cache, epochs=8, extra=["--resume"]))
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    a = json.loads((tmp_path / "full" / "results.json").read_text())
    b = json.loads((tmp_path / "killed" / "results.json").read_text())
    assert a["metrics"] == b["metrics"]
    assert a["train"]["final_loss"] == b["train"]["final_loss"]
    from safetensors.torch import load_file
    assert torch.equal(load_file(str(tmp_path / "full" / "prompt.safetensors"))["prompt.ctx"],
                       load_file(str(tmp_path / "killed" / "prompt.safetensors"))["prompt.ctx"])
    # a finished run is not retrained
    again = _cli(train_args(tiny_files, data, tmp_path / "full", cache, epochs=8))
    out, err = again.communicate(timeout=120)
    assert again.returncode == 0 and json.loads(out)["metrics"] == a["metrics"]


def test_corrupted_last_checkpoint_falls_back_to_the_previous_one(tmp_path, tiny_vit, caplog):
    from vlprompt.engine.checkpoint import latest_checkpoint
    from vlprompt.errors import CheckpointError

    method = CoOp(CoOpConfig(n_ctx=4), tiny_vit, CLASSES)
    cfg = TrainConfig(epochs=2, batch_size=4, warmup_epochs=0)
    Trainer(method, cfg, tmp_path, seed=1, progress=False).fit(CachedViews(features(8, 64)[None]), torch.arange(8) % 4)
    ckpt = latest_checkpoint(tmp_path)
    blob = bytearray((ckpt / "learned.safetensors").read_bytes())
    blob[-3] ^= 0xFF
    (ckpt / "learned.safetensors").write_bytes(bytes(blob))
    trainer = Trainer(method, cfg, tmp_path, seed=1, progress=False)
    assert trainer.resume() and trainer.state.epoch == 1  # the newest intact checkpoint, said in the log
    assert any("epoch-0002" in r.getMessage() for r in caplog.records)
    for d in (tmp_path / "checkpoints").glob("epoch-*"):
        (d / "meta.json").write_text("{")
    with pytest.raises(CheckpointError):
        Trainer(method, cfg, tmp_path, seed=1, progress=False).resume()


def test_cli_zero_epochs_equals_zero_shot_and_export_predict(tmp_path, tiny_files):
    """CoOp from "a photo of a" with 0 epochs = zero-shot "a photo of a {}." through the CLI, and the exported
    head predicts what the run evaluates."""
    from vlprompt.backbone import load_backbone
    from vlprompt.data import build_test_transform, load_dataset, load_image

    data = make_folder_dataset(tmp_path / "data")
    cfg, weights = tiny_files
    proc = _cli(train_args(tiny_files, data, tmp_path / "run", tmp_path / "cache", epochs=0,
                           extra=["--init", "a photo of a"]))
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    acc = json.loads(out)["metrics"]["accuracy"]
    bb = load_backbone(str(cfg), str(weights), device="cpu")
    splits = load_dataset("folder", data)
    tf = build_test_transform(bb.image_size)
    x = torch.stack([tf(load_image(s.path)) for s in splits.test])
    text = bb.encode_text([f"a photo of a {c}." for c in splits.classnames], normalize=True)
    pred = (F.normalize(bb.encode_image(x), dim=-1) @ text.t()).argmax(1)
    labels = torch.tensor([s.label for s in splits.test])
    assert acc == pytest.approx(100.0 * (pred == labels).float().mean().item(), abs=1e-6)
    # export + predict: no text tower needed, same top-1 as the run's logits
    exp = _cli(["export", str(tmp_path / "run"), "--output", str(tmp_path / "head")])
    assert exp.wait(timeout=120) == 0, exp.stderr.read()
    pr = _cli(["predict", str(tmp_path / "head"), *[s.path for s in splits.test[:3]], "--json", "--topk", "2"])
    out, err = pr.communicate(timeout=120)
    assert pr.returncode == 0, err
    rows = json.loads(out)
    assert [r["top"][0]["class"] for r in rows] == [splits.classnames[i] for i in pred[:3].tolist()]
    interp = _cli(["interpret", str(tmp_path / "run"), "--json", "--topk", "1"])
    out, err = interp.communicate(timeout=120)
    assert interp.returncode == 0, err
    # word-initialised context decodes back to its words
    assert [r["words"][0] for r in json.loads(out)] == ["a", "photo", "of", "a"]


def test_learning_on_dtd_and_base_to_new(tmp_path, tiny_files):
    """16-shot DTD (real images), base classes: the loss falls and train accuracy rises well above chance
    (class-specific contexts: a random tiny tower leaves a shared context little to work with); a unified
    context trained on the base classes evaluates on the new ones."""
    from vlprompt.runs import DataConfig, evaluate_run, resolve, run

    root = require_shared("dtd").parent
    cfg_path, weights = tiny_files
    # the images the thresholds below were measured on (a tiny random tower learns slowly; any 16 shots would do)
    data = {"dataset": "dtd", "root": str(root), "shots": 16, "classes": "base", "sampler": "sorted"}
    base = {"method": "coop", "backbone": str(cfg_path), "pretrained": str(weights), "seed": 1, "data": data,
            "cache_dir": str(tmp_path / "cache")}
    cfg = resolve({**base, "method_options": {"n_ctx": 4, "csc": True},
                   "train": {"epochs": 30, "batch_size": 16, "lr": 0.01, "optimizer": "adamw", "weight_decay": 0.0,
                             "views": 2, "checkpoint_every": 10}})
    res = run(cfg, tmp_path / "csc", progress=False)
    hist = [json.loads(line) for line in (tmp_path / "csc" / "metrics.jsonl").read_text().splitlines()]
    assert hist[-1]["loss"] < 0.5 * hist[0]["loss"]
    assert res["train"]["final_train_accuracy"] >= 2 * 100 / 5  # 5 base classes: chance is 20%
    assert (tmp_path / "csc" / "training_curve.png").stat().st_size > 1000
    unified = resolve({**base, "method_options": {"n_ctx": 4}, "train": {"epochs": 2, "batch_size": 16, "views": 2}})
    run(unified, tmp_path / "unified", progress=False)
    new = evaluate_run(tmp_path / "unified", DataConfig(dataset="dtd", root=str(root), shots=0, classes="new"),
                       cache_dir=str(tmp_path / "cache"), progress=False)
    assert new["metrics"]["num_samples"] == 180 and 0 <= new["metrics"]["accuracy"] <= 100
    assert (tmp_path / "unified" / "eval" / "dtd-new-test.json").exists()


def test_tensorboard_logging(tmp_path, tiny_files):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from vlprompt.runs import resolve, run

    data = make_folder_dataset(tmp_path / "data")
    cfg_path, weights = tiny_files
    cfg = resolve({"method": "coop", "backbone": str(cfg_path), "pretrained": str(weights),
                   "data": {"dataset": "folder", "root": str(data), "shots": 4}, "method_options": {"n_ctx": 4},
                   "cache_dir": str(tmp_path / "cache"), "tensorboard": True,
                   "train": {"epochs": 2, "batch_size": 8, "views": 1}})
    run(cfg, tmp_path / "run", progress=False)
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    losses = [e.value for e in acc.Scalars("loss")]
    hist = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert losses == pytest.approx(hist)


def test_base_to_new_harmonic_mean_and_tables(tmp_path, tiny_files, capsys):
    """Runs over two seeds, evaluated base-to-new; the table averages over seeds and computes H on averages."""
    from vlprompt.cli import main
    from vlprompt.runs import DataConfig, base_to_new, harmonic_mean, resolve, run
    from vlprompt.stats import mean_std

    data = make_folder_dataset(tmp_path / "data")
    cfg_path, weights = tiny_files
    results, b2n = [], []
    for seed in (1, 2):
        cfg = resolve({"method": "coop", "backbone": str(cfg_path), "pretrained": str(weights), "seed": seed,
                       "data": {"dataset": "folder", "root": str(data), "shots": 4, "classes": "base"},
                       "method_options": {"n_ctx": 4}, "cache_dir": str(tmp_path / "cache"),
                       "train": {"epochs": 1, "batch_size": 4, "views": 1}})
        results.append(run(cfg, tmp_path / "runs" / f"seed{seed}", progress=False))
        b2n.append(base_to_new(tmp_path / "runs" / f"seed{seed}", DataConfig(dataset="folder", root=str(data)),
                               cache_dir=str(tmp_path / "cache"), progress=False))
    assert results[0]["metrics"]["num_samples"] == 2 * 3  # 2 base classes x 3 test images
    for r in b2n:
        assert r["harmonic_mean"] == pytest.approx(harmonic_mean(r["base"], r["new"]))
    assert main(["table", str(tmp_path / "runs"), "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    accs = [r["metrics"]["accuracy"] for r in results]
    assert table["runs"][0]["runs"] == 2 and table["runs"][0]["mean"] == pytest.approx(np.mean(accs))
    assert table["runs"][0]["std"] == pytest.approx(mean_std(accs)[1])
    base, new = np.mean([r["base"] for r in b2n]), np.mean([r["new"] for r in b2n])
    assert table["base_to_new"][0]["harmonic_mean"] == pytest.approx(2 * base * new / (base + new))
    assert harmonic_mean(80.0, 60.0) == pytest.approx(68.5714285714)


def test_cocoop_export_predict_runs_the_prompt(tmp_path, tiny_files):
    """CoCoOp's text depends on the image: its exported head keeps the learned tensors, and predict gives the
    method's own top-1."""
    from vlprompt.data import build_test_transform, load_dataset, load_image
    from vlprompt.runs import export_run, load_method, predict_images, resolve, run

    data = make_folder_dataset(tmp_path / "data")
    cfg_path, weights = tiny_files
    cfg = resolve({"method": "cocoop", "backbone": str(cfg_path), "pretrained": str(weights),
                   "data": {"dataset": "folder", "root": str(data), "shots": 4}, "cache_dir": str(tmp_path / "cache"),
                   "train": {"epochs": 1, "batch_size": 4, "views": 1}})
    run(cfg, tmp_path / "run", progress=False)
    head = export_run(tmp_path / "run")
    assert json.loads((head / "head.json").read_text())["kind"] == "prompt"
    splits = load_dataset("folder", data)
    rows = predict_images(head, [s.path for s in splits.test[:4]], topk=1, device="cpu")
    method, _, bb = load_method(tmp_path / "run", device="cpu")
    method.eval()
    tf = build_test_transform(bb.image_size)
    x = torch.stack([tf(load_image(s.path)) for s in splits.test[:4]])
    with torch.no_grad():
        expected = method(Features(global_=bb.encode_image(x))).argmax(1)
    assert [r["top"][0]["class"] for r in rows] == [splits.classnames[i] for i in expected.tolist()]


def test_online_loading_threads_are_deterministic(tmp_path, tiny_vit):
    from vlprompt.data import ImageDataset, build_train_transform, load_dataset

    splits = load_dataset("folder", make_folder_dataset(tmp_path / "data"))
    ds = ImageDataset(splits.train, build_train_transform(tiny_vit.image_size))
    idx = torch.arange(len(splits.train))
    batches = []
    for workers in (2, 2, 1, 0):
        torch.manual_seed(5)
        batches.append(OnlineImages(ds, tiny_vit, local=False, encode=False, workers=workers)._images(idx))
    assert all(torch.equal(batches[0], b) for b in batches[1:])
    assert not torch.equal(batches[0][0], batches[0][1])


def test_with_workers_the_next_batch_is_decoded_while_a_step_runs_and_training_is_unchanged(tmp_path, tiny_vit):
    """--workers N in online mode: the training loop names the next batch to the source before running the current
    step, which starts decoding its files in the decoder's threads; every step but an epoch's first is served from
    that prefetch, and the learned context and losses are bitwise those of a run without workers."""
    import threading

    from vlprompt.data import ImageDataset, build_train_transform, load_dataset, load_image
    from vlprompt.engine.sources import ImageDecoder

    splits = load_dataset("folder", make_folder_dataset(tmp_path / "data"))
    labels = torch.tensor([s.label for s in splits.train])
    events, threads = [], set()

    def loader(path):
        threads.add(threading.current_thread().name)
        return load_image(path)

    results = {}
    for workers in (0, 2):
        torch.manual_seed(0)
        method = CoOp(CoOpConfig(n_ctx=4), tiny_vit, splits.classnames)
        source = OnlineImages(ImageDataset(splits.train, build_train_transform(tiny_vit.image_size), loader=loader),
                              tiny_vit, local=False, encode=True, workers=workers)
        batch = source.batch

        def recording_batch(idx, gen, batch=batch):
            events.append(("batch", [splits.train[int(i)].path for i in idx]))
            return batch(idx, gen)

        source.batch = recording_batch
        if source.decoder is not None:
            prefetch = source.decoder.prefetch
            source.decoder.prefetch = lambda paths, prefetch=prefetch: (events.append(("prefetch", list(paths))),
                                                                        prefetch(paths))
            assert isinstance(source.decoder, ImageDecoder)
        cfg = TrainConfig(epochs=2, batch_size=4, lr=0.05, warmup_epochs=0, checkpoint_every=0)
        trainer = Trainer(method, cfg, tmp_path / f"w{workers}", seed=3, progress=False)
        events.clear()
        threads.clear()
        trainer.fit(source, labels)
        results[workers] = ([r["loss"] for r in trainer.state.history],
                            {k: v.detach().clone() for k, v in method.learned_state().items()})
        if workers:
            per_epoch = cfg.steps_per_epoch(len(labels))
            asked = [paths for kind, paths in events if kind == "batch"]
            assert len(asked) == 2 * per_epoch and per_epoch > 1
            assert source.decoder.prefetched == len(asked) - 2  # all but each epoch's first batch
            # batch n + 1 (within an epoch) is named right after batch n is read, before batch n's step runs
            for n in range(len(asked)):
                if n % per_epoch:
                    at = events.index(("batch", asked[n]), 1)
                    assert events[at - 1] == ("prefetch", asked[n]) and events[at - 2] == ("batch", asked[n - 1])
            assert threads and all(name.startswith("vlprompt-decode") for name in threads)
        else:
            assert threads == {threading.current_thread().name}
    assert results[0][0] == results[2][0]
    assert results[0][1].keys() == results[2][1].keys()
    assert all(torch.equal(results[0][1][k], results[2][1][k]) for k in results[0][1])


def test_prefetched_files_are_not_decoded_again_and_a_bad_file_raises_when_its_batch_is_used(tmp_path):
    from vlprompt.engine.sources import ImageDecoder

    calls = []

    def loader(path):
        calls.append(path)
        if path == "bad":
            raise OSError("cannot identify image file 'bad'")
        return path.upper()

    decoder = ImageDecoder(loader, 2)
    decoder.prefetch(["a", "b"])
    assert decoder.decode(["a", "b"]) == ["A", "B"] and sorted(calls) == ["a", "b"] and decoder.prefetched == 1
    decoder.prefetch(["c"])
    assert decoder.decode(["d"]) == ["D"] and decoder.prefetched == 1  # another batch: decoded now
    decoder.prefetch(["bad"])
    with pytest.raises(OSError, match="bad"):
        decoder.decode(["bad"])
    decoder.close()


def test_cocoop_memory_budget_follows_the_hosts_available_memory_and_a_cgroup_limit(tmp_path, monkeypatch):
    """The automatic text-memory budget: MemAvailable (the page cache the kernel can reclaim counts), capped by the
    room a cgroup limit (a Slurm job, a container) leaves."""
    from vlprompt.methods.prompts import cocoop

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemFree:         1000000 kB\nMemAvailable:   20000000 kB\n")
    monkeypatch.setattr(cocoop, "MEMINFO", str(meminfo))
    limit, usage = tmp_path / "memory.max", tmp_path / "memory.current"
    monkeypatch.setattr(cocoop, "CGROUP_FILES", ((str(limit), str(usage)),))
    cpu = torch.device("cpu")
    assert cocoop.available_memory_bytes(cpu) == 20000000 * 1024  # no cgroup files: the host's
    limit.write_text("max\n")
    usage.write_text("123\n")
    assert cocoop.available_memory_bytes(cpu) == 20000000 * 1024  # a cgroup without a limit
    limit.write_text(str(8 << 30))
    usage.write_text(str(3 << 30))
    assert cocoop.available_memory_bytes(cpu) == 5 << 30  # the job's room, below the host's
