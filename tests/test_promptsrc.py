"""PromptSRC: its loss terms and gradients equal the original's (tests/originals/promptsrc.py) on the same weights,
with the frozen image features read from the cache (the very view the prompted tower sees); the 60-template
teacher averaged before normalising; Gaussian prompt aggregation of the learned prompts only, equal to the
original's weighted sum and resumable bit for bit after SIGKILL; the recipes as presets; bad options and ResNets
refused; train / eval on new classes / export / predict / import of an original checkpoint through the CLI."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from originals import promptsrc as original
from towers_helpers import (NAMES, assert_gradients_equal, assert_varies, cli, images, method_gradients,
                            randomise, to_original, tower_backbone, tower_folder, write_dassl_log)
from vlprompt.errors import BackboneError, CheckpointError, ConfigError
from vlprompt.methods import build_method
from vlprompt.methods.base import Batch, Features
from vlprompt.methods.towers.promptsrc import TEACHER_TEMPLATES, gpa_weights
from vlprompt.runs.config import resolve

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    return tower_backbone(tmp_path_factory.mktemp("src_model"))


@pytest.fixture(scope="module")
def bb(towers):
    return towers[0]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tower_folder(tmp_path_factory.mktemp("src_data") / "things")


def test_loss_terms_and_gradients_equal_the_original_with_cached_frozen_features(bb):
    method = build_method("promptsrc", {"text_depth": 3, "vision_depth": 3}, bb, NAMES)
    randomise(method)
    x, y = images(), torch.tensor([0, 1, 2, 0])
    # the frozen tower's features of the same images, as the cache holds them (PairedViews)
    out = method.training_step(Batch(Features(images=x, global_=bb.encode_image(x)), y))
    learned = {k: v.detach().clone().requires_grad_() for k, v in to_original(method.learned_state()).items()}
    _, fixed = original.init_promptsrc(bb.model, NAMES, depth_text=3, depth_vision=3)
    ref = original.promptsrc_forward(bb.model, learned, fixed, x, original.teacher_text_features(bb.model, NAMES))
    assert_varies(ref["logits"].detach()) and assert_varies(ref["zs_logits"])
    terms = original.loss_terms(ref, y)
    for name in ("ce", "scl_text", "scl_image", "scl_logits"):
        assert float(terms[name].detach()) > 1e-3, name  # every term is there to be compared
        torch.testing.assert_close(out.parts[name], terms[name].detach(), rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(out.loss.detach(), terms["loss"].detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.logits.detach(), ref["logits"].detach(), rtol=0, atol=1e-6 * bb.logit_scale)
    ref_grads = dict(zip(learned, torch.autograd.grad(terms["loss"], list(learned.values()))))
    assert_gradients_equal(method_gradients(method, out.loss), ref_grads)


def test_teacher_is_the_mean_of_the_60_templates_unnormalised_features(bb):
    assert list(TEACHER_TEMPLATES) == original.IMAGENET_TEMPLATES
    method = build_method("promptsrc", {"text_depth": 2, "vision_depth": 2}, bb, NAMES)
    teacher = method.teacher_text()
    torch.testing.assert_close(teacher, F.normalize(original.teacher_text_features(bb.model, NAMES), dim=-1),
                               rtol=0, atol=1e-6)
    method.set_classnames(NAMES[:2])  # another class list: a new teacher
    assert method.teacher_text().shape == (2, bb.embed_dim)


def test_gaussian_prompt_aggregation_is_the_originals_weighted_sum_of_the_prompts_only(bb):
    """After each epoch the learned prompts times w_e are summed (in the original's order); after the last epoch
    the prompts are that sum; the running sum is the method's training state."""
    assert gpa_weights(20, 15, 1) == pytest.approx(original.gpa_weights(20, 15, 1), rel=1e-12, abs=1e-300)
    assert gpa_weights(50, 45, 5) == pytest.approx(original.gpa_weights(50, 45, 5), rel=1e-12)
    assert abs(sum(gpa_weights(1, 45, 1)) - 1) < 1e-12  # far from the mean: no 0 / 0
    method = build_method("promptsrc", {"text_depth": 2, "vision_depth": 2, "gpa_mean": 2.0, "gpa_std": 1.5},
                          bb, NAMES)
    epochs, states = 4, []
    g = torch.Generator().manual_seed(0)
    for epoch in range(1, epochs + 1):
        with torch.no_grad():
            for p in method.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g))  # the epoch's training
        states.append({k: v.clone() for k, v in method.learned_state().items()})
        method.on_train_epoch_end(epoch, epochs)
        if epoch == 2:
            saved = method.training_state()
            assert set(saved) == {f"gpa.{k}" for k in method.learned_state()}
    expected = original.gpa_average(states, original.gpa_weights(epochs, 2.0, 1.5))
    for k, v in method.learned_state().items():
        torch.testing.assert_close(v, expected[k], rtol=0, atol=0)  # bit for bit: the same arithmetic
    other = build_method("promptsrc", {"text_depth": 2, "vision_depth": 2}, bb, NAMES)
    other.load_training_state(saved)
    assert all(torch.equal(other.training_state()[k], saved[k]) for k in saved)
    with pytest.raises(CheckpointError, match="running sum"):
        other.load_training_state({"gpa.unknown": torch.zeros(1)})


def test_resnet_towers_and_bad_options_are_refused(bb, tiny_rn):
    with pytest.raises(BackboneError) as e:
        build_method("promptsrc", {"text_depth": 2, "vision_depth": 2}, tiny_rn, NAMES)
    assert "\n" not in str(e.value) and "promptsrc needs deep vision" in str(e.value)
    for options, message in (({"vision_depth": 0}, "must be >= 1"), ({"gpa_std": 0.0}, "must be > 0"),
                             ({"text_loss_weight": -1.0}, "must be >= 0"), ({"gpa_mean": float("nan")}, "finite"),
                             ({"text_depth": 7}, "exceeds the 4 layers of the text tower")):
        with pytest.raises(ConfigError, match=message):
            build_method("promptsrc", {"text_depth": 2, "vision_depth": 2, **options}, bb, NAMES)


@pytest.mark.parametrize("dataset, classes, shots, expected", [
    # configs/trainers/PromptSRC/vit_b16_c2_ep20_batch4_4+4ctx.yaml: depth 9/9, 20 epochs, GPA 15/1 (l.38-43)
    ("dtd", "base", 16, (9, 20, 15.0, 1.0)),
    # ..._cross_datasets.yaml: depth 3/3, GPA 6/10; ImageNet, all classes, 16 shots (scripts/promptsrc/reproduce_xd.sh)
    ("imagenet", "all", 16, (3, 20, 6.0, 10.0)),
    # ..._few_shot.yaml: 50 epochs, GPA 30/30 (l.42-44), 45/5 for Cars, Flowers, Aircraft, DTD, EuroSAT (l.45-47)
    ("imagenet", "all", 4, (9, 50, 30.0, 30.0)),
    ("caltech101", "all", 16, (9, 50, 30.0, 30.0)),
    ("dtd", "all", 1, (9, 50, 45.0, 5.0)),
    ("eurosat", "all", 8, (9, 50, 45.0, 5.0)),
])
def test_presets_are_the_published_configs(tmp_path, dataset, classes, shots, expected):
    cfg = resolve({"method": "promptsrc", "data": {"dataset": dataset, "root": str(tmp_path), "shots": shots,
                                                   "classes": classes}})
    o, t = cfg.method_options, cfg.train
    assert (o["text_depth"], t.epochs, o["gpa_mean"], o["gpa_std"]) == expected
    assert o["vision_depth"] == o["text_depth"]
    # every config: 4 + 4 prompts from "a photo of a" (all four words learned), weights 25 / 10 (l.34-41),
    # SGD lr 0.0025, warm-up, batch 4 (l.4, l.16-24); momentum / weight decay: Dassl's defaults
    assert (o["n_ctx"], o["n_ctx_vision"], o["init"], o["text_loss_weight"], o["image_loss_weight"]) == (
        4, 4, "a photo of a", 25.0, 10.0)
    assert (t.optimizer, t.lr, t.batch_size, t.momentum, t.weight_decay, t.warmup_epochs, t.warmup_lr) == (
        "sgd", 0.0025, 4, 0.9, 5e-4, 1, 1e-5)
    assert t.views == 10  # the frozen features of cached views, paired with the images of the same views


# -- the command line -------------------------------------------------------------------------------------------
def _common(files, folder, cache):
    return ["--backbone", files[0], "--pretrained", files[1], "--dataset", "folder", "--root", folder,
            "--cache-dir", cache, "--quiet"]


def test_cli_trains_evaluates_new_classes_exports_predicts_and_imports(towers, folder, tmp_path, capsys):
    bb, files = towers
    common = _common(files, folder, tmp_path / "cache")
    run = tmp_path / "run"
    res = json.loads(cli(["train", "--method", "promptsrc", *common, "--classes", "base", "--shots", "2",
                          "--epochs", "2", "--views", "2", "--text-depth", "3", "--vision-depth", "2",
                          "--output", run], capsys)[0])
    record = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"loss_ce", "loss_scl_text", "loss_scl_image", "loss_scl_logits"} <= set(record[0])
    assert res["train"]["steps"] == 2
    b2n = json.loads(cli(["eval", run, "--dataset", "folder", "--root", folder, "--base-to-new", "--quiet"],
                         capsys)[0])
    assert 0 <= b2n["new"] <= 100
    cli(["export", run, "--output", tmp_path / "head"], capsys)
    image = sorted(Path(folder).rglob("*.jpg"))[0]
    assert len(json.loads(cli(["predict", tmp_path / "head", image, "--json"], capsys)[0])[0]["top"]) == 2
    # an original run: <output>/VLPromptLearner/model.pth.tar-20, the GPA-averaged CustomCLIP (fp16 CLIP, fp16 ctx,
    # the ZS image encoder), its yacs config in log.txt
    from vlprompt.data import load_dataset

    base = load_dataset("folder", str(folder)).classnames[:2]
    learned, fixed = original.init_promptsrc(bb.model, base, generator=torch.Generator().manual_seed(2))
    learned = {k: (v if k == "prompt_learner.ctx" else torch.randn(v.shape) * 0.3) for k, v in learned.items()}
    source = tmp_path / "source"
    original.write_original_checkpoint(source, {**learned, **fixed}, bb.model, epoch=20)
    write_dassl_log(source, original.dassl_config("base2new", dataset="Things", shots=2, subsample="base"))
    out = tmp_path / "imported"
    res = json.loads(cli(["import", source, "--from", "promptsrc", *common, "--classes", "base", "--output", out],
                         capsys)[0])
    opts = res["config"]["method_options"]
    assert (opts["text_depth"], opts["vision_depth"], opts["gpa_mean"], opts["text_loss_weight"]) == (4, 4, 15, 25)
    import vlprompt
    from vlprompt.data import load_image
    from vlprompt.runs import transforms_for
    from originals import ivlp

    method, _, backbone = vlprompt.load_method(out)
    tf = transforms_for("coop", backbone)[1]
    x = torch.stack([tf(load_image(str(p))) for p in sorted(Path(folder).rglob("*.jpg"))[:3]])
    saved = {k: (v.half().float() if k == "prompt_learner.ctx" else v) for k, v in learned.items()}
    with torch.no_grad():  # evaluation: the prompted logits (the original's eval forward is IVLP's)
        torch.testing.assert_close(method(Features(images=x)), ivlp.ivlp_logits(backbone.model, saved, fixed, x),
                                   rtol=0, atol=1e-6 * backbone.logit_scale)


def _subprocess(args, env):
    return subprocess.Popen([sys.executable, "-m", "vlprompt", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def test_prompt_aggregation_resumes_bit_for_bit_after_sigkill(towers, folder, tmp_path):
    """The running sum of the prompts spans the epochs: a run killed after some epochs and resumed ends with the
    very prompts of an uninterrupted run."""
    from safetensors.torch import load_file

    _, files = towers
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1"}

    def args(out):
        return ["train", "--method", "promptsrc", *_common(files, folder, tmp_path / "cache"), "--classes", "base",
                "--shots", "2", "--views", "2", "--epochs", "30", "--batch-size", "4", "--text-depth", "2",
                "--vision-depth", "2", "--gpa-mean", "15", "--gpa-std", "8", "--output", out,
                "--threads", "1"]  # tiny steps: one thread is many times faster on a shared machine

    full = _subprocess(args(tmp_path / "full"), env)
    _, err = full.communicate(timeout=600)
    assert full.returncode == 0, err
    victim = _subprocess(args(tmp_path / "killed"), env)
    pointer = tmp_path / "killed" / "checkpoints" / "latest.json"
    deadline = time.time() + 400
    while time.time() < deadline and victim.poll() is None:
        if pointer.exists() and json.loads(pointer.read_text())["epoch"] >= 3:
            break
        time.sleep(0.02)
    assert victim.poll() is None, "the run finished before it could be killed"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    resumed = _subprocess([*args(tmp_path / "killed"), "--resume"], env)
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    a = load_file(str(tmp_path / "full" / "prompt.safetensors"))
    b = load_file(str(tmp_path / "killed" / "prompt.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    log = (tmp_path / "killed" / "log.txt").read_text()
    assert "resumed from" in log


def test_published_numbers_are_the_readmes_and_join_only_runs_of_the_recipe():
    """The MaPLe and PromptSRC READMEs' 11-dataset base-to-new averages, each bound to its method's config."""
    from vlprompt.papers import load_papers, matches

    b2n = {(n.paper, n.method, n.metric): n for n in load_papers() if n.protocol == "base2new"
           and n.dataset == "average11" and n.method in ("ivlp", "deep-language", "vpt", "promptsrc")}
    table = {("MaPLe baselines", "vpt"): (80.24, 73.43, 76.68),
             ("MaPLe baselines", "deep-language"): (81.72, 73.81, 77.56),
             ("MaPLe baselines", "ivlp"): (82.15, 74.07, 77.90), ("PromptSRC", "ivlp"): (84.21, 71.79, 77.51),
             ("PromptSRC", "promptsrc"): (84.26, 76.10, 79.97)}
    for (paper, method), values in table.items():
        got = tuple(b2n[paper, method, m].value for m in ("base", "new", "harmonic_mean"))
        assert got == values
        assert 2 * got[0] * got[1] / (got[0] + got[1]) == pytest.approx(got[2], abs=0.006)
    n = b2n["PromptSRC", "promptsrc", "base"]
    identity = {"method_options.n_ctx": 4, "method_options.n_ctx_vision": 4, "method_options.text_depth": 9,
                "method_options.vision_depth": 9, "method_options.init": "a photo of a",
                "method_options.text_loss_weight": 25.0, "method_options.image_loss_weight": 10.0,
                "method_options.gpa_mean": 15.0, "method_options.gpa_std": 1.0, "train.epochs": 20,
                "train.lr": 0.0025, "train.batch_size": 4}
    kw = dict(method="promptsrc", dataset="average11", protocol="base2new", backbone="ViT-B-16-quickgelu",
              pretrained="openai", shots=16, metric="base")
    assert matches(n, **kw, flat_identity=identity)
    assert not matches(n, **kw, flat_identity={**identity, "method_options.gpa_std": 2.0})
    assert not matches(n, **kw, flat_identity={**identity, "train.epochs": 5})
    # the two IVLP recipes are two numbers, each joining its own runs
    mpl, src = b2n["MaPLe baselines", "ivlp", "base"], b2n["PromptSRC", "ivlp", "base"]
    ivlp_src = {k: v for k, v in identity.items() if "loss" not in k and "gpa" not in k}
    kw["method"] = "ivlp"
    assert matches(src, **kw, flat_identity=ivlp_src) and not matches(mpl, **kw, flat_identity=ivlp_src)


def test_grid_protocols_give_each_cell_its_papers_config():
    from vlprompt.grid.presets import read_preset
    from vlprompt.grid.spec import expand, load_preset, resolve_cells

    def cells(name):
        spec = load_preset(name)
        spec.set_value("data.root", "/data", "--root")
        return {c.name: c.config for c in resolve_cells(expand(spec))}

    few = cells("promptsrc-fewshot")
    assert len(few) == 165
    imagenet16, imagenet4 = few["promptsrc/imagenet/shots16/seed1"], few["promptsrc/imagenet/shots4/seed1"]
    for cfg in (imagenet16, imagenet4):  # the few-shot config, also where the preset gives the cross-dataset one
        assert (cfg.method_options["text_depth"], cfg.method_options["gpa_mean"], cfg.train.epochs) == (9, 30.0, 50)
    assert few["promptsrc/dtd/shots1/seed2"].method_options["gpa_std"] == 5.0
    b2n = cells("promptsrc-base2new")
    ivlp = b2n["ivlp/dtd/seed1"]  # PromptSRC's IVLP baseline, not the MaPLe paper's
    assert (ivlp.method_options["n_ctx"], ivlp.method_options["vision_depth"], ivlp.train.epochs, ivlp.train.lr) == (
        4, 9, 20, 0.0025)
    assert b2n["promptsrc/dtd/seed1"].method_options["gpa_mean"] == 15.0
    xd = cells("promptsrc-cross-dataset")["promptsrc/imagenet/seed1"]
    assert (xd.method_options["text_depth"], xd.method_options["gpa_std"], xd.data.classes) == (3, 10.0, "all")
    mpl = cells("maple-baselines-base2new")
    assert mpl["vpt/eurosat/seed3"].method_options["n_ctx_vision"] == 8 and mpl["ivlp/dtd/seed1"].train.epochs == 5
    assert "README" in read_preset("promptsrc-base2new")["description"]


# Reduction order differs between one process and two ranks (each rank sums its slice of the batch, the text tower
# encodes each rank's share of the classes, the gradients are summed over the ranks): after 6 SGD steps with the
# prompts averaged over 3 epochs, the learned prompts agree with one process to 4.1e-6 (measured) where training
# moved them by 2.65; float32 rounding, amplified by the steps.
DIST_ATOL = 2e-5


def test_two_rank_torchrun_learns_the_single_process_prompts(towers, folder, tmp_path, capsys):
    """torchrun with 2 CPU processes (gloo): each rank runs the prompted image tower on its slice of every batch and
    encodes its share of the class prompts; the prompts (aggregated over the epochs) equal one process's."""
    from safetensors.torch import load_file

    _, files = towers

    def args(out, *extra):
        return ["train", "--method", "promptsrc", *_common(files, folder, tmp_path / "cache"), "--classes", "base",
                "--shots", "4", "--allow-fewer", "--views", "2", "--epochs", "3", "--batch-size", "4", "--lr", "0.05",
                "--text-depth", "3", "--vision-depth", "3", "--gpa-mean", "2", "--gpa-std", "1", "--output", out,
                *extra]

    cli(args(tmp_path / "single"), capsys)
    cli(args(tmp_path / "init", "--epochs", "0"), capsys)
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "vlprompt",
           *map(str, args(tmp_path / "dist"))]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single, dist, init = (load_file(str(tmp_path / d / "prompt.safetensors")) for d in ("single", "dist", "init"))
    moved = max(float((single[k] - init[k]).abs().max()) for k in single)
    diff = max(float((dist[k] - single[k]).abs().max()) for k in single)
    assert moved > 1000 * DIST_ATOL and diff <= DIST_ATOL, (diff, moved)
    one, two = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("single", "dist"))
    assert (one["world_size"], two["world_size"]) == (1, 2) and two["train"]["steps"] == one["train"]["steps"] == 6
    # the loss of a batch split over ranks: a mean of the same per-image losses, computed through GEMMs of other row
    # counts (other float rounding): fp32's relative tolerance
    assert two["train"]["final_loss"] == pytest.approx(one["train"]["final_loss"], rel=1e-5)
