"""The backbone layer: loading, QuickGELU, errors, image features (global and local)."""
import json
import warnings

import pytest
import torch

from vlprompt.backbone import load_backbone
from vlprompt.errors import BackboneError
from vlprompt.testing import make_tiny_checkpoint


def test_weights_load_back_through_pretrained_file(tiny_dir, tiny_vit):
    cfg, weights = make_tiny_checkpoint(tiny_dir, "tiny-vit")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = load_backbone(str(cfg), str(weights), device="cpu")
    for (k, a), (_, b) in zip(tiny_vit.model.state_dict().items(), again.model.state_dict().items()):
        assert torch.equal(a, b), k
    assert again.fingerprint == tiny_vit.fingerprint
    assert not any(p.requires_grad for p in again.model.parameters())
    assert again.embed_dim == 64 and again.image_size == 32


def test_fingerprint_changes_with_weights(tiny_dir, tiny_vit):
    cfg, weights = make_tiny_checkpoint(tiny_dir / "other", "tiny-vit", seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        other = load_backbone(str(cfg), str(weights), device="cpu")
    assert other.fingerprint != tiny_vit.fingerprint


def test_random_weights_warn_loudly(tiny_dir):
    cfg, _ = make_tiny_checkpoint(tiny_dir, "tiny-rn")
    with pytest.warns(UserWarning, match="RANDOM weights"):
        load_backbone(str(cfg), None, device="cpu")


def test_openai_tag_gets_quick_gelu(monkeypatch):
    """OpenAI weights must run with QuickGELU; open_clip only warns otherwise."""
    import open_clip

    seen = {}

    def fake_create(name, pretrained=None, **kw):
        seen.update(kw, name=name, pretrained=pretrained)
        raise RuntimeError("Failed to download weights for tag 'openai': offline")

    import vlprompt.backbone.loading as backbone_mod

    monkeypatch.setattr(backbone_mod, "_hub_unreachable", lambda *a, **k: None)  # as if online
    monkeypatch.setattr(open_clip, "create_model_and_transforms", fake_create)
    with pytest.raises(BackboneError, match="could not fetch.*--pretrained"):
        load_backbone("RN50", "openai", device="cpu")
    assert seen["force_quick_gelu"] is True
    with pytest.raises(BackboneError):
        load_backbone("RN50", "laion400m_e32", device="cpu")  # hmm: RN50 has no laion tag -> clear error
    with pytest.raises(BackboneError, match="could not fetch"):
        load_backbone("ViT-B-32", "laion2b_s34b_b79k", device="cpu")
    assert seen["force_quick_gelu"] is False


def test_offline_tag_fails_at_once_with_one_line_naming_the_flag():
    """The real open_clip download path with HF_HUB_OFFLINE=1 (conftest): no hub retries, one line saying what
    could not be fetched and how to pass the file (with QuickGELU for OpenAI weights)."""
    import time

    t0 = time.perf_counter()
    with pytest.raises(BackboneError) as info:
        load_backbone("RN50", "openai", device="cpu")
    assert time.perf_counter() - t0 < 5
    msg = str(info.value)
    assert msg.startswith("--pretrained openai: could not fetch the weights of RN50") and "\n" not in msg
    assert "HF_HUB_OFFLINE" in msg and "--backbone RN50-quickgelu --pretrained /path/to/" in msg


def test_unreachable_hub_fails_after_one_probe(monkeypatch):
    """Not offline by setting but no network: one short HEAD, then the error (not ~50 s of retries)."""
    import httpx2
    import huggingface_hub
    import open_clip

    import vlprompt.backbone.loading as backbone_mod

    calls = []

    def no_network(url, timeout=None, **kw):
        calls.append(timeout)
        raise httpx2.ConnectError("[Errno -2] Name or service not known")

    def must_not_run(*a, **k):
        raise AssertionError("open_clip's download (with its retries) must not start")

    monkeypatch.setattr(huggingface_hub, "is_offline_mode", lambda: False)
    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", no_network)
    monkeypatch.setattr(open_clip, "create_model_and_transforms", must_not_run)
    with pytest.raises(BackboneError, match=r"^--pretrained openai: .*unreachable \(ConnectError"):
        load_backbone("RN50", "openai", device="cpu")
    assert calls == [backbone_mod.HUB_PROBE_TIMEOUT_S]


def test_unknown_names_and_files(tmp_path):
    with pytest.raises(BackboneError, match="unknown backbone"):
        load_backbone("NoSuchNet-7", None)
    with pytest.raises(BackboneError, match="not found"):
        load_backbone(str(tmp_path / "missing.json"), None)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(BackboneError, match="bad.json"):
        load_backbone(str(bad), None)
    cfg, _ = make_tiny_checkpoint(tmp_path, "tiny-vit")
    with pytest.raises(BackboneError, match="neither a file nor a known tag"):
        load_backbone(str(cfg), str(tmp_path / "nope.pt"))
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"\x00" * 100)
    with pytest.raises(BackboneError, match="broken.pt"):
        load_backbone(str(cfg), str(broken))


def test_openai_format_checkpoint_with_quick_gelu(tmp_path):
    """A config with quick_gelu loads a state dict in OpenAI's layout unchanged (how OpenAI weights are used)."""
    cfg, weights = make_tiny_checkpoint(tmp_path, "tiny-vit", quick_gelu=True)
    assert json.loads(cfg.read_text())["quick_gelu"] is True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bb = load_backbone(str(cfg), str(weights), device="cpu")
    assert bb.model_cfg["quick_gelu"] is True
    act = bb.model.transformer.resblocks[0].mlp.gelu
    assert type(act).__name__ == "QuickGELU"


def test_global_and_local_image_features(tiny_backbone):
    x = torch.randn(3, 3, tiny_backbone.image_size, tiny_backbone.image_size)
    g = tiny_backbone.encode_image(x)
    g2, local = tiny_backbone.encode_image(x, local=True)
    assert g.shape == (3, tiny_backbone.embed_dim)
    side = tiny_backbone.image_size // (32 if tiny_backbone.local_kind == "resnet_attnpool" else 8)
    assert local.shape == (3, side * side, tiny_backbone.embed_dim)
    # the pooled position of the attention pool / the ViT's pooled token is exactly the global feature
    torch.testing.assert_close(g2, g, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # a ResNet is encoded with its batch norms folded into the convolutions: float rounding
        plain = tiny_backbone.model.encode_image(x)
    assert float((g - plain).abs().max()) <= 1e-5 * float(plain.abs().max())


def test_resnet_local_features_are_attention_pool_outputs(sharp_rn):
    """Local features vary over the grid on a sharpened model (a random RN is nearly degenerate)."""
    x = torch.randn(2, 3, 64, 64)
    _, local = sharp_rn.encode_image(x, local=True)
    local = torch.nn.functional.normalize(local, dim=-1)
    cos = local @ local.transpose(1, 2)
    assert cos.min() < 0.99
    # the local features of each image are the attention pool applied with each cell as the query
    visual = sharp_rn.model.visual
    feats = visual.layer4(visual.layer3(visual.layer2(visual.layer1(visual.stem(x)))))
    flat = feats.flatten(2).permute(2, 0, 1)
    seq = torch.cat([flat.mean(0, keepdim=True), flat]) + visual.attnpool.positional_embedding[:, None]
    pool = visual.attnpool
    q = pool.q_proj(seq[3:4])  # grid cell 2 (row-major), position 3 in the sequence
    k, v = pool.k_proj(seq), pool.v_proj(seq)
    h = pool.num_heads
    qh = q.reshape(1, 2, h, -1).permute(1, 2, 0, 3)
    kh = k.reshape(-1, 2, h, k.shape[-1] // h).permute(1, 2, 0, 3)
    vh = v.reshape(-1, 2, h, v.shape[-1] // h).permute(1, 2, 0, 3)
    att = torch.softmax(qh @ kh.transpose(-1, -2) / (qh.shape[-1] ** 0.5), dim=-1) @ vh
    out = pool.c_proj(att.permute(2, 0, 1, 3).reshape(1, 2, -1))[0]
    _, raw_local = sharp_rn.encode_image(x, local=True)
    torch.testing.assert_close(raw_local[:, 2], out, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------------------
# bad weights files and devices: one line naming the flag, the cause chained
# ------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rn_cfg_and_vit_weights(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad_weights")
    rn_cfg, rn_weights = make_tiny_checkpoint(d, "tiny-rn")
    _, vit_weights = make_tiny_checkpoint(d, "tiny-vit")
    return d, rn_cfg, rn_weights, vit_weights


def _bad_file(d, kind, rn_weights):
    path = d / f"{kind}.pt"
    if kind == "text":
        path.write_text("model: RN50\nweights: see README\n")
    elif kind == "random":
        path.write_bytes(bytes(range(256)) * 8)
    elif kind == "truncated":
        data = rn_weights.read_bytes()
        path.write_bytes(data[:len(data) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "list":
        torch.save([1, 2, 3], path)
    return path


@pytest.mark.parametrize("kind,what", [("text", "a text file"), ("random", "not a loadable checkpoint"),
                                       ("truncated", "damaged or truncated"), ("empty", "an empty file"),
                                       ("list", "not a state dict")])
def test_not_a_checkpoint_names_pretrained_and_says_why(rn_cfg_and_vit_weights, kind, what):
    d, rn_cfg, rn_weights, _ = rn_cfg_and_vit_weights
    path = _bad_file(d, kind, rn_weights)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(BackboneError) as info:
            load_backbone(str(rn_cfg), str(path), device="cpu")
    msg = str(info.value)
    assert msg.startswith(f"--pretrained {path.resolve()}:") and what in msg and "\n" not in msg
    assert info.value.__cause__ is not None or kind == "list"


def test_weights_of_another_architecture_are_refused_with_the_mismatch(rn_cfg_and_vit_weights):
    d, rn_cfg, _, vit_weights = rn_cfg_and_vit_weights
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(BackboneError) as info:
            load_backbone(str(rn_cfg), str(vit_weights), device="cpu")
    msg = str(info.value)
    assert msg.startswith(f"--pretrained {vit_weights.resolve()}: these weights do not fit")
    assert "missing (e.g. visual." in msg and "unknown to it (e.g. visual." in msg and "\n" not in msg
    assert isinstance(info.value.__cause__, RuntimeError)


def test_torchscript_archive_is_read_not_refused(tmp_path, tiny_vit):
    """OpenAI's `clip` package ships TorchScript archives, which torch.load(weights_only=True) refuses."""
    from vlprompt.backbone.loading import _checkpoint_shapes

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.trace(tiny_vit.model.visual, torch.randn(1, 3, 32, 32))
        path = tmp_path / "visual_jit.pt"
        torch.jit.save(scripted, path)
        shapes = _checkpoint_shapes(str(path))
    assert shapes == {k[len("visual."):]: tuple(v.shape) for k, v in tiny_vit.model.state_dict().items()
                      if k.startswith("visual.")}


@pytest.mark.parametrize("device", ["gpu0", "cuda:x", "banana"])
def test_unknown_device_names_the_flag(device):
    from vlprompt.backbone import resolve_device

    with pytest.raises(BackboneError, match=rf"^--device {device}: not a device") as info:
        resolve_device(device)
    assert info.value.__cause__ is not None


def test_cuda_without_a_gpu_names_the_flag(monkeypatch):
    from vlprompt.backbone import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:1"):
        with pytest.raises(BackboneError, match=rf"^--device {device}: no CUDA GPU"):
            resolve_device(device)
    assert resolve_device(None).type == "cpu" and resolve_device("cpu").type == "cpu"
    with pytest.raises(BackboneError, match="--device meta: unsupported"):
        resolve_device("meta")


# -- OpenAI-format weights need QuickGELU ----------------------------------------------------------------------
def _openai_state_dict_file(tmp_path):
    """A state dict as saved from OpenAI's TorchScript model: open_clip's keys (a QuickGELU model's weights) and the
    archive's input_resolution / context_length / vocab_size entries."""
    qg_cfg, qg_weights = make_tiny_checkpoint(tmp_path, "tiny-vit", quick_gelu=True)
    state = torch.load(qg_weights, weights_only=True)
    state.update(input_resolution=torch.tensor(32), context_length=torch.tensor(77), vocab_size=torch.tensor(49408))
    path = tmp_path / "openai_state.pt"
    torch.save(state, path)
    return qg_cfg, qg_weights, path


def test_openai_format_weights_into_a_gelu_config_are_refused_naming_the_quickgelu_model(tmp_path):
    qg_cfg, qg_weights, path = _openai_state_dict_file(tmp_path)
    with pytest.raises(BackboneError) as info:
        load_backbone("RN50", str(path), device="cpu")  # refused before the (large) model is built
    msg = str(info.value)
    assert msg.startswith(f"--pretrained {path}: OpenAI-format weights") and "QuickGELU" in msg and "\n" not in msg
    assert msg.endswith("use --backbone RN50-quickgelu")
    gelu_cfg, _ = make_tiny_checkpoint(tmp_path, "tiny-vit")
    with pytest.raises(BackboneError, match=r'input_resolution/context_length/vocab_size.*"quick_gelu": true in the '
                                            r"model config .*tiny-vit-s0\.json"):
        load_backbone(str(gelu_cfg), str(path), device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        right = load_backbone(str(qg_cfg), str(path), device="cpu")  # the extra entries dropped, as open_clip does
        chosen = load_backbone(str(gelu_cfg), str(path), device="cpu", quick_gelu=False)  # the caller's choice
    for k, v in torch.load(qg_weights, weights_only=True).items():
        assert torch.equal(right.model.state_dict()[k], v), k
    assert type(right.model.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    # what the refusal prevents: the same weights under GELU give other features
    text = ["a photo of a dog.", "a photo of a cat."]
    assert not torch.allclose(right.encode_text(text), chosen.encode_text(text), atol=1e-4)


def test_torchscript_archive_into_a_gelu_config_is_refused(tmp_path, tiny_vit):
    gelu_cfg, _ = make_tiny_checkpoint(tmp_path, "tiny-vit")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.trace(tiny_vit.model.visual, torch.randn(1, 3, 32, 32))
        path = tmp_path / "ViT-B-32.pt"
        torch.jit.save(scripted, path)
        with pytest.raises(BackboneError, match=r"OpenAI-format weights \(a TorchScript archive.*QuickGELU"):
            load_backbone(str(gelu_cfg), str(path), device="cpu")


def test_a_weights_file_loads_without_open_clips_random_init_notice(tmp_path, caplog, capsys):
    """open_clip builds the model without weights and logs that it is random; vlprompt then loads the file."""
    import logging

    cfg, weights = make_tiny_checkpoint(tmp_path, "tiny-rn")
    handlers = list(logging.getLogger().handlers)
    with caplog.at_level(logging.INFO):
        load_backbone(str(cfg), str(weights), device="cpu")
    assert "No pretrained weights loaded" not in caplog.text + capsys.readouterr().err
    assert logging.getLogger().handlers == handlers and not logging.getLogger().filters
    with caplog.at_level(logging.INFO), pytest.warns(UserWarning, match="RANDOM weights"):
        load_backbone(str(cfg), None, device="cpu")  # random weights: open_clip's notice stays
    assert "No pretrained weights loaded" in caplog.text
