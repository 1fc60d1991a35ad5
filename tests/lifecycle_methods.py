"""Methods defined outside vlprompt, one per lifecycle hook, for tests/test_lifecycle.py. Each is one class and
one registration (an entry point of a test package, or ``register_method``): nothing else in vlprompt knows
them."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vlprompt.errors import VLPromptError
from vlprompt.methods.base import Method, MethodConfig, StepOutput, cosine_logits, opt


@dataclass
class ClassEmbeddingConfig(MethodConfig):
    scale: float = opt(0.1, "standard deviation of the initial class embeddings", gt=0)


class _ClassEmbeddings(Method):
    """Free class embeddings (K, E) compared with the frozen image features; they belong to their classes."""

    family = "test"
    config_class = ClassEmbeddingConfig

    def __init__(self, config, backbone, classnames):
        super().__init__(config, backbone, classnames)
        g = torch.Generator().manual_seed(0)
        self.emb = nn.Parameter(torch.randn(len(classnames), backbone.embed_dim, generator=g) * config.scale)

    @classmethod
    def preset(cls, data):
        return {"train": {"epochs": 4, "lr": 0.05, "warmup_epochs": 0, "batch_size": 4}}

    def set_classnames(self, classnames):
        if list(classnames) != self.classnames:
            raise VLPromptError(f"{self.name}: class embeddings belong to the classes they were trained on")
        super().set_classnames(classnames)

    def forward(self, feats):
        return cosine_logits(feats.global_.float(), self.emb, self.logit_scale)

    def export_head(self):
        return {"text_features": F.normalize(self.emb.detach().float(), dim=-1)}, \
            {"kind": "linear", "logit_scale": self.logit_scale}


# -- setup from the training features ------------------------------------------------------------------------
@dataclass
class ClassMeansConfig(MethodConfig):
    views: bool = opt(False, "average every cached augmented view instead of the un-augmented features")


class ClassMeans(Method):
    """Nothing trained: the classifier is the normalised mean feature of each class's training images, built in
    ``setup`` (from the un-augmented features, or from all cached augmented views)."""

    name = "test-class-means"
    family = "test"
    config_class = ClassMeansConfig
    summary = "test-only: class means of the training features"
    setup_reads = frozenset({"train", "train_views"})

    @classmethod
    def trains(cls, config):
        return False

    @classmethod
    def setup_views(cls, config, train):
        return 3

    def __init__(self, config, backbone, classnames):
        super().__init__(config, backbone, classnames)
        self.register_buffer("means", torch.zeros(len(classnames), backbone.embed_dim))

    def setup(self, train, val):
        if self.config.views:
            feats = train.views().global_  # (V, N, E)
            labels = train.labels.repeat(feats.shape[0])
            feats = feats.reshape(-1, feats.shape[-1])
        else:
            feats, labels = train.features().global_, train.labels
        means = torch.zeros_like(self.means).index_add_(0, labels, F.normalize(feats.float(), dim=-1))
        self.means.copy_(F.normalize(means, dim=-1))
        return {"images": int(feats.shape[0])}

    def forward(self, feats):
        return cosine_logits(feats.global_.float(), self.means, self.logit_scale)

    def export_head(self):
        return {"text_features": self.means.clone()}, {"kind": "linear", "logit_scale": self.logit_scale}


# -- a gradient changed before the optimiser step ---------------------------------------------------------------
class ProjectedGradient(_ClassEmbeddings):
    """Cross-entropy, with its gradient projected off the gradient of an anchor loss (never in the update) where
    the two conflict, ProGrad's rule; counts the projections in its training state."""

    name = "test-projected-gradient"
    summary = "test-only: CE gradient projected off an anchor loss's gradient"

    def __init__(self, config, backbone, classnames):
        super().__init__(config, backbone, classnames)
        self.register_buffer("anchor", torch.randn(len(classnames), backbone.embed_dim,
                                                   generator=torch.Generator().manual_seed(7)), persistent=False)
        self.projections = torch.zeros((), dtype=torch.long)

    def training_step(self, batch):
        logits = self(batch.feats)
        ce = F.cross_entropy(logits.float(), batch.labels)
        anchor = (self.emb - self.anchor).pow(2).mean()
        return StepOutput(ce, logits, {"ce": ce.detach(), "anchor": anchor.detach()}, {"anchor": anchor})

    def on_before_optimizer_step(self, params, gradients):
        for p, g in zip(params, gradients["anchor"]):
            if p.grad is None or g is None:
                continue
            dot = (p.grad * g).sum()
            if dot < 0:
                p.grad -= dot / g.pow(2).sum() * g
                self.projections += 1

    def training_state(self):
        return {"projections": self.projections.clone()}

    def load_training_state(self, state):
        self.projections = state["projections"].clone()


# -- state kept across epochs ---------------------------------------------------------------------------------
class EpochAverage(_ClassEmbeddings):
    """The class embeddings of every epoch averaged with weights 1..E (later epochs count more) in
    ``on_train_epoch_end``; the average replaces them after the last epoch (PromptSRC's aggregation, simply)."""

    name = "test-epoch-average"
    summary = "test-only: class embeddings averaged over epochs"

    def __init__(self, config, backbone, classnames):
        super().__init__(config, backbone, classnames)
        self.total = torch.zeros_like(self.emb.detach())
        self.weight = torch.zeros(())

    def on_train_epoch_end(self, epoch, epochs):
        self.total += epoch * self.emb.detach()
        self.weight += epoch
        if epoch == epochs:
            with torch.no_grad():
                self.emb.copy_(self.total / self.weight)

    def training_state(self):
        return {"total": self.total.clone(), "weight": self.weight.clone()}

    def load_training_state(self, state):
        self.total, self.weight = state["total"].clone(), state["weight"].clone()


# -- a search on the validation split after training -----------------------------------------------------------
TEMPERATURES = (0.25, 0.5, 1.0, 2.0, 4.0)


class TemperatureSearch(_ClassEmbeddings):
    """After training, the logit temperature is chosen on the validation split (the lowest cross-entropy of the
    grid); it is a learned tensor, saved and exported."""

    name = "test-temperature-search"
    summary = "test-only: a temperature searched on val after training"
    setup_reads = frozenset({"val"})

    def __init__(self, config, backbone, classnames):
        super().__init__(config, backbone, classnames)
        self.register_buffer("temperature", torch.ones(()))

    def forward(self, feats):
        return super().forward(feats) / self.temperature

    def after_training(self, val):
        if val is None or not len(val):
            return {}
        feats = val.features()
        with torch.no_grad():
            base = super().forward(feats)
            losses = [float(F.cross_entropy(base / t, val.labels)) for t in TEMPERATURES]
        best = TEMPERATURES[min(range(len(losses)), key=losses.__getitem__)]
        self.temperature.fill_(best)
        return {"temperature": best, "val_images": len(val), "losses": losses}

    def export_head(self):
        return {"text_features": F.normalize(self.emb.detach().float(), dim=-1)}, \
            {"kind": "linear", "logit_scale": self.logit_scale / float(self.temperature)}


METHODS = {cls.name: cls for cls in (ClassMeans, ProjectedGradient, EpochAverage, TemperatureSearch)}
