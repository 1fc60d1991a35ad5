"""The method lifecycle: a method defined outside vlprompt for each hook -- setup from the training features,
on_before_optimizer_step with the gradient of a loss kept out of the update, on_train_epoch_end with state that
survives SIGKILL + --resume bit for bit, after_training searching on the validation split -- trains, evaluates,
exports and predicts through the CLI, registered by one entry point of an installed package (or
``register_method``) and nothing else; and the Python API the docs use."""
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

from conftest import color_folder
from lifecycle_methods import METHODS, TEMPERATURES, ClassMeans, ProjectedGradient
from vlprompt.cli import main
from vlprompt.methods import register_method, unregister_method
from vlprompt.methods.base import Batch, Features
from vlprompt.testing import make_tiny_checkpoint

TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src"


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("lifecycle_models"), "tiny-vit", seed=3, sharpen=True)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return color_folder(tmp_path_factory.mktemp("lifecycle_data") / "shapes")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("lifecycle_cache"))


@pytest.fixture()
def registered():
    for name, cls in METHODS.items():
        register_method(name, cls)
    yield
    for name in METHODS:
        unregister_method(name)


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory):
    """A package installed the way pip leaves one (a dist-info with entry points) declaring the test methods."""
    root = tmp_path_factory.mktemp("plugin")
    info = root / "vlprompt_test_methods-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: vlprompt-test-methods\nVersion: 0.1\n")
    lines = [f"{name} = lifecycle_methods:{cls.__name__}" for name, cls in METHODS.items()]
    (info / "entry_points.txt").write_text("[vlprompt.methods]\n" + "\n".join(lines) + "\n")
    return os.pathsep.join([str(SRC), str(TESTS), str(root)])


def _common(model_files, folder, cache_dir):
    cfg, weights = model_files
    return ["--backbone", str(cfg), "--pretrained", str(weights), "--dataset", "folder", "--root", str(folder),
            "--cache-dir", cache_dir, "--quiet"]


def _main(argv, capsys):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return out


def _cli(args, pythonpath):
    env = {**os.environ, "PYTHONPATH": pythonpath, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "vlprompt", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def test_an_installed_package_registers_methods_by_entry_point(plugin_path):
    p = _cli(["methods", "--json"], plugin_path)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    rows = {r["name"]: r for r in json.loads(out)}
    assert set(METHODS) <= set(rows)
    assert rows["test-class-means"]["family"] == "test" and rows["test-class-means"]["trains"] is False
    assert rows["test-class-means"]["setup_reads"] == ["train", "train_views"]


@pytest.mark.parametrize("name", sorted(METHODS))
def test_each_hook_method_trains_evaluates_exports_and_predicts_through_the_cli(
        name, registered, model_files, folder, cache_dir, tmp_path, capsys):
    out = tmp_path / "run"
    views = [] if name == "test-class-means" else ["--views", "2"]  # (it does not train: no training views)
    res = json.loads(_main(["train", "--method", name, *_common(model_files, folder, cache_dir), "--shots", "2",
                            *views, "--output", out], capsys))
    assert res["method"] == name and 0 <= res["metrics"]["accuracy"] <= 100
    ev = json.loads(_main(["eval", out, "--dataset", "folder", "--root", folder, "--cache-dir", cache_dir,
                           "--quiet"], capsys))
    assert ev["metrics"]["accuracy"] == pytest.approx(res["metrics"]["accuracy"])  # the same test split
    _main(["export", out, "--output", tmp_path / "head"], capsys)
    image = next(p for p in sorted(Path(folder).rglob("*.jpg")))
    pred = json.loads(_main(["predict", tmp_path / "head", image, "--topk", "2", "--json"], capsys))
    assert len(pred[0]["top"]) == 2
    if name == "test-class-means":
        assert res["setup"] == {"images": 6} and "train" not in res  # 3 classes x 2 shots, nothing trained
    if name == "test-projected-gradient":
        from vlprompt.engine.checkpoint import load_latest_checkpoint

        _, _, _, state = load_latest_checkpoint(out)
        assert int(state["method"]["projections"]) > 0  # the hook ran, its state is in the checkpoint
        assert {"loss_ce", "loss_anchor"} <= set(_records(out)[0])  # named loss terms, logged per epoch
    if name == "test-temperature-search":
        after = res["after_training"]
        assert after["temperature"] in TEMPERATURES and after["val_images"] == 3 * 2  # the val split only
        assert after["temperature"] == TEMPERATURES[min(range(5), key=after["losses"].__getitem__)]


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_setup_reads_the_cached_features_and_views(registered, model_files, folder, cache_dir, tmp_path, capsys):
    from safetensors.torch import load_file

    from vlprompt.backbone import load_backbone
    from vlprompt.backbone.cache import FeatureCache
    from vlprompt.data import load_split, transform_id
    from vlprompt.runs import transforms_for

    runs = {}
    for views in (False, True):
        out = tmp_path / f"views-{views}"
        extra = ["--method-option", "views=true"] if views else []
        runs[views] = json.loads(_main(["train", "--method", "test-class-means",
                                        *_common(model_files, folder, cache_dir), "--shots", "2", *extra,
                                        "--output", out], capsys))
        means = load_file(str(out / "prompt.safetensors"))["means"]
        backbone = load_backbone(str(model_files[0]), str(model_files[1]), "cpu")
        train_tf, test_tf = transforms_for("coop", backbone)
        samples = load_split(out / "split.json").train
        paths, labels = [s.path for s in samples], torch.tensor([s.label for s in samples])
        cache = FeatureCache(cache_dir, progress=False)
        if views:  # views 0..2 of the train augmentation, as setup_views says
            feats = torch.cat([cache.get(backbone, paths, train_tf, transform_id=transform_id(train_tf), view=v)
                               .global_ for v in range(3)])
            labels = labels.repeat(3)
        else:
            feats = cache.get(backbone, paths, test_tf, transform_id=transform_id(test_tf)).global_
        expected = F.normalize(torch.zeros(3, feats.shape[1]).index_add_(0, labels, F.normalize(feats, dim=-1)),
                               dim=-1)
        torch.testing.assert_close(means, expected, rtol=0, atol=1e-6)
    assert runs[True]["setup"] == {"images": 18}


def test_hook_sees_both_gradients_after_backward_and_before_the_step(tiny_vit, tmp_path):
    """The trainer's step equals the rule written out: CE gradient projected off the anchor loss's gradient,
    then plain SGD -- so the hook ran after backward, saw the anchor loss's own gradient, and before the step."""
    from vlprompt.engine.sources import CachedViews
    from vlprompt.engine.trainer import TrainConfig, Trainer

    classes = ["a", "b", "c"]
    feats = torch.randn(1, 12, tiny_vit.embed_dim, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(12) % 3
    cfg = TrainConfig(epochs=2, batch_size=12, lr=0.5, momentum=0.0, weight_decay=0.0, warmup_epochs=0,
                      scheduler="constant")
    method = ProjectedGradient(ProjectedGradient.config_class(), tiny_vit, classes)
    manual = ProjectedGradient(ProjectedGradient.config_class(), tiny_vit, classes)
    Trainer(method, cfg, tmp_path, seed=0, progress=False).fit(CachedViews(feats), labels)
    emb = manual.emb
    projected = 0
    for _ in range(2):  # one full batch per epoch; the order of images does not change the mean loss
        logits = manual(Features(global_=feats[0]))
        ce = F.cross_entropy(logits, labels)
        anchor = (emb - manual.anchor).pow(2).mean()
        g_anchor, = torch.autograd.grad(anchor, emb, retain_graph=True)
        g_ce, = torch.autograd.grad(ce, emb)
        dot = (g_ce * g_anchor).sum()
        if dot < 0:
            g_ce = g_ce - dot / g_anchor.pow(2).sum() * g_anchor
            projected += 1
        with torch.no_grad():
            emb -= 0.5 * g_ce
    assert projected > 0, "the anchor never conflicted: the test would not see the projection"
    torch.testing.assert_close(method.emb.detach(), emb.detach(), rtol=1e-5, atol=1e-7)
    assert int(method.projections) == projected


def _train_args(model_files, folder, cache_dir, out):
    return ["train", "--method", "test-epoch-average", *_common(model_files, folder, cache_dir), "--shots", "2",
            "--views", "2", "--epochs", "12", "--batch-size", "2", "--output", out]


def test_epoch_state_survives_sigkill_and_resume_bit_for_bit(plugin_path, model_files, folder, cache_dir, tmp_path):
    from safetensors.torch import load_file

    full = _cli(_train_args(model_files, folder, cache_dir, tmp_path / "full"), plugin_path)
    _, err = full.communicate(timeout=300)
    assert full.returncode == 0, err
    victim = _cli(_train_args(model_files, folder, cache_dir, tmp_path / "killed"), plugin_path)
    pointer = tmp_path / "killed" / "checkpoints" / "latest.json"
    deadline = time.time() + 240
    while time.time() < deadline and victim.poll() is None:
        if pointer.exists() and json.loads(pointer.read_text())["epoch"] >= 3:
            break
        time.sleep(0.02)
    assert victim.poll() is None, "the run finished before it could be killed"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    resumed = _cli([*_train_args(model_files, folder, cache_dir, tmp_path / "killed"), "--resume"], plugin_path)
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    a = load_file(str(tmp_path / "full" / "prompt.safetensors"))["emb"]
    b = load_file(str(tmp_path / "killed" / "prompt.safetensors"))["emb"]
    assert torch.equal(a, b)  # the average over all 12 epochs, the first ones from before the kill
    assert len(_records(tmp_path / "killed")) == 12


def test_python_api_builds_steps_evaluates_and_loads(tiny_vit, registered, model_files, folder, cache_dir,
                                                     tmp_path, capsys):
    import vlprompt

    method = vlprompt.build_method("coop", {"n_ctx": 4}, tiny_vit, ["cat", "dog", "bird"])
    ctx = method.learned_tensor("prompt.ctx")
    assert ctx.shape == (1, 1, 4, tiny_vit.text.width)
    method.set_learned_tensor("prompt.ctx", torch.zeros_like(ctx))
    assert float(method.learned_tensor("prompt.ctx").abs().sum()) == 0
    with pytest.raises(KeyError, match="prompt.ctx"):
        method.learned_tensor("ctx")
    feats = Features(global_=torch.randn(6, tiny_vit.embed_dim, generator=torch.Generator().manual_seed(0)))
    out = method.training_step(Batch(feats, torch.tensor([0, 1, 2, 0, 1, 2])))
    assert out.logits.shape == (6, 3) and set(out.parts) == {"ce"} and out.loss.requires_grad
    out.loss.backward()
    assert method.prompt.ctx.grad is not None
    method.eval()
    with torch.no_grad():
        logits = method(feats)
    assert logits.shape == (6, 3)
    run_dir = tmp_path / "run"
    _main(["train", "--method", "test-class-means", *_common(model_files, folder, cache_dir), "--shots", "2",
           "--output", run_dir], capsys)
    loaded, meta, _ = vlprompt.load_method(run_dir)
    assert isinstance(loaded, ClassMeans) and meta["method"] == "test-class-means"
