import os
import warnings
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from vlprompt.testing import make_tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]


def shared_data() -> Path:
    root = Path(os.environ.get("VLPROMPT_SHARED", REPO.parent / "shared")) / "assets" / "data"
    return root


def require_shared(*parts: str) -> Path:
    path = shared_data().joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared dataset not found: {path} (set VLPROMPT_SHARED to the shared/ folder)")
    return path


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny_models")


def _load(tiny_dir, kind, **kw):
    from vlprompt.backbone import load_backbone

    cfg, weights = make_tiny_checkpoint(tiny_dir, kind, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_backbone(str(cfg), str(weights), device="cpu")


@pytest.fixture(scope="session")
def tiny_vit(tiny_dir):
    return _load(tiny_dir, "tiny-vit")


@pytest.fixture(scope="session")
def tiny_rn(tiny_dir):
    return _load(tiny_dir, "tiny-rn")


@pytest.fixture(scope="session", params=["tiny-vit", "tiny-rn"])
def tiny_backbone(request, tiny_vit, tiny_rn):
    return tiny_vit if request.param == "tiny-vit" else tiny_rn


@pytest.fixture(scope="session")
def sharp_rn(tiny_dir):
    return _load(tiny_dir, "tiny-rn", sharpen=True, seed=1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def jpeg(path: Path, value: int = 0, rest=(10, 200)) -> Path:
    """An 8x8 JPEG at ``path`` (parents made) whose red channel is ``value``."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (value % 256, *rest)).save(path, quality=80)
    return path


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    import csv

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def color_folder(root: Path, per_class: int = 10, size=(40, 48)) -> Path:
    """A folder dataset of 3 classes (red / green / blue things) x ``per_class`` generated JPEGs under ``root``
    (the folder reader splits them 50 / 20 / 30 per class)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, name in enumerate(["red_thing", "green_thing", "blue_thing"]):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            arr = rng.integers(0, 80, (*size, 3), dtype=np.uint8)
            arr[..., c] += 150
            Image.fromarray(arr).save(root / name / f"{i:02d}.jpg", quality=90)
    return root
