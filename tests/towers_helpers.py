"""Shared pieces of the tests of the methods with prompts inside the towers (IVLP, deep language prompting, VPT,
PromptSRC): a backbone whose towers differ in width, vlprompt's learned-state names <-> the originals' names, and
the equality checks against the written-out originals (tests/originals)."""
from __future__ import annotations

import warnings

import torch

from vlprompt.backbone import load_backbone
from vlprompt.testing import make_tiny_checkpoint

LAYERS = 4
NAMES = ["banded", "golden_retriever", "sword lily"]


def tower_files(directory, seed=5, layers=LAYERS, vision_width=96):
    """(config, weights) of a ViT with ``layers`` blocks per tower and a vision width other than the text width
    (64), made less degenerate (random towers map every image to nearly the same feature: the ViT's attention is
    sharpened, as the originals' tests do), written where ``load_backbone`` / ``--backbone`` read it."""
    cfg, weights = make_tiny_checkpoint(directory, "tiny-vit", seed=seed, sharpen=True, layers=layers,
                                        vision_width=vision_width)
    state = torch.load(weights)
    for key in state:
        if key.startswith("visual.transformer.resblocks.") and key.endswith("attn.in_proj_weight"):
            state[key] = state[key] * 3.0
    torch.save(state, weights)
    return cfg, weights


def load_files(files):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_backbone(str(files[0]), str(files[1]), "cpu")


def tower_backbone(directory, **kw):
    """(backbone, (config, weights)) of :func:`tower_files`."""
    files = tower_files(directory, **kw)
    return load_files(files), files


def to_original(state: dict) -> dict:
    """vlprompt's learned tensors by the originals' state-dict names (IVLP / VPT / PromptSRC)."""
    out = {}
    for key, t in state.items():
        if key == "prompt.ctx":
            out["prompt_learner.ctx"] = t[0, 0]
        elif key == "deep.vision_input":
            out["image_encoder.VPT"] = t
        elif key.startswith("deep.text."):
            out[f"text_encoder.transformer.resblocks.{key.split('.')[-1]}.VPT_shallow"] = t
        elif key.startswith("deep.vision."):
            out[f"image_encoder.transformer.resblocks.{key.split('.')[-1]}.VPT_shallow"] = t
        else:
            raise KeyError(key)
    return out


def randomise(method, seed=0, std=0.3):
    """Move every learned prompt (not the word-initialised context) to values that matter: N(0, std)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in method.named_parameters():
            if p.requires_grad and name != "prompt.ctx":
                p.copy_(torch.randn(p.shape, generator=g) * std)
            elif name == "prompt.ctx":
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def images(n=4, seed=0, size=32):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def assert_varies(logits, min_std=0.05):
    """Logits that differ between images and between classes (random towers can be nearly constant)."""
    assert logits.std(dim=0).min() > min_std and logits.std(dim=1).min() > min_std, logits


def assert_logits_equal(ours, reference, scale=100.0):
    """Logits equal to 1e-6 of the logit scale."""
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6 * scale)


def assert_gradients_equal(ours: dict, reference: dict, rel=1e-5):
    """Each gradient equal to ``rel`` of its largest entry, and not trivially zero."""
    assert set(ours) == set(reference)
    for name, r in reference.items():
        scale = float(r.abs().max())
        assert scale > 0, name
        diff = float((ours[name] - r).abs().max())
        assert diff <= rel * scale, (name, diff, scale)


def method_gradients(method, loss) -> dict:
    """Gradients of ``loss`` for the method's learned tensors, by the originals' names."""
    params = {k: p for k, p in method.named_parameters() if p.requires_grad}
    grads = torch.autograd.grad(loss, list(params.values()))
    return to_original({k: g for k, g in zip(params, grads)})


def tower_folder(root, per_class=10, size=(36, 40)):
    """A folder dataset of 4 classes x ``per_class`` generated JPEGs (train / val / test 50 / 20 / 30 per class):
    2 base classes and 2 new ones."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, name in enumerate(["blue_thing", "green_thing", "red_thing", "grey_thing"]):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            arr = rng.integers(0, 80, (*size, 3), dtype=np.uint8)
            if c < 3:
                arr[..., c] += 150
            else:
                arr += 90
            Image.fromarray(arr).save(root / name / f"{i:02d}.jpg", quality=90)
    return root


def write_dassl_log(folder, config: dict) -> None:
    """The configuration Dassl's train.py prints into <output>/log.txt (yacs prints YAML)."""
    import yaml

    text = ("** Arguments **\nroot: data\n************\n** Config **\n************\n" + yaml.safe_dump(config)
            + "Collecting env info ...\n** System info **\n")
    (folder / "log.txt").write_text(text)


def cli(argv, capsys, code=0):
    """``vlprompt ARGV`` in this process: (stdout, stderr); the exit code must be ``code``."""
    from vlprompt.cli import main

    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert rc == code, err
    return out, err
