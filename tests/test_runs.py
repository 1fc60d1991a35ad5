"""The experiment layer (vlprompt.runs): one resolution for the CLI, the Python API and config files; refusals
before anything is written; run directories that never lose a user's files; a method registered by a test runs
train / eval / export / predict through the CLI without touching any other file."""
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from torch import nn

from conftest import color_folder
from vlprompt.cli import main
from vlprompt.errors import ConfigError
from vlprompt.methods import register_method, unregister_method
from vlprompt.methods.base import Method, MethodConfig, cosine_logits, opt
from vlprompt.runs import resolve, run
from vlprompt.testing import make_tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("runs_models"), "tiny-vit", seed=2)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A folder dataset of 3 classes x 10 generated images (split 5 / 2 / 3 per class by the folder reader)."""
    return color_folder(tmp_path_factory.mktemp("runs_data") / "shapes")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("runs_cache"))


def _common(model_files, folder, cache_dir):
    cfg, weights = model_files
    return ["--backbone", str(cfg), "--pretrained", str(weights), "--dataset", "folder", "--root", str(folder),
            "--cache-dir", cache_dir, "--quiet"]


def _request(model_files, folder, cache_dir, method="coop", **data):
    cfg, weights = model_files
    return {"method": method, "backbone": str(cfg), "pretrained": str(weights), "cache_dir": cache_dir,
            "data": {"dataset": "folder", "root": str(folder), **data}}


def _main(argv, capsys):
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


# -- resolution --------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags, names", [
    (["--epochs", "-1"], "--epochs"), (["--shots", "-1"], "--shots"), (["--lr", "-1"], "--lr"),
    (["--batch-size", "-1"], "--batch-size"), (["--device", "gpu0"], "--device"), (["--n-ctx", "0"], "--n-ctx"),
    (["--views", "3", "--online"], "--views"), (["--cache-dtype", "float16", "--online"], "--cache-dtype"),
    (["--seed", "-3"], "--seed"),
    (["--optimizer", "lbfgs"], "--optimizer"), (["--warmup-epochs", "5", "--epochs", "2"], "warmup_epochs"),
    (["--method-option", "n_ctx=4", "--n-ctx", "4"], "n_ctx"), (["--method-option", "bogus=1"], "bogus"),
])
def test_out_of_range_or_meaningless_options_are_one_line_exit_2_and_write_nothing(
        flags, names, model_files, folder, cache_dir, tmp_path, capsys):
    out_dir = tmp_path / "run"
    rc, out, err = _main(["train", "--method", "coop", *_common(model_files, folder, cache_dir), "--shots", "2",
                          "--output", str(out_dir), *flags], capsys)
    assert rc == 2, err
    assert names in err and err.startswith("vlprompt: error:") and err.count("\n") == 1, err
    assert "Traceback" not in err
    assert not out_dir.exists()  # refused before anything was written


def test_cuda_device_without_a_gpu_is_refused(model_files, folder, cache_dir, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    rc, _, err = _main(["zeroshot", *_common(model_files, folder, cache_dir), "--device", "cuda",
                        "--output", str(tmp_path / "z")], capsys)
    assert rc == 2 and "--device cuda" in err and "no CUDA GPU" in err


def test_seed_zero_is_seed_zero(model_files, folder, cache_dir):
    cfg = resolve({**_request(model_files, folder, cache_dir, shots=2), "seed": 0})
    assert cfg.seed == 0
    assert resolve(_request(model_files, folder, cache_dir, shots=2)).seed == 1


def test_options_that_do_not_apply_are_refused(model_files, folder, cache_dir):
    zs = _request(model_files, folder, cache_dir, method="zeroshot")
    with pytest.raises(ConfigError, match="--seed does not apply"):
        resolve({**zs, "seed": 3})
    with pytest.raises(ConfigError, match="--shots must be 0"):
        resolve({**zs, "data": {**zs["data"], "shots": 4}})
    with pytest.raises(ConfigError, match="epochs"):
        resolve({**zs, "train": {"epochs": 3}})
    with pytest.raises(ConfigError, match="unknown option"):
        resolve({**zs, "learning_rate": 3})
    with pytest.raises(ConfigError, match="unknown option"):
        resolve({**zs, "data": {**zs["data"], "shot": 3}})
    with pytest.raises(ConfigError, match="--views 4 does not apply"):
        resolve({**_request(model_files, folder, cache_dir), "train": {"views": 4, "augment": False}})


def test_resolved_config_records_what_does_not_apply(model_files, folder, cache_dir):
    cfg = resolve({**_request(model_files, folder, cache_dir), "train": {"online": True, "epochs": 1}})
    assert cfg.train.views is None  # config.yaml says the option was not used, instead of showing a default
    assert resolve(_request(model_files, folder, cache_dir, method="zeroshot")).train is None


def test_config_file_flags_override_and_round_trip(model_files, folder, cache_dir, tmp_path, capsys):
    req = _request(model_files, folder, cache_dir, shots=2)
    req["train"] = {"epochs": 3, "lr": 0.01}
    req["method_options"] = {"n_ctx": 4}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(req))
    rc, out, err = _main(["train", "--config", str(path), "--lr", "0.05", "--show-config"], capsys)
    assert rc == 0, err
    shown = yaml.safe_load(out)
    assert shown["train"]["lr"] == 0.05 and shown["train"]["epochs"] == 3 and shown["method_options"]["n_ctx"] == 4
    # the resolved config.yaml resolves to itself
    (tmp_path / "resolved.yaml").write_text(out)
    rc, out2, _ = _main(["train", "--config", str(tmp_path / "resolved.yaml"), "--show-config"], capsys)
    assert rc == 0 and out2 == out


def test_python_api_and_cli_give_the_same_config(model_files, folder, cache_dir, capsys):
    """The README's Python example and the CLI resolve to the same config.yaml, method by method."""
    import vlprompt

    cfg, weights = model_files
    cases = {
        "coop": ([], {}),
        "cocoop": ([], {}),
        "plot": (["--n-prompts", "2"], {"method_options": {"n_prompts": 2}}),
        "ordinalclip": (["--init", "the age of the person is"],
                        {"method_options": {"init": "the age of the person is"}}),
    }
    for method, (flags, extra) in cases.items():
        argv = ["train", "--method", method, *_common(model_files, folder, cache_dir), "--shots", "4", "--seed",
                "2", *flags, "--show-config"]
        rc, out, err = _main(argv, capsys)
        assert rc == 0, (method, err)
        request = {"method": method, "backbone": str(cfg), "pretrained": str(weights), "seed": 2,
                   "cache_dir": cache_dir, "data": {"dataset": "folder", "root": str(folder), "shots": 4}, **extra}
        assert vlprompt.show_config(request) == out, method


# -- run directories ------------------------------------------------------------------------------------
def test_force_never_clears_a_directory_that_is_not_a_run(model_files, folder, cache_dir, tmp_path, capsys):
    precious = tmp_path / "work"
    precious.mkdir()
    (precious / "thesis.tex").write_text("months of work")
    rc, _, err = _main(["zeroshot", *_common(model_files, folder, cache_dir), "--output", str(precious), "--force"],
                       capsys)
    assert rc == 2 and "not a vlprompt run" in err
    assert (precious / "thesis.tex").read_text() == "months of work"


def test_a_failed_run_does_not_block_the_corrected_rerun(model_files, folder, cache_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    req = _request(model_files, folder, cache_dir, shots=2)
    req["train"] = {"epochs": 1, "views": 2, "lr": 0.5}
    from vlprompt.engine.trainer import Trainer
    from vlprompt.errors import NonFiniteError

    def fail(self, *a, **k):
        raise NonFiniteError("non-finite loss (nan) at epoch 1, step 1")

    with monkeypatch.context() as m:
        m.setattr(Trainer, "fit", fail)
        with pytest.raises(NonFiniteError):
            run(resolve(req), out, progress=False)
    assert json.loads((out / "run.json").read_text())["status"] == "failed"
    assert (out / "config.yaml").exists() and not (out / "checkpoints").exists()
    req["train"]["lr"] = 0.002
    res = run(resolve(req), out, progress=False)  # another configuration, no --force needed
    assert res["config"]["train"]["lr"] == 0.002
    assert json.loads((out / "run.json").read_text())["status"] == "done"


def test_finished_run_is_reused_and_another_refused(model_files, folder, cache_dir, tmp_path):
    out = tmp_path / "run"
    req = _request(model_files, folder, cache_dir, method="zeroshot")
    first = run(resolve(req), out, progress=False)
    assert run(resolve(req), out, progress=False) == first
    with pytest.raises(ConfigError, match="holds another run"):
        run(resolve({**req, "method_options": {"templates": ["itap of a {}."]}}), out, progress=False)
    res = run(resolve({**req, "method_options": {"templates": ["itap of a {}."]}}), out, force=True,
              progress=False)
    assert res["config"]["method_options"]["templates"] == ["itap of a {}."]


def test_results_carry_the_configuration_and_its_identity(model_files, folder, cache_dir, tmp_path):
    out = tmp_path / "run"
    res = run(resolve({**_request(model_files, folder, cache_dir, shots=2), "train": {"epochs": 1, "views": 2}}), out,
              progress=False)
    on_disk = yaml.safe_load((out / "config.yaml").read_text())
    assert res["config"] == on_disk
    assert res["identity"]["data"]["root"] == str(folder)  # the dataset's identity, not just "folder"
    assert "cache_dir" not in res["identity"] and "device" not in res["identity"]
    assert res["config_hash"] == json.loads((out / "run.json").read_text())["config_hash"]
    assert res["seed"] == 1 and res["config"]["method_options"]["n_ctx"] == 16  # what was learned


def test_debug_keeps_the_cause(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: coop\n  data: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        main(["--debug", "train", "--config", str(bad), "--show-config"])
    assert info.value.__cause__ is not None  # --debug shows the YAML parser's own error beneath ours


def test_broken_pipe_exits_quietly(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "vlprompt", "datasets"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    proc.stdout.read(10)
    proc.stdout.close()  # the reader goes away, as `| head` does
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0, err
    assert "Traceback" not in err and "BrokenPipe" not in err


def test_method_help_lists_its_own_options(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--method", "plot", "--help"])
    out = capsys.readouterr().out
    assert "--n-prompts" in out and "--ot-eps" in out and "--epochs" in out
    with pytest.raises(SystemExit):
        main(["train", "--method", "ordinalclip", "--help"])
    out = capsys.readouterr().out
    assert "--image-encoder" in out and "--image-encoder-weights" in out and "--n-prompts" not in out


def test_version(capsys):
    import vlprompt

    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"vlprompt {vlprompt.__version__}"


# -- the eval text-feature cache ---------------------------------------------------------------------------
def test_eval_cache_never_serves_stale_parameters(tiny_vit):
    from vlprompt.methods import build_method

    m = build_method("coop", {"n_ctx": 4}, tiny_vit, ["cat", "dog", "car"])
    m.eval()
    feats = torch.randn(2, tiny_vit.embed_dim)
    from vlprompt.methods.base import Features

    with torch.no_grad():
        before = m(Features(global_=feats))
        m.prompt.ctx.add_(torch.randn_like(m.prompt.ctx))  # e.g. an optimizer step between two evaluations
        after = m(Features(global_=feats))
        m.load_learned_state({k: torch.randn_like(v) for k, v in m.learned_state().items()})
        loaded = m(Features(global_=feats))
    assert not torch.allclose(before, after) and not torch.allclose(after, loaded)


# -- a method registered from outside the package ------------------------------------------------------------
@dataclass
class ToyConfig(MethodConfig):
    scale: float = opt(1.0, "initial scale of the class embeddings", gt=0)


class ToyMethod(Method):
    """Free class embeddings compared with the frozen image features (class-specific: refuses other classes)."""

    name = "toy"
    config_class = ToyConfig
    summary = "test-only: free class embeddings"

    def __init__(self, config, backbone, classnames):
        super().__init__(config, backbone, classnames)
        g = torch.Generator().manual_seed(0)
        self.emb = nn.Parameter(torch.randn(len(classnames), backbone.embed_dim, generator=g) * config.scale)

    @classmethod
    def preset(cls, data):
        return {"train": {"epochs": 2, "lr": 0.01, "warmup_epochs": 0}}

    def set_classnames(self, classnames):
        if list(classnames) != self.classnames:
            raise ConfigError("toy: class embeddings belong to the classes they were trained on")
        super().set_classnames(classnames)

    def forward(self, feats):
        return cosine_logits(feats.global_, self.emb, self.logit_scale)

    def export_head(self):
        return {"text_features": F.normalize(self.emb.detach(), dim=-1)}, {"kind": "linear",
                                                                           "logit_scale": self.logit_scale}


@pytest.fixture()
def toy_registered():
    register_method("toy", ToyMethod)
    yield
    unregister_method("toy")


def test_registering_twice_is_an_error(toy_registered):
    from vlprompt.errors import VLPromptError

    with pytest.raises(VLPromptError, match="already registered"):
        register_method("toy", ToyMethod)


def test_a_method_defined_in_a_test_runs_through_the_cli(toy_registered, model_files, folder, cache_dir, tmp_path,
                                                         capsys):
    with pytest.raises(SystemExit):
        main(["train", "--method", "toy", "--help"])
    assert "--scale" in capsys.readouterr().out
    out = tmp_path / "toy"
    rc, stdout, err = _main(["train", "--method", "toy", *_common(model_files, folder, cache_dir), "--shots", "2",
                             "--views", "2", "--scale", "2", "--output", str(out)], capsys)
    assert rc == 0, err
    res = json.loads(stdout)
    assert res["method"] == "toy" and res["epochs"] == 2 and res["config"]["method_options"] == {"scale": 2.0}
    rc, stdout, err = _main(["eval", str(out), "--dataset", "folder", "--root", str(folder), "--cache-dir",
                             cache_dir, "--quiet"], capsys)
    assert rc == 0, err
    assert json.loads(stdout)["metrics"]["accuracy"] == pytest.approx(res["metrics"]["accuracy"])
    rc, _, err = _main(["export", str(out), "--quiet"], capsys)
    assert rc == 0, err
    split = json.loads((out / "split.json").read_text())
    images = [row[0] for row in split["test"][:3]]
    rc, stdout, err = _main(["predict", str(out / "export"), *images, "--json", "--quiet"], capsys)
    assert rc == 0, err
    rows = json.loads(stdout)
    assert [r["image"] for r in rows] == images and all(r["top"][0]["class"] in split["classnames"] for r in rows)


# -- data the user brings ---------------------------------------------------------------------------------
def test_skipped_bad_images_are_counted_in_results_and_log(model_files, cache_dir, tmp_path, capsys):
    root = tmp_path / "data"
    rng = np.random.default_rng(1)
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(10):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / name / f"{i}.jpg")
    good = (root / "a" / "3.jpg").read_bytes()
    (root / "a" / "3.jpg").write_bytes(good[: len(good) // 2])  # a valid header, truncated data
    cfg, weights = model_files
    # the linear probe on all images reads every split, so the truncated file is met wherever it fell
    args = ["linear-probe", "--shots", "0", "--backbone", str(cfg), "--pretrained", str(weights), "--dataset",
            "folder", "--root", str(root), "--cache-dir", cache_dir, "--quiet"]
    rc, _, err = _main([*args, "--output", str(tmp_path / "refused")], capsys)
    assert rc == 2 and "3.jpg" in err and not (tmp_path / "refused").exists()
    rc, out, err = _main([*args, "--skip-bad-images", "--output", str(tmp_path / "run")], capsys)
    assert rc == 0, err
    res = json.loads(out)
    assert sum(res["skipped_images"].values()) == 1
    assert "unreadable image(s) skipped" in (tmp_path / "run" / "log.txt").read_text()


def test_integer_csv_labels_warn_in_log_and_results_and_names_come_from_a_file(model_files, cache_dir, tmp_path,
                                                                                capsys):
    from conftest import write_csv

    rng = np.random.default_rng(2)
    rows = []
    for i in range(12):
        (tmp_path / "img").mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "img" / f"{i}.jpg")
        rows.append([f"img/{i}.jpg", i % 2])
    csv_file = write_csv(tmp_path / "labels.csv", ["path", "label"], rows)
    cfg, weights = model_files
    args = ["zeroshot", "--backbone", str(cfg), "--pretrained", str(weights), "--dataset", "csv", "--root",
            str(csv_file), "--cache-dir", cache_dir]
    rc, out, err = _main([*args, "--output", str(tmp_path / "numbers")], capsys)
    assert rc == 0, err
    (warning,) = json.loads(out)["warnings"]
    assert "class names are numbers" in warning and "--dataset-option classnames=" in warning
    assert f"WARNING {warning}\n" in (tmp_path / "numbers" / "log.txt").read_text()
    assert json.loads((tmp_path / "numbers" / "method.json").read_text())["classnames"] == ["0", "1"]
    names = tmp_path / "names.txt"
    names.write_text("cat\ndog\n")
    rc, out, err = _main([*args, "--dataset-option", f"classnames={names}", "--output", str(tmp_path / "named")],
                         capsys)
    assert rc == 0, err
    log_text = (tmp_path / "named" / "log.txt").read_text()
    assert json.loads(out)["warnings"] == [] and "class names are numbers" not in log_text
    method = json.loads((tmp_path / "named" / "method.json").read_text())
    assert method["classnames"] == ["cat", "dog"] and method["config"]["templates"] == ["a photo of a {}."]


def test_zero_shot_run_on_a_local_dir_model_equals_open_clips_pipeline(folder, cache_dir, tmp_path, capsys):
    """A model whose preprocess config says mean = std = 0.5 (not CLIP's): a zero-shot run through vlprompt
    gives open_clip's own create_model_and_transforms logits on the same images."""
    import open_clip

    from vlprompt.runs import evaluate, load_method, transforms_for
    from vlprompt.backbone.cache import FeatureCache
    from vlprompt.data import load_split
    from vlprompt.testing import TINY_CONFIGS, sharpen_

    d = tmp_path / "model"
    d.mkdir()
    cfg = TINY_CONFIGS["tiny-vit"]
    torch.manual_seed(3)
    model = sharpen_(open_clip.CLIP(embed_dim=cfg["embed_dim"], vision_cfg=cfg["vision_cfg"],
                                    text_cfg=cfg["text_cfg"]))
    half = [0.5, 0.5, 0.5]
    (d / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": cfg, "preprocess_cfg": {"mean": half, "std": half, "interpolation": "bilinear"}}))
    torch.save(model.state_dict(), d / "open_clip_pytorch_model.bin")
    out = tmp_path / "zs"
    rc, stdout, err = _main(["zeroshot", "--backbone", f"local-dir:{d}", "--preprocess", "model", "--dataset",
                             "folder", "--root", str(folder), "--templates", "a photo of a {}.", "--cache-dir",
                             cache_dir, "--quiet", "--output", str(out)], capsys)
    assert rc == 0, err
    res = json.loads(stdout)
    assert res["pretrained"] is None and res["config"]["backbone"] == f"local-dir:{d}"
    method, meta, bb = load_method(out, device="cpu")
    test = load_split(out / "split.json").test
    _, tf = transforms_for(meta["preprocess"], bb)
    metrics, ours = evaluate(method, bb, test, tf, FeatureCache(cache_dir, progress=False))
    assert metrics["accuracy"] == pytest.approx(res["metrics"]["accuracy"])

    ref, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{d}")
    ref.eval()
    tok = open_clip.get_tokenizer(f"local-dir:{d}")
    names = json.loads((out / "split.json").read_text())["classnames"]
    with torch.no_grad():
        img = F.normalize(ref.encode_image(torch.stack([preprocess(Image.open(s.path).convert("RGB"))
                                                        for s in test])), dim=-1)
        txt = F.normalize(ref.encode_text(tok([f"a photo of a {c}." for c in names])), dim=-1)
        theirs = ref.logit_scale.exp() * img @ txt.t()
    assert ours.std() > 0.05
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


def test_the_readme_python_example_resolves_as_the_cli(model_files, folder, cache_dir, capsys):
    """The README's request, for coop, cocoop, plot and ordinalclip, gives the config.yaml of the equivalent
    command line (the data and weights swapped for the tiny test ones)."""
    import ast
    import re

    import vlprompt

    text = (REPO / "README.md").read_text()
    block = re.search(r"## Python\n.*?```python\n(.*?)```", text, re.S).group(1)
    tree = ast.parse(block)
    literal = next(node.value for node in tree.body if isinstance(node, ast.Assign)
                   and getattr(node.targets[0], "id", None) == "request")
    readme = ast.literal_eval(literal)
    assert "vlprompt.train(request" in block and "vlprompt.show_config(request)" in block
    cfg, weights = model_files
    for method in ("coop", "cocoop", "plot", "ordinalclip"):
        request = {**readme, "method": method, "backbone": str(cfg), "pretrained": str(weights),
                   "cache_dir": cache_dir, "data": {**readme["data"], "dataset": "folder", "root": str(folder),
                                                    "shots": 4}}
        opts = request.get("method_options", {}) if method != "ordinalclip" else {}
        if method == "ordinalclip":
            request.pop("method_options", None)
        flags = []
        for k, v in opts.items():
            flags += [f"--{k.replace('_', '-')}", str(v)]
        rc, out, err = _main(["train", "--method", method, "--backbone", str(cfg), "--pretrained", str(weights),
                              "--dataset", "folder", "--root", str(folder), "--shots", "4",
                              "--seed", str(readme["seed"]), "--cache-dir", cache_dir, *flags, "--show-config"],
                             capsys)
        assert rc == 0, (method, err)
        assert vlprompt.show_config(request) == out, method


@pytest.mark.parametrize("content", [b"not a checkpoint at all", "vit"])
def test_a_bad_pretrained_file_is_one_line_naming_the_flag(content, model_files, folder, cache_dir, tmp_path,
                                                           capsys):
    cfg, _ = model_files
    bad = tmp_path / "weights.pt"
    if content == "vit":  # a real checkpoint of another architecture
        _, other = make_tiny_checkpoint(tmp_path / "other", "tiny-rn")
        bad = other
    else:
        bad.write_bytes(content)
    rc, _, err = _main(["zeroshot", "--backbone", str(cfg), "--pretrained", str(bad), "--dataset", "folder",
                        "--root", str(folder), "--cache-dir", cache_dir, "--quiet", "--output",
                        str(tmp_path / "run")], capsys)
    assert rc == 2 and err.startswith(f"vlprompt: error: --pretrained {bad}") and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


def test_atomic_writes_get_the_usual_file_mode(tmp_path):
    from vlprompt._io import atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644  # readable by others, as any file open() writes


def test_threads_is_validated_applied_and_not_part_of_the_identity(model_files, folder, cache_dir, tmp_path):
    req = _request(model_files, folder, cache_dir, method="zeroshot")
    with pytest.raises(ConfigError, match="--threads"):
        resolve({**req, "threads": 0})
    assert resolve({**req, "threads": 1}).identity() == resolve(req).identity()
    before = torch.get_num_threads()
    try:
        run(resolve({**req, "threads": 1}), tmp_path / "run", progress=False)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_a_read_only_cache_filled_by_a_first_run_serves_a_second_run(model_files, folder, tmp_path, read_only,
                                                                      capsys):
    """A lab's shared, read-only cache: a run of another method on the same images reads every feature from it
    and writes nothing there; a run that needs a feature it lacks stops with one line naming it."""
    cache = tmp_path / "shared-cache"
    common = [*_common(model_files, folder, str(cache)), "--shots", "2", "--views", "1", "--epochs", "1"]
    rc, out, err = _main(["train", "--method", "coop", *common, "--output", str(tmp_path / "coop")], capsys)
    assert rc == 0, err
    coop = json.loads(out)
    before = {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(cache.rglob("*"))}
    read_only(cache)
    rc, out, err = _main(["train", "--method", "text-bias", *common, "--output", str(tmp_path / "bias")], capsys)
    assert rc == 0, err
    bias = json.loads(out)
    assert bias["metrics"]["num_samples"] == coop["metrics"]["num_samples"] == 9
    # evaluation of the first run reads the same cache (the run's own) too
    rc, out, err = _main(["eval", str(tmp_path / "coop"), "--dataset", "folder", "--root", str(folder), "--quiet"],
                         capsys)
    assert rc == 0, err
    assert json.loads(out)["metrics"]["accuracy"] == pytest.approx(coop["metrics"]["accuracy"])
    # a second augmented view was never encoded: one line naming the cache
    views2 = [*common[:-4], "--views", "2", "--epochs", "1"]
    rc, out, err = _main(["train", "--method", "coop", *views2, "--output", str(tmp_path / "views2")], capsys)
    assert rc == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and f"feature cache {cache} is read-only here" in lines[0]
    assert "pass a writable --cache-dir" in lines[0]
    assert {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(cache.rglob("*"))} == before
