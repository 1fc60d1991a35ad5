"""CLIP-LoRA: equal to the original's computation written out (tests/originals/clip_lora.py, checked against
MaxZanella/CLIP-LoRA's modules) on the same weights -- logits and gradients in training (the same dropout masks from
the same RNG state on the plain text path) and in evaluation on every text path, the init drawn as the original
draws it, a whole training loop of its recipe (iterations, AdamW, per-iteration cosine to 1e-6, the last batch kept)
step for step; the blocks of each position; its recipe with sources; refusals in one line; the CLI end to end, the
import of a lora_weights.pt, and a run killed by SIGKILL resumed bit for bit."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from originals import clip_lora as orig
from originals import mpl_clip
from vlprompt.backbone import load_backbone
from vlprompt.cli import main
from vlprompt.engine.schedule import lr_at_step
from vlprompt.engine.trainer import TrainConfig, Trainer, epoch_seed
from vlprompt.errors import BackboneError, ConfigError
from vlprompt.methods import build_config, build_method
from vlprompt.methods.base import Batch, Features
from vlprompt.methods.towers.clip_lora import position_blocks
from vlprompt.runs import resolve
from vlprompt.testing import make_tiny_checkpoint

NAMES = ["banded", "golden_retriever", "sword lily"]
LAYERS, TEXT_W, VISION_W = 4, 64, 96
SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("lora_models"), "tiny-vit", seed=5, sharpen=True,
                                layers=LAYERS, vision_width=VISION_W)


@pytest.fixture(scope="module")
def deep(model_files):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_backbone(str(model_files[0]), str(model_files[1]), "cpu")


def _images(n=4, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _factors(model, params=("q", "k", "v"), r=2, encoder="both", seed=8, std=0.5):
    """The original's factors at init with B drawn at random (at init B = 0: the model is CLIP)."""
    factors = orig.init_lora(model, params=params, r=r, encoder=encoder, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(seed)
    for layer in factors.values():
        for f in layer.values():
            f["B"] = torch.randn(f["B"].shape, generator=g) * std
    return factors


def _load(method, factors):
    """The original's factors into the method (its towers: text / vision -> text / image)."""
    with torch.no_grad():
        for (tower, i), layer in factors.items():
            for p, f in layer.items():
                for part in ("A", "B"):
                    method.lora.factors[f"{'text' if tower == 'text' else 'image'}_{i}_{p}_{part}"].copy_(f[part])


def _ours(method, factors):
    """The method's parameters in the original's (tower, block, projection, part) order."""
    return [method.lora.factors[f"{'text' if t == 'text' else 'image'}_{i}_{p}_{part}"]
            for (t, i), layer in factors.items() for p in layer for part in ("A", "B")]


@pytest.mark.parametrize("params, r, alpha", [(("q", "k", "v"), 2, 1.0), (("q", "k", "v", "o"), 4, 2.0)])
def test_training_logits_and_gradients_equal_the_original_with_the_same_dropout_masks(deep, params, r, alpha):
    factors = _factors(deep.model, params, r)
    leaves = [f[part].requires_grad_() for layer in factors.values() for f in layer.values() for part in ("A", "B")]
    images, labels = _images(), torch.tensor([0, 1, 2, 1])
    scale = orig.scaling(r, alpha)
    tokens = mpl_clip.tokenize(orig.class_texts(NAMES))
    torch.manual_seed(21)  # the original's order: the text tower's masks, then the image tower's
    text = orig.text_features(deep.model, tokens, factors, scale, training=True, dropout_rate=0.25)
    image = orig.image_features(deep.model, images, factors, scale, training=True, dropout_rate=0.25)
    ref = orig.logits(image, F.normalize(text, dim=-1))
    assert ref.std(dim=0).min() > 0.05 and ref.std(dim=1).min() > 0.05
    ref_grads = torch.autograd.grad(F.cross_entropy(ref, labels), leaves)

    method = build_method("clip-lora", {"params": list(params), "rank": r, "alpha": alpha, "text_mode": "plain"},
                          deep, NAMES)
    _load(method, factors)
    method.train()
    torch.manual_seed(21)
    out = method.training_step(Batch(Features(images=images), labels))
    torch.testing.assert_close(out.logits, ref.detach(), rtol=0, atol=1e-6 * 100)
    out.loss.backward()
    for got, want, leaf in zip(_ours(method, factors), ref_grads, leaves):
        if leaf.shape[0] == r and not want.abs().max():  # A of an input the branch never saw: no gradient there
            continue
        assert float(want.abs().max()) > 0
        assert float((got.grad - want).abs().max()) <= 1e-5 * float(want.abs().max())
    torch.manual_seed(22)  # another draw: other masks (the dropout is active)
    assert not torch.allclose(method.training_step(Batch(Features(images=images), labels)).logits, out.logits)


@pytest.mark.parametrize("mode", ["auto", "plain", "cut"])
@pytest.mark.parametrize("encoder", ["both", "text", "vision"])
def test_evaluation_equals_the_originals_merged_weights_on_every_text_path(deep, mode, encoder):
    factors = _factors(deep.model, encoder=encoder)
    images = _images(3, seed=1)
    scale = orig.scaling(2, 1)
    with torch.no_grad():
        if encoder == "vision":  # clip_classifier: the fixed hand-crafted text
            text = orig.clip_classifier(deep.model, NAMES).t()
        else:
            text = orig.text_features(deep.model, mpl_clip.tokenize(orig.class_texts(NAMES)), factors, scale)
        image = orig.image_features(deep.model, images, factors, scale) if encoder != "text" else \
            deep.model.encode_image(images)
        ref = orig.logits(image, text)
    options = {"encoder": encoder, **({"text_mode": mode} if encoder != "vision" else {})}
    method = build_method("clip-lora", options, deep, NAMES)
    _load(method, factors)
    method.eval()
    feats = Features(images=images) if encoder != "text" else Features(global_=deep.encode_image(images))
    with torch.no_grad():
        torch.testing.assert_close(method(feats), ref, rtol=0, atol=1e-6 * 100)


def test_the_init_draws_like_the_original_and_starts_at_clip(deep):
    for params in (("q", "k", "v"), ("v", "o", "q")):
        torch.manual_seed(12)
        factors = orig.init_lora(deep.model, params=params, r=3)
        torch.manual_seed(12)
        method = build_method("clip-lora", {"params": list(params), "rank": 3}, deep, NAMES)
        for (tower, i), layer in factors.items():
            for p, f in layer.items():
                t = "text" if tower == "text" else "image"
                assert torch.equal(method.lora.factors[f"{t}_{i}_{p}_A"], f["A"]), (tower, i, p)
                assert not method.lora.factors[f"{t}_{i}_{p}_B"].any()
    method.eval()
    images = _images(2)
    with torch.no_grad():  # B = 0: zero-shot CLIP with the template, at the original's logit scale 100
        text = deep.encode_text([f"a photo of a {n.replace('_', ' ')}." for n in NAMES])
        torch.testing.assert_close(method(Features(images=images)),
                                   100 * F.normalize(deep.encode_image(images), dim=-1) @ F.normalize(text, dim=-1).t(),
                                   rtol=0, atol=1e-4)
    assert method.describe()["scale"] == pytest.approx(1 / math.sqrt(3))  # alpha / sqrt(r), not alpha / r


def test_positions_are_the_originals_tables_for_12_and_24_block_towers():
    for position in ("all", "bottom", "mid", "up", "half-bottom", "half-up", "top3"):
        assert position_blocks(position, 12) == orig.INDEX_POSITIONS_TEXT[position]
        assert position_blocks(position, 12) == orig.INDEX_POSITIONS_VISION["ViT-B/16"][position]
    for position, blocks in orig.INDEX_POSITIONS_VISION["ViT-L/14"].items():
        assert position_blocks(position, 24) == blocks
    assert position_blocks("up", 4) == [2, 3] and position_blocks("all", 4) == [0, 1, 2, 3]


def test_a_training_loop_of_the_recipe_equals_the_originals_step_for_step(deep):
    """6 images, batch 4 (the last batch of 2 kept), 3 iterations: two passes, the second cut after one step;
    AdamW (weight decay 1e-2), cosine per iteration down to 1e-6, dropout 0.25 -- the same factors as the original's
    loop fed the same batches under the same RNG states."""
    images, labels = _images(6, seed=3), torch.tensor([0, 1, 2, 0, 1, 2])
    factors = _factors(deep.model, std=0.05)
    method = build_method("clip-lora", {"text_mode": "plain"}, deep, NAMES)
    _load(method, factors)
    cfg = TrainConfig(iterations=3, batch_size=4, last_batch="keep", optimizer="adamw", lr=2e-3, weight_decay=1e-2,
                      scheduler="cosine_step", warmup_epochs=0, min_lr=1e-6, views=None).validate()

    class Images:
        def batch(self, idx, gen):
            return Features(images=images[idx])

    trainer = Trainer(method, cfg, Path("/nonexistent"), seed=4, progress=False)
    trainer.cfg.checkpoint_every = 0
    state = trainer.fit(Images(), labels)
    assert state.step == 3 and [r["steps"] for r in state.history] == [2, 1]

    epochs = iter(range(10))

    def epoch_batches():  # the trainer's batches and RNG state of each epoch
        e = next(epochs)
        order = torch.randperm(6, generator=torch.Generator().manual_seed(epoch_seed(4, e)))
        torch.manual_seed(epoch_seed(4, e, "augment"))
        return [(images[order[:4]], labels[order[:4]]), (images[order[4:]], labels[order[4:]])]

    start = [f[part].detach().clone() for layer in factors.values() for f in layer.values() for part in ("A", "B")]
    out = orig.train(deep.model, factors, epoch_batches, NAMES, shots=1, n_iters=3, lr=2e-3)
    for t, lr in enumerate(out["lrs"]):  # torch's CosineAnnealingLR(T_max=3, eta_min=1e-6), per iteration
        assert lr == pytest.approx(lr_at_step(t // 2, t % 2, 2, base_lr=2e-3, epochs=2, scheduler="cosine_step",
                                              warmup_epochs=0, min_lr=1e-6, total_steps=3), rel=1e-12)
    wanted = [f[part].detach() for layer in factors.values() for f in layer.values() for part in ("A", "B")]
    for got, want, before in zip(_ours(method, factors), wanted, start):
        moved = float((want - before).abs().max())
        assert moved > 1e-4  # three AdamW steps of lr ~2e-3 moved every factor
        assert float((got.detach() - want).abs().max()) <= 1e-3 * moved  # float rounding, amplified by Adam


def test_recipe_with_its_sources():
    def resolved(shots, **extra):
        return resolve({"method": "clip-lora", "data": {"dataset": "dtd", "root": "/nonexistent", "shots": shots},
                        **extra})

    cfg = resolved(4)
    # run_utils.py l.28-30: lr 2e-4, n_iters 500 (x shots, lora.py l.73), batch 32; lora.py l.75-76: AdamW with
    # weight decay 1e-2 (issue #1: not the first release's 1e2), CosineAnnealingLR(T_max, eta_min 1e-6) stepped per
    # iteration (l.122), no warm-up; datasets/utils.py l.354-375: the loader keeps the last partial batch
    assert {k: cfg.train.to_dict()[k] for k in ("iterations", "epochs", "batch_size", "last_batch", "optimizer", "lr",
                                                "weight_decay", "adam_eps", "scheduler", "warmup_epochs",
                                                "min_lr")} == {
        "iterations": 2000, "epochs": None, "batch_size": 32, "last_batch": "keep", "optimizer": "adamw", "lr": 2e-4,
        "weight_decay": 1e-2, "adam_eps": 1e-8, "scheduler": "cosine_step", "warmup_epochs": 0, "min_lr": 1e-6}
    # run_utils.py l.32-37: encoder both, position all, params q k v, r 2, alpha 1, dropout 0.25;
    # datasets/*.py: "a photo of a {}." for every dataset
    assert cfg.method_options == {"rank": 2, "alpha": 1.0, "dropout": 0.25, "encoder": "both", "position": "all",
                                  "params": ["q", "k", "v"], "template": "a photo of a {}.", "text_mode": "auto"}
    assert resolved(16).train.iterations == 8000
    epochs = resolved(4, train={"epochs": 3}).train  # the user's length replaces the recipe's
    assert (epochs.epochs, epochs.iterations, epochs.lr) == (3, 0, 2e-4)
    with pytest.raises(ConfigError, match="give --epochs"):  # all images: no iteration count was published
        resolved(0)
    assert resolved(0, train={"iterations": 100}).train.iterations == 100
    with pytest.raises(ConfigError, match="both say how long to train"):
        resolved(4, train={"epochs": 3, "iterations": 10})
    with pytest.raises(ConfigError, match="min_lr"):
        resolved(4, train={"scheduler": "constant"})
    # identities of runs that leave the new training fields at their defaults are unchanged
    coop = resolve({"method": "coop", "data": {"dataset": "dtd", "root": "/nonexistent", "shots": 4}})
    assert not {"iterations", "min_lr", "last_batch"} & set(coop.identity()["train"])
    assert {"iterations", "min_lr", "last_batch"} <= set(cfg.identity()["train"])


def test_refusals_are_one_line(deep, tiny_rn):
    for options, message in (({"rank": 0}, "rank"), ({"alpha": 0}, "alpha"), ({"dropout": 1.0}, "below 1"),
                             ({"dropout": -0.1}, "dropout"), ({"params": ["x"]}, "params"), ({"params": []}, "params"),
                             ({"params": ["q", "q"]}, "params"), ({"template": "a photo"}, "template"),
                             ({"encoder": "image"}, "encoder"), ({"position": "top"}, "position"),
                             ({"encoder": "vision", "text_mode": "plain"}, "not adapted")):
        with pytest.raises(ConfigError, match=message):
            build_config("clip-lora", options)
    with pytest.raises(BackboneError) as e:
        build_method("clip-lora", {}, tiny_rn, NAMES)
    assert "CLIP-LoRA needs lora image" in str(e.value) and "\n" not in str(e.value)
    # the text tower alone on a ResNet backbone (the original's --encoder text): its frozen features, cached
    text_only = build_method("clip-lora", {"encoder": "text"}, tiny_rn, NAMES)
    assert type(text_only).input_kinds(text_only.config) == {"global"}
    assert text_only(Features(global_=torch.randn(2, tiny_rn.embed_dim))).shape == (2, 3)
    with pytest.raises(Exception, match="needs images"):
        build_method("clip-lora", {}, deep, NAMES)(Features(global_=torch.randn(2, 64)))


# -- the command line ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def four_classes(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_data") / "things"
    rng = np.random.default_rng(1)
    for c, name in enumerate(["red_thing", "green_thing", "blue_thing", "grey_thing"]):
        (root / name).mkdir(parents=True)
        for i in range(8):
            arr = rng.integers(0, 80, (36, 40, 3), dtype=np.uint8)
            arr[..., c % 3] += 150 if c < 3 else 60
            Image.fromarray(arr).save(root / name / f"{i:02d}.jpg", quality=90)
    return root


def _run(argv, capsys, code=0):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert rc == code, err
    return out, err


def _common(model_files, root, cache):
    return ["--backbone", model_files[0], "--pretrained", model_files[1], "--dataset", "folder", "--root", root,
            "--cache-dir", cache, "--quiet"]


def test_cli_trains_evaluates_exports_predicts_and_imports_a_lora_weights_file(deep, model_files, four_classes,
                                                                               tmp_path, capsys):
    from vlprompt.runs.assembly import load_method

    common = _common(model_files, four_classes, tmp_path / "cache")
    out = tmp_path / "run"
    res = json.loads(_run(["train", "--method", "clip-lora", *common, "--shots", "2", "--iterations", "5",
                           "--batch-size", "3", "--output", out], capsys)[0])
    # 4 classes x 2 shots, batch 3, the last batch (2) kept: 3 steps a pass; 5 steps = 2 passes, the second cut
    assert res["train"]["steps"] == 5 and res["epochs"] is None and res["config"]["train"]["iterations"] == 5
    assert [json.loads(line)["steps"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [3, 2]
    ev = json.loads(_run(["eval", out, "--dataset", "folder", "--root", four_classes, "--cache-dir",
                          tmp_path / "cache", "--quiet"], capsys)[0])
    assert ev["metrics"]["accuracy"] == pytest.approx(res["metrics"]["accuracy"])
    _run(["export", out, "--output", tmp_path / "head"], capsys)
    image = sorted(Path(four_classes).rglob("*.jpg"))[0]
    pred = json.loads(_run(["predict", tmp_path / "head", image, "--topk", "3", "--json"], capsys)[0])
    assert len(pred[0]["top"]) == 3

    # a lora_weights.pt as CLIP-LoRA's save_lora leaves it (its folders name the backbone, shots and seed)
    factors = _factors(deep.model, std=0.3)
    path = orig.write_original_checkpoint(tmp_path / "lora_out", factors, dataset="things", shots=2, seed=3)
    res = json.loads(_run(["import", path, "--from", "clip-lora", *common, "--output", tmp_path / "imported"],
                          capsys)[0])
    assert res["imported_from"]["format"] == "clip-lora" and res["seed"] == 3 and res["shots"] == 2
    assert res["config"]["method_options"]["rank"] == 2 and res["config"]["method_options"]["params"] == ["q", "k", "v"]
    method, _, _ = load_method(tmp_path / "imported", backbone=deep)
    method.eval()
    classnames = method.classnames
    images = _images(3, seed=5)
    scale = orig.scaling(2, 1)
    with torch.no_grad():
        text = orig.text_features(deep.model, mpl_clip.tokenize(orig.class_texts(classnames)), factors, scale)
        ref = orig.logits(orig.image_features(deep.model, images, factors, scale), text)
        torch.testing.assert_close(method(Features(images=images)), ref, rtol=0, atol=1e-4)
    # the file outside save_lora's folders: the shots must be given
    bare = tmp_path / "bare.pt"
    bare.write_bytes(path.read_bytes())
    _, err = _run(["import", bare, "--from", "clip-lora", *common, "--output", tmp_path / "bare"], capsys, code=2)
    assert "--shots" in err and len(err.strip().splitlines()) == 1
    # a file of other options than the flags: refused, naming both
    _, err = _run(["import", path, "--from", "clip-lora", *common, "--position", "half-up", "--output",
                   tmp_path / "wrong"], capsys, code=2)
    assert "adapts 8 attention layers" in err and len(err.strip().splitlines()) == 1


def _cli(args):
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "vlprompt", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def test_a_run_killed_by_sigkill_resumes_to_the_same_factors_bit_for_bit(tiny_dir, four_classes, tmp_path):
    from safetensors.torch import load_file

    small = make_tiny_checkpoint(tiny_dir, "tiny-vit", sharpen=True)  # 2 blocks per tower: a cheap step

    def args(out):  # 8 images, batch 3 (the last batch kept): 3 steps a pass, 14 passes, the last cut after 1 step
        return ["train", "--method", "clip-lora", *_common(small, four_classes, tmp_path / "cache"), "--shots",
                "2", "--iterations", "40", "--batch-size", "3", "--lr", "0.01", "--threads", "1", "--output", out]

    full = _cli(args(tmp_path / "full"))
    _, err = full.communicate(timeout=600)
    assert full.returncode == 0, err
    victim = _cli(args(tmp_path / "killed"))
    pointer = tmp_path / "killed" / "checkpoints" / "latest.json"
    deadline = time.time() + 300
    while time.time() < deadline and victim.poll() is None:
        if pointer.exists() and json.loads(pointer.read_text())["epoch"] >= 3:
            break
        time.sleep(0.02)
    assert victim.poll() is None, "the run finished before it could be killed"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    resumed = _cli([*args(tmp_path / "killed"), "--resume"])
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    a = load_file(str(tmp_path / "full" / "prompt.safetensors"))
    b = load_file(str(tmp_path / "killed" / "prompt.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert any(a[k].abs().max() > 0 for k in a if k.endswith("_B"))  # it learned
    records = [json.loads(line) for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 14 and records[-1]["steps"] == 1


def test_towers_of_other_depths_and_widths_are_read_from_the_model(tmp_path):
    from test_maple import tower_backbone

    bb = tower_backbone(tmp_path, text_layers=2, vision_layers=3)
    method = build_method("clip-lora", {}, bb, NAMES)
    assert method.blocks == [("text", 0), ("text", 1), ("image", 0), ("image", 1), ("image", 2)]
    assert method.lora.factors["image_2_q_A"].shape == (2, 96) and method.lora.factors["text_1_v_B"].shape == (64, 2)
    factors = _factors(bb.model)
    _load(method, factors)
    method.eval()
    images, scale = _images(2, seed=6), orig.scaling(2, 1)
    with torch.no_grad():
        text = orig.text_features(bb.model, mpl_clip.tokenize(orig.class_texts(NAMES)), factors, scale)
        ref = orig.logits(orig.image_features(bb.model, images, factors, scale), text)
        torch.testing.assert_close(method(Features(images=images)), ref, rtol=0, atol=1e-4)
