"""The interface every method implements; the engine knows methods only through it."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Features:
    """What a method sees of a batch of images.

    ``global_``: (B, E) image features of the frozen tower; ``local``: (B, M, E) or None; ``images``: (B, 3, H, W)
    for methods that train an image encoder (their features are computed inside the method).
    """

    global_: Optional[torch.Tensor] = None
    local: Optional[torch.Tensor] = None
    images: Optional[torch.Tensor] = None

    def to(self, device) -> "Features":
        return Features(*(None if t is None else t.to(device, non_blocking=True)
                          for t in (self.global_, self.local, self.images)))


@dataclass
class MethodConfig:
    """Base of every method's configuration (a dataclass; YAML-serialisable)."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MethodConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            from ..errors import VLPromptError
            raise VLPromptError(f"{cls.__name__}: unknown option(s) {sorted(unknown)}")
        return cls(**d)


class Method(nn.Module):
    """A prompt-learning method over a frozen backbone.

    Subclasses set ``needs_local`` (local image features), ``trains_image_encoder`` (the engine then passes
    images, not cached features), and implement ``forward`` -> logits (B, K).
    """

    name: ClassVar[str] = "method"
    needs_local: ClassVar[bool] = False
    trains_image_encoder: ClassVar[bool] = False

    def __init__(self, config: MethodConfig, backbone, classnames: Sequence[str]):
        super().__init__()
        self.config = config
        self.backbone = backbone  # frozen; its parameters are not part of this module's state
        self.classnames = list(classnames)
        self._eval_cache: Any = None

    # nn.Module would register the backbone as a submodule; keep it out of state_dict / parameters
    def __setattr__(self, key, value):
        if key == "backbone":
            object.__setattr__(self, key, value)
        else:
            super().__setattr__(key, value)

    @property
    def logit_scale(self) -> float:
        return self.backbone.logit_scale

    def set_classnames(self, classnames: Sequence[str]) -> None:
        self.classnames = list(classnames)
        self._eval_cache = None

    def forward(self, feats: Features) -> torch.Tensor:  # (B, K)
        raise NotImplementedError  # abstract

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, targets: Optional[torch.Tensor] = None):
        """(loss, parts) for a batch; cross-entropy by default."""
        loss = F.cross_entropy(logits, labels)
        return loss, {"ce": loss.detach()}

    # evaluation: class text features computed once per evaluation, not per batch
    def begin_eval(self) -> None:
        self._eval_cache = None

    def end_eval(self) -> None:
        self._eval_cache = None

    def once_per_eval(self, compute) -> Any:
        """``compute()`` during training; in evaluation (eval mode, no grad) computed once and reused until
        ``end_eval`` -- the class text features do not change between test batches."""
        if self.training or torch.is_grad_enabled():
            return compute()
        if self._eval_cache is None:
            self._eval_cache = compute()
        return self._eval_cache

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    def param_groups(self, lr: float) -> list[dict]:
        return [{"params": self.trainable_parameters(), "lr": lr}]

    def learned_state(self) -> dict[str, torch.Tensor]:
        """Tensors a checkpoint must keep (class-independent unless the method is class-specific)."""
        return {k: v.detach() for k, v in self.state_dict().items()}

    def load_learned_state(self, state: dict[str, torch.Tensor]) -> None:
        from ..errors import CheckpointError

        own = self.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise CheckpointError(f"learned tensors do not match {self.name}: missing {missing}, unexpected {unexpected}")
        for k, v in state.items():
            if own[k].shape != v.shape:
                raise CheckpointError(f"learned tensor {k!r} has shape {tuple(v.shape)}, this {self.name} expects "
                                      f"{tuple(own[k].shape)} (a class-specific context trained on another class "
                                      f"list, or another context length?)")
        self.load_state_dict(state)

    def export_head(self) -> Optional[tuple[dict[str, torch.Tensor], dict]]:
        """A deployable head: tensors and JSON metadata (``kind`` tells ``predict`` how to use them), or None
        when the method cannot be reduced to fixed class features (``predict`` then rebuilds the method)."""
        return None

    def metrics(self, logits: torch.Tensor, labels: torch.Tensor, targets: Optional[torch.Tensor] = None) -> dict:
        """Evaluation metrics of logits (N, K): top-1 and mean per-class accuracy, in percent."""
        return classification_metrics(logits, labels, self.num_classes)

    @property
    def num_classes(self) -> int:
        return len(self.classnames)


def cosine_logits(image: torch.Tensor, text: torch.Tensor, scale: float) -> torch.Tensor:
    """scale * cos(image (B, E), text (K, E)) -> (B, K)."""
    return scale * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).t()


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    pred = logits.argmax(dim=-1).cpu()
    labels = labels.cpu()
    correct = (pred == labels).float()
    per_class = [correct[labels == c].mean().item() for c in range(num_classes) if (labels == c).any()]
    return {"accuracy": 100.0 * correct.mean().item(),
            "mean_per_class_accuracy": 100.0 * sum(per_class) / max(len(per_class), 1),
            "num_samples": int(labels.numel())}
