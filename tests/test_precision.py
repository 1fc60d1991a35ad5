"""--precision bf16 / auto: the towers compute under bf16 autocast where the device has fast bf16 (CUDA with bf16,
CPUs with AMX or AVX512-BF16), within a documented tolerance of fp32; learned tensors and optimiser state stay
float32; bf16 features are cached apart from fp32 ones (never served to an fp32 run); a device without fast bf16
refuses --precision bf16 in one line naming the flag, and auto falls back to fp32 there."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F

from conftest import color_folder
from vlprompt.backbone import load_backbone
from vlprompt.backbone import model as backbone_model
from vlprompt.backbone.cache import FeatureCache
from vlprompt.cli import main
from vlprompt.data import transform_id
from vlprompt.errors import BackboneError
from vlprompt.methods import build_method
from vlprompt.methods.base import Features
from vlprompt.testing import make_tiny_checkpoint

CLASSES = ["red square", "blue circle", "green triangle", "yellow star", "a long class name of five words"]
#: bf16 keeps 8 bits of mantissa: features within 2% of their largest entry, logits within 3% of the logit scale
FEATURE_RTOL, LOGIT_TOL = 2e-2, 3e-2


@pytest.fixture()
def fast_bf16(monkeypatch):
    """This CPU counted as having bf16 units (the numbers are the same without them, only slower)."""
    monkeypatch.setattr(backbone_model, "cpu_has_fast_bf16", lambda: True)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("prec"), "tiny-vit", seed=6, sharpen=True)


def _load(files, precision):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_backbone(str(files[0]), str(files[1]), "cpu", precision=precision)


def test_bf16_features_and_logits_are_within_tolerance_of_fp32(files, fast_bf16):
    fp32, bf16 = _load(files, "fp32"), _load(files, "bf16")
    assert (fp32.precision_used, bf16.precision_used) == ("fp32", "bf16")
    images = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    a, b = fp32.encode_image(images), bf16.encode_image(images)
    assert b.dtype == torch.float32 and 0 < float((a - b).abs().max()) <= FEATURE_RTOL * float(a.abs().max())
    coop = {p: build_method("coop", {"n_ctx": 4}, bb, CLASSES) for p, bb in (("fp32", fp32), ("bf16", bf16))}
    coop["bf16"].load_learned_state(coop["fp32"].learned_state())
    with torch.no_grad():
        la = coop["fp32"].eval()(Features(global_=a))
        lb = coop["bf16"].eval()(Features(global_=a))
    assert float(la.std()) > 0.5  # the logits differ between classes: the comparison is not trivially met
    assert float((la - lb).abs().max()) <= LOGIT_TOL * fp32.logit_scale
    agree = float((la.argmax(1) == lb.argmax(1)).float().mean())
    assert agree >= 0.8


def test_learned_tensors_and_optimizer_state_stay_float32_under_bf16(files, fast_bf16, tmp_path):
    from vlprompt.engine.sources import CachedViews
    from vlprompt.engine.trainer import TrainConfig, Trainer

    bb = _load(files, "bf16")
    method = build_method("coop", {"n_ctx": 4}, bb, CLASSES)
    feats = torch.randn(1, 10, bb.embed_dim, generator=torch.Generator().manual_seed(1))
    trainer = Trainer(method, TrainConfig(epochs=2, batch_size=5, warmup_epochs=0), tmp_path, seed=0, progress=False)
    before = method.prompt.ctx.detach().clone()
    trainer.fit(CachedViews(feats), torch.arange(10) % 5)
    assert method.prompt.ctx.dtype == torch.float32 and not torch.equal(before, method.prompt.ctx)
    for state in trainer.optimizer.state.values():
        assert all(t.dtype == torch.float32 for t in state.values() if torch.is_tensor(t) and t.is_floating_point())
    assert not trainer.fp16  # bf16 has fp32's range: no gradient scaler


def test_bf16_features_are_cached_apart_and_never_served_to_fp32(files, fast_bf16, tmp_path):
    data = color_folder(tmp_path / "data" / "shapes", per_class=3)
    paths = sorted(str(p) for p in data.rglob("*.jpg"))
    fp32, bf16 = _load(files, "fp32"), _load(files, "bf16")
    assert fp32.fingerprint != bf16.fingerprint and bf16.fingerprint.endswith("-bf16")
    from vlprompt.runs import transforms_for

    _, tf = transforms_for("coop", fp32)
    cache = FeatureCache(tmp_path / "cache", progress=False)
    first = cache.get(bf16, paths, tf, transform_id=transform_id(tf))
    again = cache.get(fp32, paths, tf, transform_id=transform_id(tf))
    assert first.misses == len(paths) and again.misses == len(paths) and again.hits == 0
    assert not torch.equal(first.global_, again.global_)
    assert cache.get(bf16, paths, tf, transform_id=transform_id(tf)).hits == len(paths)


def test_bf16_without_bf16_units_is_one_line_and_auto_falls_back(files, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(backbone_model, "cpu_has_fast_bf16", lambda: False)
    with pytest.raises(BackboneError, match="--precision bf16: this CPU has no bf16 matrix units"):
        _load(files, "bf16")
    assert _load(files, "auto").precision_used == "fp32"
    data = color_folder(tmp_path / "data" / "shapes", per_class=4)
    common = ["--backbone", str(files[0]), "--pretrained", str(files[1]), "--dataset", "folder", "--root", str(data),
              "--cache-dir", str(tmp_path / "cache"), "--quiet"]
    assert main(["zeroshot", *common, "--precision", "bf16", "--output", str(tmp_path / "zs")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--precision bf16" in err[0] and not (tmp_path / "zs").exists()
    assert main(["zeroshot", *common, "--precision", "auto", "--output", str(tmp_path / "auto")]) == 0
    assert json.loads(capsys.readouterr().out)["precision_used"] == "fp32"
    monkeypatch.setattr(backbone_model, "cpu_has_fast_bf16", lambda: True)
    assert main(["zeroshot", *common, "--precision", "auto", "--output", str(tmp_path / "auto-bf16")]) == 0
    assert json.loads(capsys.readouterr().out)["precision_used"] == "bf16"


def test_a_bf16_run_is_evaluated_in_bf16_and_a_run_without_the_record_in_the_default(files, fast_bf16, tmp_path,
                                                                                      capsys):
    """eval rebuilds a run's backbone at the precision the run was made with (method.json records it): the numbers
    of `vlprompt eval` on the run's own test split are the run's own."""
    data = color_folder(tmp_path / "data" / "shapes", per_class=10)
    run = tmp_path / "run"
    common = ["--backbone", str(files[0]), "--pretrained", str(files[1]), "--dataset", "folder", "--root", str(data),
              "--cache-dir", str(tmp_path / "cache"), "--quiet"]
    assert main(["train", "--method", "coop", "--n-ctx", "2", "--epochs", "1", "--shots", "2", *common,
                 "--precision", "bf16", "--output", str(run)]) == 0
    trained = json.loads((run / "results.json").read_text())
    assert trained["precision_used"] == "bf16"
    assert json.loads((run / "method.json").read_text())["precision"] == "bf16"
    capsys.readouterr()
    assert main(["eval", str(run), "--dataset", "folder", "--root", str(data), "--quiet"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["precision_used"] == "bf16"
    assert evaluated["metrics"]["accuracy"] == trained["metrics"]["accuracy"]
    meta = json.loads((run / "method.json").read_text())
    del meta["precision"]  # a run written before the precision was recorded: the default (fp32 on this CPU)
    (run / "method.json").write_text(json.dumps(meta))
    assert main(["eval", str(run), "--dataset", "folder", "--root", str(data), "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["precision_used"] == "fp32"


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cpu_towers_attend_batch_first_and_compute_what_multihead_attention_computes(files, precision, request):
    """On a CPU the towers' nn.MultiheadAttention modules compute self-attention from their batch-first input
    (vlprompt.backbone.attention: one packed projection, q / k / v as views, SDPA), where PyTorch transposes and
    copies (and under CPU autocast ran a bmm against the weight copied once per position). Image and text
    features equal those of nn.MultiheadAttention's own forward to float rounding (bitwise-close in fp32, within
    the bf16 tolerance under bf16), and are far from another image's."""
    from vlprompt.backbone.attention import BatchFirstSelfAttention

    if precision == "bf16":
        request.getfixturevalue("fast_bf16")
    bb = _load(files, precision)
    attns = [m for m in bb.model.modules() if isinstance(m, torch.nn.MultiheadAttention)]
    assert attns and all(type(m) is BatchFirstSelfAttention for m in attns)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    tokens = bb.tokenizer(["a photo of a cat.", "a photo of a dog.", "a bird"])
    ours_img, ours_txt = bb.encode_image(images), _text(bb, tokens)
    for m in attns:
        m.__class__ = torch.nn.MultiheadAttention
    plain_img, plain_txt = bb.encode_image(images), _text(bb, tokens)
    tol = 1e-5 if precision == "fp32" else FEATURE_RTOL
    for ours, plain in ((ours_img, plain_img), (ours_txt, plain_txt)):
        assert float((ours - plain).abs().max()) <= tol * float(plain.abs().max())
        assert float((ours - plain).abs().max()) < 0.5 * float((ours - plain.roll(1, 0)).abs().max())


def _text(bb, tokens):
    with torch.no_grad(), bb.autocast():
        return bb.model.encode_text(tokens).float()


def test_cpu_half_attention_with_gradients_runs_the_math_kernel_and_keeps_fp32_gradients(files, fast_bf16):
    """CPU autocast: attention that will be differentiated runs through SDPA's math kernel (the flash kernel's
    backward is many times slower there), attention without gradients keeps the flash kernel; the bf16 gradient
    of a learned context stays within bf16's tolerance of the fp32 one."""
    bf16 = _load(files, "bf16")
    with bf16.autocast():
        assert not torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()
    assert torch.backends.cuda.flash_sdp_enabled()  # restored on exit
    with torch.no_grad(), bf16.autocast():
        assert torch.backends.cuda.flash_sdp_enabled()
    grads = {}
    for p, bb in (("fp32", _load(files, "fp32")), ("bf16", bf16)):
        torch.manual_seed(0)
        coop = build_method("coop", {"n_ctx": 4}, bb, CLASSES)
        feats = torch.randn(6, bb.embed_dim, generator=torch.Generator().manual_seed(3))
        loss = F.cross_entropy(coop(Features(global_=feats)), torch.arange(6) % len(CLASSES))
        loss.backward()
        grads[p] = coop.prompt.ctx.grad
    assert grads["bf16"].dtype == torch.float32
    rel = float((grads["bf16"] - grads["fp32"]).norm() / grads["fp32"].norm())
    assert rel < 0.05, rel
