"""Training recipes several methods share (each method's ``preset`` names the source of every value)."""
from __future__ import annotations

#: CoOp's epochs by shots (Zhou et al., IJCV 2022, Sec. 4.1, and the repository's configs/trainers/CoOp/*_ep*.yaml:
#: 1 shot 50, 2-4 shots 100, 8-16 shots 200); ImageNet: 50 whatever the shots (vit_b16_ep50 / rn50_ep50).
EPOCHS_BY_SHOTS = {1: 50, 2: 100, 4: 100, 8: 200, 16: 200}

#: Dassl's SGD recipe as CoOp's configs use it: sgd, lr 0.002, cosine per epoch, one constant warm-up epoch at
#: 1e-5 counted inside the epochs (configs/trainers/CoOp/*.yaml OPTIM); momentum 0.9 and weight decay 5e-4 are
#: Dassl's defaults (dassl/config/defaults.py, _C.OPTIM).
DASSL_SGD = {"optimizer": "sgd", "lr": 0.002, "momentum": 0.9, "weight_decay": 5e-4, "scheduler": "cosine",
             "warmup_epochs": 1, "warmup_lr": 1e-5}


def coop_epochs(shots: int, dataset: str) -> int:
    """CoOp's epochs for a number of shots (0: all images, as 16+ shots) and a dataset (ImageNet 50)."""
    if "imagenet" in dataset.lower():
        return 50
    for k in sorted(EPOCHS_BY_SHOTS):
        if 0 < shots <= k:
            return EPOCHS_BY_SHOTS[k]
    return 200


def coop_recipe(data) -> dict:
    """CoOp's training recipe (IJCV 2022, Sec. 4.1 "Training details"; KaiyangZhou/CoOp
    ``configs/trainers/CoOp/rn50_ep50.yaml`` and the ``*_ep100`` / ``*_ep200`` variants): :data:`DASSL_SGD`, batch
    32, epochs by shots (:func:`coop_epochs`)."""
    return {"batch_size": 32, "epochs": coop_epochs(data.shots, data.dataset), **DASSL_SGD}


def tip_adapter_templates(dataset: str) -> list[str]:
    """Tip-Adapter's prompts (gaopengcuhk/Tip-Adapter@d0e2d6f ``datasets/<name>.py``): the dataset's own hand-crafted
    prompt, CoOp's ``CUSTOM_TEMPLATES`` (e.g. ``datasets/dtd.py:8`` "{} texture.", ``datasets/eurosat.py:7`` "a
    centered satellite photo of {}."); ImageNet: CoOp's 7-prompt ensemble (``datasets/imagenet.py:177-183``),
    vlprompt's ``imagenet-select``. LP++ builds its zero-shot classifier from the same (FewShot-CLIP-Strong-Baseline
    ``utils.py:35-52``, ``datasets/*.py``)."""
    return ["imagenet-select"] if dataset.lower() == "imagenet" else ["dataset"]


__all__ = ["EPOCHS_BY_SHOTS", "DASSL_SGD", "coop_epochs", "coop_recipe", "tip_adapter_templates"]
