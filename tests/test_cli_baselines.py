"""``vlprompt zeroshot | linear-probe | export | predict | features | datasets`` end to end, on a subset of DTD
from ../shared with a tiny sharpened model, checked against open_clip and scikit-learn used directly. Zero-shot
and the linear probe are runs like any other (``train --method zeroshot | linear-probe``)."""
import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from conftest import require_shared
from vlprompt.cli import main
from vlprompt.testing import make_tiny_checkpoint

DTD_TEMPLATE = "{} texture."  # CoOp's hand-crafted DTD prompt
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    cfg, weights = make_tiny_checkpoint(tmp_path_factory.mktemp("bl_models"), "tiny-rn", seed=1, sharpen=True)
    return cfg, weights


def make_dtd_subset(directory, keep=None):
    """CoOp's DTD split cut to ``keep`` images per class and split (default 4 train / 2 val / 3 test, 10 classes),
    as a split file in ``directory``."""
    dtd = require_shared("dtd")
    full = json.loads((dtd / "split_zhou_DescribableTextures.json").read_text())
    keep = keep or {"train": 4, "val": 2, "test": 3}
    small = {}
    for split, k in keep.items():
        seen = {}
        small[split] = [e for e in full[split] if seen.setdefault(e[1], []).append(e) or len(seen[e[1]]) <= k]
    path = directory / "split_small.json"
    path.write_text(json.dumps(small))
    return {"root": str(dtd.parent), "split_file": str(path), "image_dir": dtd / "images", **small}


@pytest.fixture(scope="module")
def dtd_subset(tmp_path_factory):
    return make_dtd_subset(tmp_path_factory.mktemp("dtd_split"))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("bl_cache"))


@pytest.fixture
def cache_stats(monkeypatch):
    """(hits, misses) of every look-up of the feature cache (``FeatureCache.open``, which ``get`` and the runs'
    lazy reads go through), in order (results.json no longer reports them)."""
    from vlprompt.backbone.cache import FeatureCache

    calls = []
    open_ = FeatureCache.open

    def recording_open(self, *a, **k):
        rows = open_(self, *a, **k)
        calls.append((rows.hits, rows.misses))
        return rows

    monkeypatch.setattr(FeatureCache, "open", recording_open)
    return calls


def data_args(model_files, dtd_subset, cache_dir):
    cfg, weights = model_files
    return ["--backbone", str(cfg), "--pretrained", str(weights), "--dataset", "dtd", "--root", dtd_subset["root"],
            "--dataset-option", f"split_file={dtd_subset['split_file']}", "--cache-dir", cache_dir, "--quiet"]



def run_cli(argv, capsys):
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err



def load_tiny_backbone(model_files):
    from vlprompt.backbone import load_backbone

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_backbone(str(model_files[0]), str(model_files[1]), device="cpu")


def _open_clip_reference(model_files, dtd_subset, entries):
    """Logits (N, K), labels and class names computed with open_clip, PIL and torchvision directly."""
    import open_clip
    from PIL import Image
    from torchvision import transforms as T

    cfg, weights = model_files
    size = json.loads(cfg.read_text())["vision_cfg"]["image_size"]
    open_clip.add_model_config(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, _, _ = open_clip.create_model_and_transforms(cfg.stem, pretrained=str(weights))
    model.eval()
    tokenizer = open_clip.get_tokenizer(cfg.stem)
    tf = T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size), T.ToTensor(),
                    T.Normalize(CLIP_MEAN, CLIP_STD)])
    classnames = [None] * 10
    for _, label, name in dtd_subset["train"]:
        classnames[label] = name
    images = torch.stack([tf(Image.open(dtd_subset["image_dir"] / rel).convert("RGB")) for rel, _, _ in entries])
    with torch.no_grad():
        img = F.normalize(model.encode_image(images), dim=-1)
        txt = F.normalize(model.encode_text(tokenizer([DTD_TEMPLATE.format(c) for c in classnames])), dim=-1)
        logits = model.logit_scale.exp() * img @ txt.t()
    return logits, torch.tensor([label for _, label, _ in entries]), classnames


def test_zeroshot_cli_matches_open_clip(model_files, dtd_subset, cache_dir, tmp_path, capsys):
    out = tmp_path / "zs"
    argv = ["zeroshot", *data_args(model_files, dtd_subset, cache_dir), "--output", str(out)]
    rc, stdout, err = run_cli(argv, capsys)
    assert rc == 0, err
    results = json.loads((out / "results.json").read_text())
    assert json.loads(stdout) == results

    logits, labels, classnames = _open_clip_reference(model_files, dtd_subset, dtd_subset["test"])
    pred = logits.argmax(1)
    assert len(set(pred.tolist())) >= 3, "the model predicts (almost) one class: the comparison would be weak"
    correct = (pred == labels).float()
    accuracy = 100.0 * correct.sum().item() / len(labels)
    per_class = np.mean([correct[labels == c].mean().item() for c in range(10)]) * 100
    assert results["metrics"]["num_samples"] == 30
    assert results["metrics"]["accuracy"] == pytest.approx(accuracy, abs=1e-5)
    assert results["metrics"]["mean_per_class_accuracy"] == pytest.approx(per_class, abs=1e-5)
    assert results["method_info"]["templates"] == [DTD_TEMPLATE] and results["shots"] == 0
    assert results["seed"] is None
    for key in ("method", "dataset", "backbone", "pretrained", "timings", "config", "identity", "config_hash"):
        assert key in results
    assert results["method"] == "zeroshot" and results["dataset"] == "dtd"

    # the run directory: resolved config (the template set expanded), the split used (test only), a log
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["method"] == "zeroshot" and cfg["method_options"]["templates"] == [DTD_TEMPLATE]
    assert cfg["seed"] is None and cfg["data"]["shots"] == 0 and cfg["train"] is None
    assert cfg == results["config"]
    split = json.loads((out / "split.json").read_text())
    assert len(split["test"]) == 30 and split["train"] == [] and split["val"] == []
    assert "test: accuracy" in (out / "log.txt").read_text()
    assert not (out / "export").exists()  # a run exports on request only (`vlprompt export`)

    # per image: the run's method (features read back from the cache) gives open_clip's logits
    from vlprompt.backbone.cache import FeatureCache
    from vlprompt.data import load_split
    from vlprompt.runs import evaluate, load_method, transforms_for

    method, _, backbone = load_method(out, device="cpu")
    samples = load_split(out / "split.json").test
    _, test_tf = transforms_for("coop", backbone)
    _, run_logits = evaluate(method.eval(), backbone, samples, test_tf, FeatureCache(cache_dir, progress=False))
    torch.testing.assert_close(run_logits, logits, atol=1e-3, rtol=0)

    # the exported head (kind linear) predicts with the same classifier
    from vlprompt.runs import predict_images

    rc, stdout, err = run_cli(["export", str(out)], capsys)
    assert rc == 0, err
    head = json.loads((out / "export" / "head.json").read_text())
    assert head["kind"] == "linear" and head["classnames"] == classnames and head["templates"] == [DTD_TEMPLATE]
    rows = predict_images(out / "export", [s.path for s in samples[:2]], topk=10, device="cpu")
    for row, lg in zip(rows, logits[:2]):
        probs = {t["class"]: t["probability"] for t in row["top"]}
        ref = lg.softmax(-1)
        assert [probs[c] for c in classnames] == pytest.approx(ref.tolist(), abs=1e-4)


def test_zeroshot_rerun_reuses_refuses_and_forces(model_files, dtd_subset, cache_dir, tmp_path, capsys,
                                                  cache_stats):
    out = tmp_path / "zs"
    base = ["zeroshot", *data_args(model_files, dtd_subset, cache_dir), "--output", str(out)]
    assert run_cli(base, capsys)[0] == 0
    first = json.loads((out / "results.json").read_text())
    del cache_stats[:]
    rc, stdout, _ = run_cli(base, capsys)  # same run: its results, nothing recomputed
    assert rc == 0 and json.loads(stdout) == first
    assert cache_stats == []  # not even a cached feature read
    # an unfinished run (no results.json) runs again on the split it saved
    (out / "results.json").unlink()
    split = json.loads((out / "split.json").read_text())
    split["test"] = split["test"][:12]
    (out / "split.json").write_text(json.dumps(split))
    rc, stdout, err = run_cli(base, capsys)
    assert rc == 0, err
    assert json.loads(stdout)["metrics"]["num_samples"] == 12
    ensemble = base + ["--templates", "a photo of a {}.", "imagenet-select"]
    rc, _, err = run_cli(ensemble, capsys)
    assert rc == 2 and "holds another run" in err
    del cache_stats[:]
    rc, stdout, err = run_cli(ensemble + ["--force"], capsys)
    assert rc == 0, err
    results = json.loads(stdout)
    from vlprompt.data import IMAGENET_TEMPLATES_SELECT
    assert results["method_info"]["templates"] == ["a photo of a {}.", *IMAGENET_TEMPLATES_SELECT]
    assert results["config"]["method_options"]["templates"] == ["a photo of a {}.", *IMAGENET_TEMPLATES_SELECT]
    assert results["metrics"]["num_samples"] == 30  # --force drew the split again
    assert cache_stats == [(30, 0)]  # the test features of the earlier runs, read back


def test_linear_probe_cli(model_files, dtd_subset, cache_dir, tmp_path, capsys):
    out = tmp_path / "lp"
    args = data_args(model_files, dtd_subset, cache_dir)
    rc, stdout, err = run_cli(["linear-probe", *args, "--shots", "2", "--seed", "3", "--output", str(out)], capsys)
    assert rc == 0, err
    results = json.loads((out / "results.json").read_text())
    for key in ("method", "dataset", "backbone", "pretrained", "shots", "seed", "metrics", "timings", "setup",
                "config", "identity", "config_hash"):
        assert key in results
    assert results["method"] == "linear-probe" and results["shots"] == 2 and results["seed"] == 3
    fit = results["setup"]
    assert fit["C_searched"] and len(fit["search"]) == 7 + 2 * 8
    split = json.loads((out / "split.json").read_text())
    assert len(split["train"]) == 20 and len(split["val"]) == 20 and len(split["test"]) == 30
    for name in ("config.yaml", "log.txt", "prompt.safetensors", "method.json", "run.json"):
        assert (out / name).is_file()

    # the same search on the same cached features gives the same C; sklearn at that C the same accuracy
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    from vlprompt.backbone.cache import FeatureCache
    from vlprompt.data import load_split, transform_id
    from vlprompt.methods.baselines.linear_probe import fit_linear_probe
    from vlprompt.runs import transforms_for

    backbone = load_tiny_backbone(model_files)
    _, test_tf = transforms_for("coop", backbone)
    splits = load_split(out / "split.json")
    cache = FeatureCache(cache_dir, progress=False)
    feats = {n: cache.get(backbone, [s.path for s in getattr(splits, n)], test_tf,
                          transform_id=transform_id(test_tf)).global_.double().numpy()
             for n in ("train", "val", "test")}
    labels = {n: np.array([s.label for s in getattr(splits, n)]) for n in ("train", "val", "test")}
    assert np.abs(feats["train"] - feats["train"].mean(0)).max() > 1e-3  # features vary between images
    res = fit_linear_probe(feats["train"], labels["train"], feats["val"], labels["val"])
    assert res.C == fit["C"]
    with threadpool_limits(limits=1, user_api="blas"):  # as the library does for small fits (speed only)
        clf = LogisticRegression(solver="lbfgs", max_iter=1000, C=fit["C"]).fit(feats["train"], labels["train"])
    accuracy = 100.0 * (clf.predict(feats["test"]) == labels["test"]).mean()
    assert results["metrics"]["accuracy"] == pytest.approx(accuracy, abs=1e-5)

    # a fixed C skips the search (and the val split)
    fixed_out = tmp_path / "lp_fixed"
    rc, stdout, err = run_cli(["linear-probe", *args, "--shots", "2", "--C", "0.5", "--output", str(fixed_out)], capsys)
    assert rc == 0, err
    fixed = json.loads(stdout)["setup"]
    assert fixed["C"] == 0.5 and not fixed["C_searched"] and fixed["search"] == []


def test_features_cli_fills_lists_and_clears_the_cache(model_files, dtd_subset, tmp_path, capsys, cache_stats):
    cache = str(tmp_path / "cache")
    args = data_args(model_files, dtd_subset, cache)
    rc, stdout, err = run_cli(["features", *args, "--splits", "test,train", "--views", "1", "--json"], capsys)
    assert rc == 0, err
    summary = json.loads(stdout)
    got = [(r["split"], r["transform"], r["view"], r["images"], r["misses"]) for r in summary["requests"]]
    assert got == [("test", "test", 0, 30, 30), ("train", "test", 0, 40, 40), ("train", "train", 0, 40, 40)]
    rc, stdout, _ = run_cli(["features", "--cache-dir", cache, "--info", "--json"], capsys)
    info = json.loads(stdout)
    assert rc == 0 and sorted(d["images"] for d in info["directories"]) == [40, 70]
    # a zero-shot run now reads every test feature from the cache
    del cache_stats[:]
    rc, stdout, err = run_cli(["zeroshot", *args, "--output", str(tmp_path / "zs")], capsys)
    assert rc == 0, err
    assert cache_stats == [(30, 0)]
    rc, stdout, _ = run_cli(["features", "--cache-dir", cache, "--clear"], capsys)
    assert rc == 0 and "removed 2 cache directories" in stdout
    rc, stdout, _ = run_cli(["features", "--cache-dir", cache, "--info"], capsys)
    assert "empty" in stdout


def test_datasets_cli_lists_names_and_layouts(capsys):
    rc, stdout, _ = run_cli(["datasets"], capsys)
    assert rc == 0
    for name in ("imagenet", "dtd", "oxford_flowers", "eurosat", "folder", "csv", "torchvision:<Name>"):
        assert f"\n{name}" in "\n" + stdout
    assert "split_zhou_DescribableTextures.json" in stdout and "'{} texture.'" in stdout
    rc, stdout, _ = run_cli(["datasets", "OxfordFlowers", "--json"], capsys)
    rows = json.loads(stdout)
    assert rc == 0 and [r["name"] for r in rows] == ["oxford_flowers"] and "cat_to_name.json" in rows[0]["layout"]


def _assert_one_line_error(rc, stdout, err, message):
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vlprompt: error: ") and message in lines[0], err
    assert "Traceback" not in err and stdout == ""


@pytest.mark.parametrize("argv, message", [
    (["zeroshot", "--dataset", "nope", "--root", "{root}"], "unknown dataset 'nope'"),
    (["zeroshot", "--dataset", "dtd", "--root", "{missing}"], "does not exist"),
    (["zeroshot", "--dataset", "dtd", "--root", "{root}", "--shots", "4"], "--shots must be 0"),
    (["zeroshot", "--dataset", "dtd", "--root", "{root}", "--seed", "2"], "--seed does not apply"),
    (["train", "--method", "zeroshot", "--dataset", "dtd", "--root", "{root}", "--shots", "4"], "--shots must be 0"),
    (["linear-probe", "--dataset", "dtd", "--root", "{missing}"], "does not exist"),
    (["linear-probe", "--dataset", "dtd", "--root", "{root}", "--search-steps", "-1"], "search_steps"),
    (["linear-probe", "--dataset", "dtd", "--root", "{root}", "--C", "0"], "must be > 0"),
    (["linear-probe", "--dataset", "dtd", "--root", "{root}", "--max-iter", "0"], "max_iter"),
    (["features", "--dataset", "dtd"], "required: --root"),
    (["features", "--info", "--dataset", "dtd"], "--dataset do(es) not apply"),
    (["datasets", "nope"], "unknown dataset 'nope'"),
])
def test_bad_input_is_one_line_exit_2(argv, message, tmp_path, capsys):
    argv = [a.replace("{root}", str(tmp_path)).replace("{missing}", str(tmp_path / "missing")) for a in argv]
    if argv[0] != "datasets":
        argv += ["--cache-dir", str(tmp_path / "cache")]
    if argv[0] in ("zeroshot", "linear-probe", "train"):
        argv += ["--output", str(tmp_path / "run")]
    _assert_one_line_error(*run_cli(argv, capsys), message)
    assert not (tmp_path / "run").exists()  # nothing written before the input is known good


@pytest.mark.parametrize("templates, message", [
    (["imagenet81"], "unknown prompt template set 'imagenet81'"),
    (["a {} of {}"], "exactly one '{}'"),
    (["{} pattern.", "imagenet80", "nope"], "unknown prompt template set 'nope'"),
])
def test_bad_templates_are_one_line_exit_2_before_the_run_starts(templates, message, model_files, dtd_subset,
                                                                 cache_dir, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["zeroshot", *data_args(model_files, dtd_subset, cache_dir), "--templates", *templates, "--output", str(out)]
    _assert_one_line_error(*run_cli(argv, capsys), message)
    assert not out.exists()


def test_templates_flag_takes_each_template_verbatim(tmp_path, capsys):
    rc, stdout, err = run_cli(["zeroshot", "--dataset", "dtd", "--root", str(tmp_path), "--templates", "{}", "{} 1",
                            "--show-config"], capsys)
    assert rc == 0, err
    assert yaml.safe_load(stdout)["method_options"]["templates"] == ["{}", "{} 1"]
