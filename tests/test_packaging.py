"""Packaging: every imported third-party module is declared, the tested stack is pinned in constraints.txt
(inside pyproject's ranges), and `make demo` checks up front what an offline machine lacks."""
from __future__ import annotations

import ast
import importlib.metadata
import json
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from packaging.requirements import Requirement

from vlprompt import demo

REPO = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib")  # stdlib from Python 3.11


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _declared(extras: tuple[str, ...] = ()) -> dict[str, Requirement]:
    project = _project()
    reqs = list(project["dependencies"])
    for extra in extras:
        reqs += project["optional-dependencies"][extra]
    return {_norm(r.name): r for r in map(Requirement, reqs)}


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version, f"constraints.txt: {line!r} is not an exact pin"
            pins[_norm(name)] = version.strip()
    return pins


def _third_party_imports(folder: Path, local: frozenset[str] = frozenset()) -> dict[str, str]:
    """Top-level module -> first file importing it, for absolute imports that are neither stdlib, vlprompt nor
    ``local`` (the package imports itself relatively: an absolute ``import ot`` is POT, not vlprompt/ot.py)."""
    local = set(local) | {"vlprompt"}
    found: dict[str, str] = {}
    for file in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(file.read_text(), str(file))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in local and top != "__future__":
                    found.setdefault(top, str(file.relative_to(REPO)))
    return found


def _undeclared(imports: dict[str, str], declared: dict[str, Requirement]) -> list[str]:
    dists = importlib.metadata.packages_distributions()
    missing = []
    for module, where in sorted(imports.items()):
        names = {_norm(d) for d in dists.get(module, [])}
        if not names & set(declared):
            missing.append(f"{module} (imported by {where}; distribution {sorted(names) or 'not installed'})")
    return missing


def test_every_third_party_module_imported_by_the_package_is_a_dependency():
    imports = _third_party_imports(REPO / "src" / "vlprompt")
    assert {"torch", "open_clip", "threadpoolctl", "scipy"} <= set(imports)  # the parser sees them
    # the executors of `vlprompt grid` (ray, submitit) and TensorBoard logging are optional extras, imported
    # only where they are used (with a message naming the extra when missing)
    optional = _declared(("ray", "slurm", "tensorboard"))
    assert _undeclared(imports, optional) == []
    required = {m for m in imports if m not in ("ray", "submitit", "tensorboard")}
    assert _undeclared({m: imports[m] for m in required}, _declared()) == []


def test_every_third_party_module_imported_by_the_tests_is_in_the_dev_extra():
    tests = REPO / "tests"
    # local: the test modules (conftest helpers) and test packages (tests/originals: `from originals.x import`)
    local = {p.stem for p in tests.glob("*.py")} | {p.parent.name for p in tests.glob("*/__init__.py")}
    imports = _third_party_imports(tests, frozenset(local))
    assert "pytest" in imports and "originals" not in imports
    assert _undeclared(imports, _declared(("dev",))) == []


def test_constraints_pin_torch_and_torchvision_exactly_within_the_declared_ranges():
    pins = _constraints()
    assert pins["torch"] == "2.14.1" and pins["torchvision"] == "0.29.1"
    declared = _declared(("dev", "tensorboard"))
    unpinned = sorted(set(declared) - set(pins))
    assert unpinned == [], f"constraints.txt lacks {unpinned}"
    outside = [f"{name}=={pins[name]} not in {req.specifier}" for name, req in declared.items()
               if not req.specifier.contains(pins[name], prereleases=True)]
    assert outside == []
    torch_req = declared["torch"]
    assert not torch_req.specifier.contains("3.0.0") and torch_req.specifier.contains("2.4.0")
    assert declared["open-clip-torch"].specifier.contains("3.3.0")
    assert not declared["open-clip-torch"].specifier.contains("4.0")


def test_license_is_an_spdx_string_and_the_venv_step_uses_the_constraints():
    assert _project()["license"] == "MIT"  # not the deprecated {text = ...} table
    makefile = (REPO / "Makefile").read_text()
    assert "pip install -q -c constraints.txt -e '.[dev]'" in makefile
    assert re.search(r"^\$\(STAMP\): .*constraints\.txt", makefile, re.M)


# ----------------------------------------------------------------------------------------- make demo


def _demo_error(capsys, argv) -> str:
    assert demo.main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err  # one line, no traceback
    return err[0]


def test_demo_missing_weights_file_names_the_make_variable(tmp_path, capsys):
    err = _demo_error(capsys, ["--pretrained", str(tmp_path / "RN50.pt"), "--root", str(tmp_path / "data"),
                               "--epochs", "1"])
    assert "not found" in err and "make demo BACKBONE=RN50-quickgelu PRETRAINED=/path/to/RN50.pt" in err


def test_demo_weights_neither_cached_nor_downloadable_names_the_make_variable(tmp_path):
    # conftest sets HF_HUB_OFFLINE=1: nothing can be downloaded, and the cache folder is empty
    problem = demo.check_weights("RN50", "openai", cache_dir=str(tmp_path / "hub"))
    assert problem is not None and "cannot get the 'openai' weights of RN50" in problem
    assert "make demo BACKBONE=RN50-quickgelu PRETRAINED=/path/to/RN50.pt" in problem  # OpenAI's: QuickGELU
    assert "not a pretrained tag" in demo.check_weights("RN50", "no-such-tag")
    problem = demo.check_weights("ViT-B-32", "laion2b_s34b_b79k", cache_dir=str(tmp_path / "hub"))
    assert "make demo PRETRAINED=/path/to/ViT-B-32.pt" in problem  # not OpenAI's: no QuickGELU


def test_demo_names_the_quickgelu_model_for_an_openai_weights_file(tmp_path):
    from vlprompt.testing import make_tiny_checkpoint

    _, weights = make_tiny_checkpoint(tmp_path, "tiny-vit", quick_gelu=True)
    import torch

    state = torch.load(weights, weights_only=True)
    state.update(input_resolution=torch.tensor(32), context_length=torch.tensor(77), vocab_size=torch.tensor(49408))
    torch.save(state, tmp_path / "RN50.pt")
    problem = demo.check_weights("RN50", str(tmp_path / "RN50.pt"))
    assert "OpenAI-format weights" in problem and "make demo BACKBONE=RN50-quickgelu PRETRAINED=" in problem
    assert demo.check_weights("RN50-quickgelu", str(tmp_path / "RN50.pt")) is None


def test_demo_offline_stops_in_seconds_with_one_line_and_leaves_no_folder(tmp_path):
    """`make demo` on a machine without network (the hub refuses connections) and without HF_HUB_OFFLINE: one
    line naming the make variables, well before huggingface_hub's ~50 s of retries, nothing left in $HOME."""
    import os
    import subprocess
    import time

    import vlprompt

    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE", "XDG_"))}
    env.update(HOME=str(home), HF_ENDPOINT="http://127.0.0.1:9",
               PYTHONPATH=os.pathsep.join([str(Path(vlprompt.__file__).parents[1]), env.get("PYTHONPATH", "")]))
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "vlprompt.demo"], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    elapsed = time.perf_counter() - t0
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and not done.stdout and len(lines) == 1, done.stderr
    assert "BACKBONE=RN50-quickgelu PRETRAINED=/path/to/RN50.pt" in lines[0] and "unreachable" in lines[0]
    assert elapsed < 45, elapsed  # huggingface_hub alone retries for ~46 s
    assert [p for p in home.rglob("*")] == [] and not (tmp_path / "runs").exists()


def test_failed_torchvision_download_leaves_no_empty_folder(tmp_path, monkeypatch):
    import os
    import urllib.error

    import torchvision.datasets as tvd

    from vlprompt.data.tv import read_torchvision
    from vlprompt.errors import DataError

    class Offline:  # makes its folders, then cannot download, as torchvision's datasets do offline
        def __init__(self, root, download=True):
            os.makedirs(os.path.join(root, "offline", "2750"), exist_ok=True)
            raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(tvd, "Offline", Offline, raising=False)
    with pytest.raises(DataError, match="offline: download it elsewhere"):
        read_torchvision("Offline", tmp_path / "new" / "data")
    assert not (tmp_path / "new").exists()  # it did not exist: made and removed
    mine = tmp_path / "mine"
    (mine / "kept").mkdir(parents=True)
    (mine / "notes.txt").write_text("the user's")
    with pytest.raises(DataError):
        read_torchvision("Offline", mine)
    assert sorted(p.name for p in mine.iterdir()) == ["kept", "notes.txt"]  # only what it made is gone


def test_demo_missing_dataset_names_the_make_variables_before_any_work(tmp_path, capsys, monkeypatch):
    weights = tmp_path / "RN50.pt"
    weights.write_bytes(b"")  # only its presence is checked up front

    def no_work(*args, **kwargs):
        raise AssertionError("the run started before the dataset was checked")

    import vlprompt.runs

    monkeypatch.setattr(vlprompt.runs, "run", no_work)
    err = _demo_error(capsys, ["--pretrained", str(weights), "--dataset", "dtd", "--root", str(tmp_path / "none"),
                               "--epochs", "1"])
    assert "dataset dtd cannot be read from" in err and "make demo DATA=/path/to/data DATASET=dtd" in err


def test_demo_runs_zero_shot_then_coop_and_prints_both(tmp_path, capsys):
    from vlprompt.testing import make_tiny_checkpoint

    cfg, weights = make_tiny_checkpoint(tmp_path / "model", "tiny-vit")
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        for split, n in (("train", 2), ("val", 1), ("test", 2)):
            (tmp_path / "data" / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(
                    tmp_path / "data" / split / c / f"{i}.png")
    argv = ["--backbone", str(cfg), "--pretrained", str(weights), "--dataset", "folder", "--root",
            str(tmp_path / "data"), "--shots", "1", "--epochs", "1", "--output", str(tmp_path / "runs"),
            "--device", "cpu"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert demo.main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert set(summary) == {"dataset", "backbone", "zero-shot accuracy", "CoOp 1-shot accuracy"}
    assert (tmp_path / "runs" / "zeroshot" / "results.json").is_file()
    assert (tmp_path / "runs" / "coop-1shots-seed1" / "results.json").is_file()
