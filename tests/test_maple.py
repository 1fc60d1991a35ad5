"""MaPLe: equal to the original's computation written out (tests/originals/maple.py, checked against
muzairkhattak/multimodal-prompt-learning's modules) on the same weights, on every text path, in logits and in the
gradients of every learned tensor; its init draws, word-init rule, widths read from the model; its recipes with
their sources; refusals (bad options, depths beyond the towers, ResNet towers) in one line; the CLI end to end
(train on base classes, evaluate base-to-new, export, predict) and the import of an original MaPLe checkpoint."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from originals import maple as orig
from vlprompt.backbone import load_backbone
from vlprompt.cli import main
from vlprompt.errors import BackboneError, CheckpointError, ConfigError
from vlprompt.methods import build_config, build_method
from vlprompt.methods.base import Batch, Features
from vlprompt.runs import resolve
from vlprompt.testing import make_tiny_checkpoint

NAMES = ["banded", "golden_retriever", "sword lily"]
LAYERS, TEXT_W, VISION_W = 4, 64, 96


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    """4 blocks per tower, a vision width (96) other than the text width (64): a swapped width fails."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("maple_models"), "tiny-vit", seed=5, sharpen=True,
                                layers=LAYERS, vision_width=VISION_W)


@pytest.fixture(scope="module")
def deep(model_files):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_backbone(str(model_files[0]), str(model_files[1]), "cpu")


def _images(n=4, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def to_ours(learned: dict) -> dict:
    """The original's learned tensors by vlprompt's names and shapes."""
    out = {}
    for name, t in learned.items():
        key = name[len("prompt_learner."):]
        if key == "ctx":
            out["prompt.ctx"] = t[None, None]
            continue
        key = key.replace("compound_prompts_text.", "deep_text.").replace("compound_prompt_projections.", "deep_proj.")
        out[key] = t
    return out


def _build(backbone, **options):
    return build_method("maple", options, backbone, NAMES)


def _original(backbone, n_ctx, depth, init, seed):
    learned, fixed = orig.init_maple(backbone.model, NAMES, n_ctx=n_ctx, depth=depth, ctx_init=init,
                                     generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 1)
    for k in learned:  # the coupling layers start identical; make every tensor its own (and the prompts larger)
        learned[k] = learned[k] + 0.1 * torch.randn(learned[k].shape, generator=g)
    return learned, fixed


@pytest.mark.parametrize("n_ctx, depth, init", [(2, 3, "a photo of a"), (3, LAYERS, None)])
@pytest.mark.parametrize("mode", ["auto", "plain", "cut", "prefix"])
def test_logits_and_gradients_equal_the_original_on_every_text_path(deep, n_ctx, depth, init, mode):
    learned, fixed = _original(deep, n_ctx, depth, init, seed=3)
    learned = {k: v.requires_grad_() for k, v in learned.items()}
    images, labels = _images(), torch.tensor([0, 1, 2, 1])
    ref_logits = orig.maple_logits(deep.model, learned, fixed, images)
    assert ref_logits.std(dim=0).min() > 0.05 and ref_logits.std(dim=1).min() > 0.05  # they vary
    ref_loss = F.cross_entropy(ref_logits, labels)
    ref_grads = dict(zip(learned, torch.autograd.grad(ref_loss, list(learned.values()))))

    method = _build(deep, n_ctx=n_ctx, depth=depth, init=init or "none", text_mode=mode)
    method.load_learned_state({k: v.detach() for k, v in to_ours(learned).items()})
    method.train()
    out = method.training_step(Batch(Features(images=images), labels))
    scale = deep.logit_scale
    torch.testing.assert_close(out.logits, ref_logits.detach(), rtol=0, atol=1e-6 * scale)
    out.loss.backward()
    ours = dict(method.named_parameters())
    for name, ref in ref_grads.items():
        got = ours[next(iter(to_ours({name: ref})))].grad.reshape(ref.shape)
        assert float(ref.abs().max()) > 0, name  # every used tensor learns (deep prompt j is used at block j + 1)
        assert float((got - ref).abs().max()) <= 1e-5 * float(ref.abs().max()), name
    method.eval()
    with torch.no_grad():  # evaluation: the same forward, text features once per evaluation
        torch.testing.assert_close(method(Features(images=images)), ref_logits.detach(), rtol=0, atol=1e-6 * scale)


def test_the_init_draws_like_the_original_from_the_same_rng_state(deep):
    """ctx (random), proj, the J-1 deep text prompts, then ONE Linear copied J-1 times: identical at the start."""
    for init, n in ((None, 3), ("a photo of a", 2)):
        torch.manual_seed(11)
        learned, _ = orig.init_maple(deep.model, NAMES, n_ctx=n, depth=4, ctx_init=init)
        torch.manual_seed(11)
        method = _build(deep, n_ctx=n, depth=4, init=init or "none")
        state = method.learned_state()
        for name, value in to_ours(learned).items():
            torch.testing.assert_close(state[name], value, rtol=0, atol=0, msg=name)
        assert torch.equal(state["deep_proj.0.weight"], state["deep_proj.2.weight"])
        assert not torch.equal(state["deep_proj.0.weight"], state["proj.weight"])
    assert sum(t.numel() for t in state.values()) == orig.parameter_count(TEXT_W, VISION_W, 2, 4)


def test_the_word_init_learns_the_first_tokens_and_keeps_the_rest_of_the_init_fixed(deep):
    method = _build(deep, depth=2)  # the recipe: n_ctx 2, "a photo of a"
    info = method.describe()
    assert (info["learned_init_words"], info["fixed_init_words"]) == ("a photo", "of a")
    assert (info["text_width"], info["vision_width"]) == (TEXT_W, VISION_W)  # read from the model
    tokens = deep.text.tokenize([f"a photo of a {n.replace('_', ' ')}." for n in NAMES])
    emb = deep.text.embed(tokens)
    torch.testing.assert_close(method.learned_tensor("prompt.ctx")[0, 0], emb[0, 1:3], rtol=0, atol=0)
    torch.testing.assert_close(method.prompt.tail, emb[:, 3:], rtol=0, atol=0)  # "of a <name> ." fixed
    assert method.shared_fixed == 2  # "of a" joins the shared prefix
    with pytest.raises(ConfigError, match="'a photo of a' has 4 tokens"):
        _build(deep, n_ctx=5, depth=2)
    with pytest.raises(ConfigError, match="'a photo' has 2 tokens"):
        _build(deep, n_ctx=3, depth=2, init="a photo")
    assert _build(deep, n_ctx=5, depth=2, init="none").config.init is None  # random N(0, 0.02)


def test_new_classes_keep_the_learned_tensors_and_rebuild_the_class_tokens(deep):
    method = _build(deep, depth=3)
    before = {k: v.clone() for k, v in method.learned_state().items()}
    method.set_classnames(["x", "another class"])
    assert method.prompt.tail.shape[0] == 2
    assert all(torch.equal(v, before[k]) for k, v in method.learned_state().items())
    method.eval()
    with torch.no_grad():
        assert method(Features(images=_images(2))).shape == (2, 2)


def test_refusals_are_one_line(deep, tiny_rn, tiny_vit):
    for options, message in (({"depth": 0}, "depth"), ({"n_ctx": 0}, "n_ctx"), ({"text_mode": "fast"}, "text_mode"),
                             ({"chunk_size": 0}, "chunk_size"), ({"depht": 3}, "unknown option")):
        with pytest.raises(ConfigError, match=message):
            build_config("maple", options)
    with pytest.raises(ConfigError, match=r"depth \(--depth\) 5 exceeds the blocks .*\(4 text, 4 image\)"):
        _build(deep, depth=5)
    with pytest.raises(ConfigError, match="at most 2"):
        _build(tiny_vit, depth=3)  # 2 blocks per tower
    assert _build(tiny_vit, depth=2).describe()["vision_width"] == 64
    with pytest.raises(BackboneError) as e:
        _build(tiny_rn, depth=2)
    assert "MaPLe needs deep vision" in str(e.value) and "ResNet" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(Exception, match="needs images"):
        _build(deep, depth=2)(Features(global_=torch.randn(2, 64)))


def _resolved(dataset, classes="all", **extra):
    return resolve({"method": "maple", "data": {"dataset": dataset, "root": "/nonexistent", "shots": 16,
                                                "classes": classes}, **extra})


def test_recipes_base_to_new_and_cross_dataset_with_their_sources():
    dassl = {"optimizer": "sgd", "momentum": 0.9, "weight_decay": 5e-4,  # Dassl's defaults.py _C.OPTIM
             "scheduler": "cosine", "warmup_epochs": 1, "warmup_lr": 1e-5}  # configs OPTIM: WARMUP_EPOCH 1, 1e-5
    b2n = _resolved("dtd", "base")
    # configs/trainers/MaPLe/vit_b16_c2_ep5_batch4_2ctx.yaml: batch 4 (l.3), lr 0.0035 (l.17), 5 epochs (l.18)
    assert {k: b2n.train.to_dict()[k] for k in (*dassl, "batch_size", "lr", "epochs")} == {
        **dassl, "batch_size": 4, "lr": 0.0035, "epochs": 5}
    # same file: N_CTX 2 (l.33), CTX_INIT "a photo of a" (l.34), PROMPT_DEPTH 9 (l.36)
    assert {k: b2n.method_options[k] for k in ("n_ctx", "init", "depth")} == {"n_ctx": 2, "init": "a photo of a",
                                                                              "depth": 9}
    xd = _resolved("imagenet")
    # vit_b16_c2_ep5_batch4_2ctx_cross_datasets.yaml: lr 0.0026 (l.17), 2 epochs (l.18), PROMPT_DEPTH 3 (l.36)
    assert (xd.train.lr, xd.train.epochs, xd.train.batch_size, xd.method_options["depth"]) == (0.0026, 2, 4, 3)
    # no few-shot recipe was published: other data get the base-to-new one (train.py's defaults, l.104-110)
    assert _resolved("dtd").method_options == b2n.method_options and _resolved("dtd").train.lr == 0.0035
    assert _resolved("dtd", "base", train={"epochs": 1}).train.epochs == 1  # the user's value wins
    assert b2n.train.views is None  # images at every step: no cached views


# -- the command line ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def four_classes(tmp_path_factory):
    """4 classes x 8 generated images (the folder reader splits them 50 / 20 / 30): base = 2, new = 2."""
    root = tmp_path_factory.mktemp("maple_data") / "things"
    rng = np.random.default_rng(0)
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


def test_cli_trains_on_base_classes_evaluates_new_ones_exports_and_predicts(model_files, four_classes, tmp_path,
                                                                            capsys):
    out = tmp_path / "run"
    common = _common(model_files, four_classes, tmp_path / "cache")
    res = json.loads(_run(["train", "--method", "maple", *common, "--shots", "2", "--classes", "base", "--depth", "3",
                           "--epochs", "2", "--output", out], capsys)[0])
    assert res["epochs"] == 2 and res["train"]["steps"] == 2  # 2 classes x 2 shots, batch 4: one step per epoch
    assert res["method_info"]["fixed_init_words"] == "of a" and res["num_classes"] == 2
    b2n = json.loads(_run(["eval", out, "--dataset", "folder", "--root", four_classes, "--cache-dir",
                           tmp_path / "cache", "--base-to-new", "--quiet"], capsys)[0])
    assert b2n["new"] is not None and 0 <= b2n["harmonic_mean"] <= 100
    _run(["export", out, "--output", tmp_path / "head"], capsys)
    assert json.loads((tmp_path / "head" / "head.json").read_text())["kind"] == "prompt"
    image = sorted(Path(four_classes).rglob("*.jpg"))[0]
    pred = json.loads(_run(["predict", tmp_path / "head", image, "--topk", "2", "--json"], capsys)[0])
    assert len(pred[0]["top"]) == 2
    # the head predicts what the run's method computes
    from vlprompt.runs.assembly import load_method, transforms_for
    from vlprompt.data import load_image

    method, _, backbone = load_method(out)
    method.eval()
    x = transforms_for("coop", backbone)[1](load_image(str(image)))[None]
    with torch.no_grad():
        probs = method(Features(images=x)).softmax(-1)[0]
    assert pred[0]["top"][0]["probability"] == pytest.approx(float(probs.max()), abs=1e-5)


def test_cli_refuses_a_resnet_backbone_and_a_bad_option_in_one_line(tiny_dir, four_classes, tmp_path, capsys):
    rn = make_tiny_checkpoint(tiny_dir, "tiny-rn")
    _, err = _run(["train", "--method", "maple", *_common(rn, four_classes, tmp_path / "c"), "--shots", "1",
                   "--depth", "2", "--output", tmp_path / "rn"], capsys, code=2)
    assert "MaPLe needs deep vision" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "rn").exists()  # refused before anything was written
    _, err = _run(["train", "--method", "maple", *_common(rn, four_classes, tmp_path / "c"), "--shots", "1",
                   "--depth", "0", "--output", tmp_path / "bad"], capsys, code=2)
    assert "--depth" in err and len(err.strip().splitlines()) == 1


def _write_log(folder: Path, cfg: dict) -> None:
    """Dassl's train.py prints the yacs config into <output>/log.txt."""
    cfg = json.loads(json.dumps(cfg))  # tuples as lists, as yacs prints them
    (folder / "log.txt").write_text("** Config **\n" + yaml.safe_dump(cfg) + "Collecting env info ...\n")


def test_import_of_an_original_checkpoint_equals_the_original_computation(deep, model_files, four_classes, tmp_path,
                                                                          capsys):
    from vlprompt.data import load_dataset
    from vlprompt.runs.assembly import load_method
    from vlprompt.runs.importer import read_source

    base = load_dataset("folder", str(four_classes)).classnames[:2]  # the base half of the sorted labels
    learned, fixed = _original(deep, 2, 3, "a photo of a", seed=7)
    source = tmp_path / "output"
    orig.write_original_checkpoint(source, {**learned, **fixed}, deep.model, epoch=5)
    cfg = orig.dassl_config("base2new", dataset="Things", shots=2, subsample="base", seed=1)
    cfg["TRAINER"]["MAPLE"]["PROMPT_DEPTH"] = 3
    _write_log(source, cfg)
    res = json.loads(_run(["import", source, "--from", "maple", *_common(model_files, four_classes, tmp_path / "c"),
                           "--output", tmp_path / "imported"], capsys)[0])
    assert res["imported_from"]["format"] == "dassl" and res["imported_from"]["epoch"] == 5
    assert res["config"]["method_options"]["depth"] == 3 and res["config"]["data"]["classes"] == "base"
    assert res["config"]["train"]["lr"] == 0.0035 and res["num_classes"] == 2
    method, _, _ = load_method(tmp_path / "imported", backbone=deep)
    assert method.classnames == base
    method.eval()
    # the original's forward on what it saved: ctx and proj in fp16, the deep tensors in fp32
    saved = {k: (v.half().float() if k in ("prompt_learner.ctx", "prompt_learner.proj.weight",
                                            "prompt_learner.proj.bias") else v) for k, v in learned.items()}
    _, fixed_base = orig.init_maple(deep.model, base, depth=3)
    images = _images(3, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(method(Features(images=images)), orig.maple_logits(deep.model, saved, fixed_base,
                                                                                      images),
                                   rtol=0, atol=1e-6 * deep.logit_scale)
    # other CLIP weights than the run's: refused, naming what differs
    other = make_tiny_checkpoint(tmp_path / "other", "tiny-vit", seed=6, sharpen=True, layers=LAYERS,
                                 vision_width=VISION_W)
    _, err = _run(["import", source, "--from", "maple", *_common(other, four_classes, tmp_path / "c"),
                   "--output", tmp_path / "wrong"], capsys, code=2)
    assert "other CLIP weights" in err and len(err.strip().splitlines()) == 1
    # a depth the log and the tensors disagree on
    cfg["TRAINER"]["MAPLE"]["PROMPT_DEPTH"] = 9
    _write_log(source, cfg)
    with pytest.raises(CheckpointError, match="PROMPT_DEPTH 9"):
        read_source("maple", source)


def test_two_torchrun_ranks_learn_the_single_process_prompts(tmp_path, four_classes):
    """torchrun, 2 CPU processes (gloo): each rank runs the prompted image tower on its slice of the global batch
    and its share of the classes' prompts (class-sharded text encoding with the deep prompts); the summed gradients
    make the same steps as one process. Reduction order differs: after 4 SGD steps the tensors agree with one
    process to float32 rounding amplified by the steps (1.2e-6 measured; tolerance 2e-5, as
    tests/test_distributed.py)."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    cfg, weights = make_tiny_checkpoint(tmp_path / "model", "tiny-vit", seed=3, sharpen=True)  # 2 blocks a tower

    def argv(out, cache):  # 4 classes x 2 shots, batch 4: 2 steps a pass, slices of 2 images per rank
        return ["train", "--method", "maple", "--backbone", cfg, "--pretrained", weights, "--dataset", "folder",
                "--root", four_classes, "--shots", "2", "--depth", "2", "--epochs", "2", "--warmup-epochs", "0",
                "--lr", "0.05", "--batch-size", "4", "--cache-dir", cache, "--output", out, "--quiet"]

    assert main([str(a) for a in argv(tmp_path / "single", tmp_path / "c1")]) == 0
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "vlprompt", *map(str, argv(tmp_path / "dist", tmp_path / "c2"))],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = load_file(str(tmp_path / "single" / "prompt.safetensors"))
    dist = load_file(str(tmp_path / "dist" / "prompt.safetensors"))
    start = build_method("maple", {"depth": 2}, load_backbone(str(cfg), str(weights), "cpu"),
                         ["a", "b"]).learned_state()["prompt.ctx"]  # the words' embeddings, as the runs started
    assert set(single) == set(dist)
    for k in single:
        torch.testing.assert_close(dist[k], single[k], rtol=0, atol=2e-5, msg=k)
    assert float((single["prompt.ctx"] - start).abs().max()) > 1e-3  # the steps moved it
    results = json.loads((tmp_path / "dist" / "results.json").read_text())
    assert results["world_size"] == 2 and results["train"]["steps"] == 4


def tower_backbone(directory: Path, text_layers: int, vision_layers: int):
    """A ViT CLIP whose towers differ in depth and width (ViT-L/14 has 24 vision blocks and 12 text ones)."""
    import open_clip

    cfg = {"embed_dim": 48, "vision_cfg": {"image_size": 32, "layers": vision_layers, "width": 96, "patch_size": 8,
                                           "head_width": 32},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": text_layers}}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "m.json").write_text(json.dumps(cfg))
    torch.manual_seed(2)
    model = open_clip.CLIP(**cfg)
    from vlprompt.testing import sharpen_

    sharpen_(model)
    torch.save(model.state_dict(), directory / "m.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_backbone(str(directory / "m.json"), str(directory / "m.pt"), "cpu")


def test_towers_of_other_depths_and_widths_are_read_from_the_model(tmp_path):
    bb = tower_backbone(tmp_path, text_layers=2, vision_layers=3)
    with pytest.raises(ConfigError, match=r"\(2 text, 3 image\): at most 2"):
        _build(bb, depth=3)
    learned, fixed = _original(bb, 2, 2, "a photo of a", seed=9)
    method = _build(bb, depth=2)
    method.load_learned_state(to_ours(learned))
    method.eval()
    images = _images(3, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(method(Features(images=images)), orig.maple_logits(bb.model, learned, fixed, images),
                                   rtol=0, atol=1e-6 * bb.logit_scale)
    assert (method.text_width, method.vision_width) == (64, 96)
