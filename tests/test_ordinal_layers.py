"""The ordinal code sits in its layers (data -> backbone -> methods -> engine -> cli, imports pointing left; see
tests/test_layout.py for the methods' own rules), and the regression baseline's value is decoded from its logits in
exactly one way."""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SRC = Path(__file__).resolve().parents[1] / "src"
METHODS = SRC / "vlprompt" / "methods"


def test_data_layer_imports_no_method_code():
    """Importing every module of vlprompt.data loads nothing of the methods, the backbone, the engine, the run
    layer or the CLI (rank parsing and k folds are data code; rank embeddings and losses are method code)."""
    code = (
        "import importlib, json, pkgutil, sys\n"
        "import vlprompt.data as d\n"
        "for m in pkgutil.iter_modules(d.__path__):\n"
        "    importlib.import_module('vlprompt.data.' + m.name)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('vlprompt'))))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                         check=True)
    loaded = json.loads(out.stdout)
    higher = ("vlprompt.methods", "vlprompt.ordinal", "vlprompt.backbone", "vlprompt.backbone.text_encoder", "vlprompt.engine",
              "vlprompt.runs", "vlprompt.cli", "vlprompt.backbone.cache")
    wrong = [m for m in loaded if m.startswith(higher)]
    assert not wrong, f"the data layer imported {wrong}"
    assert "vlprompt.data.ranks" in loaded and "vlprompt.data.ordinal" in loaded


def test_regression_decode_inverts_the_logits_exactly():
    """101 age ranks: logits up to ~4e4 whose difference carries the value; from float64 logits the value comes
    back to 1e-9, from float32 logits (what the model outputs) to ~3e-5 of a year."""
    from vlprompt.methods.ordinal.parts import regression_decode, regression_logits, regression_units

    rv = torch.arange(0, 101, dtype=torch.float32)
    units, mean, scale, tau = regression_units(rv)
    assert mean == pytest.approx(50.0) and scale == pytest.approx(float(rv.double().std()))
    z = torch.randn(64, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2
    logits = regression_logits(z, units, tau)
    assert logits.dtype == torch.float64 and float(logits.abs().max()) > 1e3
    torch.testing.assert_close(regression_decode(logits, units, tau), z, rtol=0, atol=1e-9)
    torch.testing.assert_close(regression_decode(logits, units, tau, mean, scale), mean + scale * z, rtol=0,
                               atol=1e-7)
    logits32 = regression_logits(z.float(), units, tau)
    assert logits32.dtype == torch.float32
    years = regression_decode(logits32, units, tau, mean, scale).double()
    assert float((years - (mean + scale * z.float().double())).abs().max()) < 1e-3
    # the argmax of the logits is the nearest rank
    value = mean + scale * z
    nearest = (value[:, None] - rv.double()[None]).abs().argmin(1)
    assert torch.equal(logits.argmax(1), nearest)


def test_one_regression_decode_for_loss_predictions_and_exported_head(tiny_rn):
    """The method's loss, its predictions and an exported head's values all recover the same regressed value
    (the standardised ``z`` for the loss, ``mean + scale * z`` for the others)."""
    from vlprompt.methods import build_method
    from vlprompt.methods.base import Features
    from vlprompt.methods.ordinal.base import head_predictions

    ages = [str(a) for a in range(10, 41)]
    m = build_method("rank-regression", {"image_encoder": "clip", "lr_image_encoder": 0.0, "loss": "l1"}, tiny_rn,
                     ages)
    feats = torch.randn(7, tiny_rn.embed_dim, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        m.head.weight.normal_(std=0.3)
        z = m.regress(Features(global_=feats)).double()
        logits = m(Features(global_=feats))
    value = m.mean + m.scale * z
    assert float(value.std()) > 1.0  # the values differ between images
    torch.testing.assert_close(m.predictions(logits)["expectation"].double(), value, rtol=0, atol=1e-4)
    tensors, info = m.export_head()
    exported = head_predictions(logits, tensors, info)
    torch.testing.assert_close(exported["value"].double(), value, rtol=0, atol=1e-4)
    torch.testing.assert_close(type(m).head_values(logits, tensors, info).double(), value, rtol=0, atol=1e-4)
    targets = torch.linspace(10, 40, 7)
    loss, _ = m.loss(logits, torch.zeros(7, dtype=torch.long), targets)
    expect = (z - (targets.double() - m.mean) / m.scale).abs().mean()
    assert loss.item() == pytest.approx(float(expect), rel=1e-5)


def test_vlprompt_ordinal_keeps_its_public_names():
    """``vlprompt.ordinal`` re-exports the names other code imports from it, from their layers."""
    import vlprompt.ordinal as ordinal
    from vlprompt.data import ranks
    from vlprompt.methods.ordinal import parts as ordinal_parts

    for name in ("RankValueError", "k_fold_indices", "rank_values_from_spec", "ranks_from_values"):
        assert getattr(ordinal, name) is getattr(ranks, name)
    for name in ("RankEmbeddings", "interpolation_weights", "ordinal_loss", "predict", "ordinal_metrics",
                 "similarity_matrix", "ordinality_score", "INTERPOLATION_KINDS", "regression_decode"):
        assert getattr(ordinal, name) is getattr(ordinal_parts, name)
