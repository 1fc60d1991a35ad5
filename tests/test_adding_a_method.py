"""docs/adding_a_method.md is true: its method, taken from the page as written, registers, trains, evaluates,
exports and predicts through the CLI and the Python API."""
from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path

import pytest
import torch

from conftest import color_folder
from vlprompt.cli import main
from vlprompt.methods import register_method, unregister_method
from vlprompt.testing import make_tiny_checkpoint

DOC = Path(__file__).resolve().parents[1] / "docs" / "adding_a_method.md"


def _method_module():
    """The page's method file (its ```python blocks up to the registry line), as a module of vlprompt.methods."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    code = "\n".join(b for b in blocks if "register_method(" not in b and "import vlprompt\n" not in b)
    assert "class Prototype(Method)" in code and "def setup(" in code
    name = "vlprompt.methods.adapters.prototype_from_the_docs"
    module = types.ModuleType(name)
    module.__package__ = "vlprompt.methods.adapters"
    sys.modules[name] = module
    exec(compile(code, str(DOC), "exec"), module.__dict__)
    return module


@pytest.fixture(scope="module")
def prototype():
    module = _method_module()
    register_method("prototype", module.Prototype)
    yield module.Prototype
    unregister_method("prototype")


def test_the_documented_method_runs_through_the_cli_and_the_api(prototype, tmp_path, capsys):
    import vlprompt
    from vlprompt.methods.base import Batch, Features

    cfg, weights = make_tiny_checkpoint(tmp_path / "models", "tiny-vit", seed=4, sharpen=True)
    data = color_folder(tmp_path / "data" / "shapes")
    common = ["--backbone", str(cfg), "--pretrained", str(weights), "--dataset", "folder", "--root", str(data),
              "--cache-dir", str(tmp_path / "cache"), "--quiet"]
    out = tmp_path / "proto"
    assert main(["train", "--method", "prototype", *common, "--shots", "2", "--epochs", "3", "--batch-size", "4",
                 "--penalty", "0.5", "--output", str(out)]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["setup"] == {"init": "means"} and res["config"]["method_options"]["penalty"] == 0.5
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 3 and {"loss_ce", "loss_penalty"} <= set(records[0])
    assert main(["export", str(out)]) == 0
    image = sorted(Path(data).rglob("*.jpg"))[0]
    assert main(["predict", str(out / "export"), str(image), "--json"]) == 0
    capsys.readouterr()
    assert main(["train", "--method", "prototype", *common, "--penalty", "-1", "--output", str(tmp_path / "x")]) == 2
    assert "--penalty" in capsys.readouterr().err
    backbone = vlprompt.load_backbone(str(cfg), str(weights), "cpu")
    method = vlprompt.build_method("prototype", {"penalty": 0.5}, backbone, ["cat", "dog"])
    assert method.learned_tensor("weight").shape == (2, backbone.embed_dim)
    feats = Features(global_=torch.randn(4, backbone.embed_dim))
    step = method.training_step(Batch(feats, torch.tensor([0, 1, 0, 1])))
    assert set(step.parts) == {"ce", "penalty"} and step.logits.shape == (4, 2)
    loaded, meta, _ = vlprompt.load_method(out)
    assert meta["method"] == "prototype" and isinstance(loaded, prototype)
