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


@pytest.fixture
def read_only(monkeypatch):
    """``read_only(folder, access=True)`` makes ``folder`` a read-only tree, as a lab's shared cache or a read-only
    mount is: its files and folders lose their write bits (which does not stop root, so CI running as root is
    covered by the rest), every attempt to create, change or remove something under it raises PermissionError
    (EROFS), and with ``access`` ``os.access(W_OK)`` says no for it, as it does on a read-only mount.
    Restored after the test."""
    import builtins
    import errno
    import io
    import stat

    roots: list[str] = []
    chmodded: list[tuple[Path, int]] = []

    def under(path) -> bool:
        try:
            p = os.path.abspath(os.fsdecode(path))
        except TypeError:  # a file descriptor
            return False
        return any(p == r or p.startswith(r + os.sep) for r in roots)

    def refuse(path):
        raise PermissionError(errno.EROFS, "Read-only file system (test)", os.fsdecode(path))

    real = {"open": builtins.open, "os_open": os.open, "access": os.access}
    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def guarded_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, bytes, os.PathLike)) and under(file) and set(mode) & set("wax+"):
            refuse(file)
        return real["open"](file, mode, *args, **kwargs)

    def guarded_os_open(path, flags, *args, **kwargs):
        if under(path) and flags & writing:
            refuse(path)
        return real["os_open"](path, flags, *args, **kwargs)

    def one_path(name):
        original = getattr(os, name)

        def guarded(path, *args, **kwargs):
            if under(path):
                refuse(path)
            return original(path, *args, **kwargs)
        return guarded

    def two_paths(name):
        original = getattr(os, name)

        def guarded(src, dst, *args, **kwargs):
            if under(src) or under(dst):
                refuse(dst)
            return original(src, dst, *args, **kwargs)
        return guarded

    def make(folder, access: bool = True) -> None:
        folder = Path(folder)
        for p in [folder, *folder.rglob("*")]:
            mode = p.stat().st_mode
            chmodded.append((p, mode))
            p.chmod(mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
        roots.append(os.path.abspath(folder))
        if len(roots) > 1:
            return
        monkeypatch.setattr(builtins, "open", guarded_open)
        monkeypatch.setattr(io, "open", guarded_open)
        monkeypatch.setattr(os, "open", guarded_os_open)
        for name in ("mkdir", "unlink", "remove", "rmdir", "truncate"):
            monkeypatch.setattr(os, name, one_path(name))
        for name in ("rename", "replace", "link", "symlink"):
            monkeypatch.setattr(os, name, two_paths(name))
        if access:
            monkeypatch.setattr(os, "access", lambda path, mode, *a, **k: (
                False if (mode & os.W_OK and under(path)) else real["access"](path, mode, *a, **k)))

    yield make
    monkeypatch.undo()
    for p, mode in reversed(chmodded):
        p.chmod(mode)
