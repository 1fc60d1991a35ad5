"""The shared base of OrdinalCLIP and its baselines (:mod:`.ordinalclip`, :mod:`.ordinal_baselines`).

* :class:`OrdinalConfig` and :class:`OrdinalMethod`: rank values, the trainable image encoder
  (:mod:`.image_encoders`), per-component learning rates, MAE / accuracy metrics, the paper's recipe
  (:meth:`OrdinalMethod.preset`), epoch selection on the validation MAE, the ``ordinal`` export head and the plots
  written after training;
* :class:`RankPrompts` and :class:`PromptPrototypes`: rank prompts ``<sot> ctx rank_r . <eot>`` encoded by the
  frozen text tower into ``(R, E)`` prototypes, and cosine logits against them;
* :func:`head_predictions`: the values an exported ``ordinal`` head predicts.

Both method modules import this one and never each other.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...data.ranks import consecutive_integers, rank_values_from_names
from ...errors import CheckpointError, ConfigError, VLPromptError
from ..base import Features, Method, MethodConfig, opt
from ..parts.image_encoders import (IMAGE_ENCODERS, INPUT_NORMS, build_image_encoder, describe_encoder, has_imagenet_weights,
                             resolve_weights)
from .parts import (RankEmbeddings, ordinal_metrics, ordinality_score, predict, regression_decode,
                            regression_logits, similarity_matrix)
from ..parts.context import clean_init_words
from ..parts.options import TEXT_MODES

__all__ = ["PAPER_TRAIN", "IMDB_WIKI", "MORPH_CONTEXT", "DEFAULT_N_CTX", "TEXT_MODES", "OrdinalConfig",
           "OrdinalMethod", "RankPrompts", "PromptPrototypes", "head_predictions"]

#: the OrdinalCLIP paper's optimiser recipe (RAdam, lr 1e-4, cosine over 100 epochs, batch 32, no warm-up; the
#: reference's radam.yaml, lr_decay_cosine_max_epochs_100.yaml, default.yaml's batch size). Weight decay: the
#: reference's default.yaml has 0, its MORPH II comparison (morph_compare.yaml) 5e-4 (see
#: :meth:`OrdinalMethod.preset`). Every epoch is evaluated on the validation split (carved from the training
#: data) and the best epoch is kept (the reference's check_val_every_n_epoch: 1).
PAPER_TRAIN = {"optimizer": "radam", "lr": 1e-4, "epochs": 100, "batch_size": 32, "weight_decay": 0.0,
               "warmup_epochs": 0, "scheduler": "cosine", "eval_every": 1}

#: the named start of the reference's MORPH II comparison (``morph_compare.yaml`` line 4 / 21 / 37:
#: ``imdb-vgg16.yaml``: ``image_encoder_name: vgg16``, ``init_image_encoder_weights: .cache/vgg/vgg_imdb_wiki.pth``),
#: a VGG-16 trained for age on IMDB-WIKI as the OrdinalCLIP paper did for MORPH II -- not torchvision's ImageNet
#: weights, and not downloadable: the user gives the file
IMDB_WIKI = "imdb-wiki"
#: the context of the MORPH II comparison (``morph_compare.yaml`` line 5 / 22: ``init-context-morph.yaml``; the
#: value as in the repository's ``init-context-morph-additonal/init-context-morph-0-0.yaml``)
MORPH_CONTEXT = "age estimation: the age of the person is"

#: context vectors of a random context when n_ctx is not given (the reference's num_context_tokens: 10)
DEFAULT_N_CTX = 10



# --------------------------------------------------------------------------------------------------
# Base of every ordinal method
# --------------------------------------------------------------------------------------------------
@dataclass
class OrdinalConfig(MethodConfig):
    """Fields shared by OrdinalCLIP and its trained baselines."""

    image_encoder: str = opt("clip", "the trainable image encoder: clip (a trainable copy of the backbone's image "
                             "tower) or a torchvision network (vgg16: the paper's)", choices=IMAGE_ENCODERS)
    image_encoder_weights: Optional[str] = opt(
        "auto", "weights the torchvision image encoder starts from: auto (the paper's: torchvision's ImageNet "
        "weights where they exist, random for resnet10; clip: the backbone's), imagenet, none (random), a "
        "state-dict file, or imdb-wiki (the MORPH II recipe's VGG-16 start: the reference's vgg_imdb_wiki.pth, "
        "which you then give as the file)")
    image_encoder_input_norm: str = opt(
        "auto", "the pixel normalisation the torchvision encoder expects: auto (ImageNet's when it starts from "
        "trained weights, else CLIP's), clip or imagenet", choices=INPUT_NORMS)
    lr_image_encoder: float = opt(1.0, "learning-rate multiplier of the image encoder (0 freezes it; a frozen "
                                  "clip encoder uses the backbone's cached features)", min=0)
    rank_values: Optional[list[float]] = opt(None, "the value of each rank, e.g. bin centres [5, 15, 30] (default: the "
                                      "class names when all are numbers, else the rank indices 0..R-1)")

    def check(self) -> None:
        _check_rank_values(self.rank_values)
        enc = self.image_encoder
        if enc == "clip" and self.image_encoder_input_norm == "imagenet":
            raise ConfigError("image_encoder_input_norm=imagenet: the 'clip' image encoder takes CLIP-normalised "
                              "images; the option applies to torchvision encoders")
        w = self.image_encoder_weights
        if w == IMDB_WIKI and enc != "vgg16":
            raise ConfigError(f"image_encoder_weights={IMDB_WIKI} (the MORPH II recipe's start) is a VGG-16's; with "
                              f"--image-encoder {enc} give --image-encoder-weights auto, imagenet, none or a file")
        if enc == "clip" and w not in (None, "auto", "none"):
            raise ConfigError(f"image_encoder_weights={w!r}: the 'clip' image encoder starts from the backbone's "
                              f"weights; image_encoder_weights applies to torchvision encoders only")
        if w == "imagenet" and enc != "clip" and not has_imagenet_weights(enc):
            raise ConfigError(f"image_encoder_weights=imagenet: {enc} has no ImageNet weights in torchvision; use "
                              f"resnet18, a state-dict file or none")
        if w == "":
            raise ConfigError("image_encoder_weights is empty: give auto, imagenet, none or a state-dict file")


def _check_rank_values(values) -> None:
    if values is not None and not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise ConfigError(f"rank_values must be a list of numbers, got {values!r}")


class OrdinalMethod(Method):
    """Shared machinery of the ordinal methods: rank values, image encoder, metrics, export, plots.

    Subclasses implement ``forward`` -> ``(B, R)`` logits and may override :meth:`predictions` (regression),
    :meth:`prototypes` (the ``(R, E)`` vectors whose ordinality is reported) and :meth:`_export_tensors`.
    """

    #: OrdinalCLIP's text-to-image term couples the images of a batch (and the regression baseline standardises
    #: over it): not a mean of per-sample terms
    batch_coupled: ClassVar[bool] = True

    @classmethod
    def config_for_loading(cls, options: dict) -> dict:
        # a saved torchvision encoder's every weight is in the learned state: build it without fetching the
        # pre-trained file, keeping the input normalisation those weights implied
        from ..parts.image_encoders import resolve_weights

        name = options.get("image_encoder", "clip")
        if name == "clip" or resolve_weights(name, options.get("image_encoder_weights", "auto")) == "none":
            return options
        norm = options.get("image_encoder_input_norm", "auto")
        return {**options, "image_encoder_weights": "none",
                "image_encoder_input_norm": "imagenet" if norm == "auto" else norm}

    name: ClassVar[str] = "ordinal"
    family: ClassVar[str] = "ordinal"
    inputs: ClassVar[frozenset] = frozenset({"images"})
    head_kind: ClassVar[str] = "ordinal"

    def __init__(self, config: OrdinalConfig, backbone, classnames: Sequence[str], *, own_image_encoder: bool = True):
        super().__init__(config, backbone, classnames)
        self.register_buffer("rank_values", rank_values_from_names(classnames, config.rank_values).to(backbone.device),
                             persistent=False)
        self.image_encoder = None
        self._encoder_info: dict = {}
        if not own_image_encoder:
            pass
        elif not self.trains_own_image_encoder(config):
            # a frozen CLIP tower is the backbone's: use its (cached) features, no copy, no per-step encoding
            resolve_weights("clip", config.image_encoder_weights)
            self._encoder_info = {"image_encoder": "clip", "image_encoder_weights": "backbone",
                                  "image_encoder_weights_source": "the backbone's frozen image tower (cached features)",
                                  "image_encoder_input_norm": "clip"}
        else:
            if config.image_encoder_weights == IMDB_WIKI:
                raise ConfigError(
                    f"image_encoder_weights={IMDB_WIKI}: the MORPH II recipe (OrdinalCLIP's morph_compare.yaml) starts "
                    f"the VGG-16 from the IMDB-WIKI age weights the paper used (the reference's "
                    f".cache/vgg/vgg_imdb_wiki.pth, not in torchvision): pass that file with --image-encoder-weights "
                    f"/path/to/vgg_imdb_wiki.pth, or --image-encoder-weights imagenet to start from torchvision's "
                    f"ImageNet VGG-16 instead (not the paper's start)")
            self.image_encoder = build_image_encoder(config.image_encoder, backbone, config.image_encoder_weights,
                                                     config.image_encoder_input_norm)
            self._encoder_info = describe_encoder(config.image_encoder, self.image_encoder)
            if self.image_encoder.weights not in ("backbone", "imagenet", "none"):  # a file: recorded absolute,
                self.config = dataclasses.replace(  # so the run's config does not depend on the working directory
                    config, image_encoder_weights=os.path.abspath(os.path.expanduser(self.image_encoder.weights)))
            if config.lr_image_encoder == 0:
                self.image_encoder.requires_grad_(False)

    # -- the recipe and the hooks -------------------------------------------------------------------------
    @classmethod
    def preset(cls, data) -> dict:
        """The paper's recipe (:data:`PAPER_TRAIN`). On MORPH II (``morph2``), the reference's MORPH II comparison
        (xk-huang/OrdinalCLIP ``configs/meta_cfgs/morph_compare.yaml``): weight decay 5e-4
        (``weight_decay_5e-4.yaml``, lines 15 / 31 / 43 of the compare config, one per model) and the method's
        :meth:`morph_options` (its encoder, context...)."""
        train = dict(PAPER_TRAIN)
        options: dict = {}
        if data.dataset == "morph2":
            train["weight_decay"] = 5e-4
            options = cls.morph_options()
        return {"train": train, "method_options": options}

    @classmethod
    def morph_options(cls) -> dict:
        """Method options of the MORPH II comparison recipe (none unless the compare config has this model)."""
        return {}

    @classmethod
    def trains_own_image_encoder(cls, config) -> bool:
        """False for a frozen ``clip`` encoder (the backbone's cached features are used), else True."""
        return not (config.image_encoder == "clip" and config.lr_image_encoder == 0)

    @classmethod
    def input_kinds(cls, config) -> frozenset:
        """Images for a trained image encoder; the frozen tower's (cached) features otherwise."""
        return frozenset({"images"}) if cls.trains_own_image_encoder(config) else frozenset({"global"})

    def selection(self) -> Optional[tuple[str, str]]:
        """Keep the epoch with the lowest validation MAE of the expectation (the reference keeps its best
        validation epoch; here the validation split is carved from the training data)."""
        return ("mae_expectation", "min")

    def describe(self) -> dict:
        """The image encoder's resolved weights and their source, and where the rank values come from."""
        if self.config.rank_values is not None:
            source = "rank_values"
        elif _numeric(self.classnames):
            source = "the numeric class names"
        else:
            source = "rank indices (named ranks)"
        rv = self.rank_values.cpu()
        return {**self._encoder_info, "num_ranks": self.num_classes,
                "rank_values": f"{float(rv[0]):g}..{float(rv[-1]):g} ({source})"}

    # -- image side -----------------------------------------------------------------------------------
    def train(self, mode: bool = True):
        super().train(mode)
        if self.image_encoder is not None and self.config.lr_image_encoder == 0:
            self.image_encoder.eval()  # frozen: BatchNorm statistics stay as loaded
        return self

    def image_features(self, feats: Features) -> torch.Tensor:
        """``(B, E)`` image features (not normalised): the method's own encoder, or the backbone's cached ones."""
        if self.image_encoder is None:
            if feats.global_ is None:
                raise VLPromptError(f"{self.name}: expected image features of the frozen tower")
            return feats.global_.float()
        if feats.images is None:
            raise VLPromptError(f"{self.name} trains its image encoder: it needs images, not cached features")
        return self.image_encoder(feats.images).float()

    # -- rank values ------------------------------------------------------------------------------------
    def set_classnames(self, classnames: Sequence[str]) -> None:
        if len(classnames) != self.num_classes:
            raise VLPromptError(f"{self.name} was trained with {self.num_classes} ranks; it cannot predict "
                                f"{len(classnames)} ranks")
        super().set_classnames(classnames)
        self.rank_values = rank_values_from_names(classnames, self.config.rank_values).to(self.rank_values.device)

    def target_values(self, labels: torch.Tensor, targets: Optional[torch.Tensor]) -> torch.Tensor:
        """``(N,)`` targets in rank-value units: the samples' targets, else the value of their rank."""
        if targets is not None:
            return targets.float().to(labels.device)
        return self.rank_values.to(labels.device)[labels.long()]

    # -- predictions and metrics ------------------------------------------------------------------------
    def predictions(self, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        """``dict(argmax=(N,), expectation=(N,), index=(N,))`` in rank-value units."""
        return predict(logits, self.rank_values.to(logits.device))

    def metrics(self, logits: torch.Tensor, labels: torch.Tensor, targets: Optional[torch.Tensor] = None) -> dict:
        """MAE and accuracy of the argmax and expectation predictions (:func:`.ordinal_parts.ordinal_metrics`).

        Accuracy: the rounded prediction equals the target when rank values are consecutive integers (the
        reference), else prediction and target are snapped to their nearest rank value."""
        logits = logits.float().cpu()
        labels = labels.cpu()
        rv = self.rank_values.cpu()
        pred = self.predictions(logits)
        t = self.target_values(labels, None if targets is None else targets.cpu())
        out = ordinal_metrics(pred["argmax"], pred["expectation"], t,
                              rank_values=None if consecutive_integers(rv) else rv)
        out["rank_accuracy"] = 100 * int((pred["index"] == labels).sum()) / labels.numel()
        out["num_samples"] = int(labels.numel())
        return out

    # -- learning rates ---------------------------------------------------------------------------------
    def component_groups(self) -> list[tuple[str, list[nn.Parameter], float]]:
        """``(name, parameters, lr multiplier)`` of every learned component; subclasses add theirs."""
        groups = []
        if self.image_encoder is not None:
            groups.append(("image_encoder", list(self.image_encoder.parameters()), self.config.lr_image_encoder))
        return groups

    def param_groups(self, lr: float) -> list[dict]:
        out = []
        for name, params, mult in self.component_groups():
            params = [p for p in params if p.requires_grad]
            if params and mult > 0:
                out.append({"params": params, "lr": lr * mult, "name": name})
        return out

    def _freeze_zero_lr(self) -> None:
        """Parameters of a component with multiplier 0 get no gradient at all (and stay out of the optimiser)."""
        for _, params, mult in self.component_groups():
            if mult == 0:
                for p in params:
                    p.requires_grad_(False)

    # -- prototypes, export, plots ------------------------------------------------------------------------
    def prototypes(self) -> Optional[torch.Tensor]:
        """``(R, E)`` rank prototypes (normalised) whose ordinality is reported, or None."""
        return None

    def _export_tensors(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Head tensors and info (besides the image encoder and rank values); default: cosine to prototypes."""
        protos = self.prototypes()
        return {"prototypes": protos.detach().float().cpu()}, {"head": "cosine", "logit_scale": self.logit_scale}

    def export_head(self):
        """Kind ``ordinal``: the trainable image encoder's weights (``image_encoder.*``), the head (prototypes
        ``(R, E)``, or linear / regression weights) and the rank values; prediction needs no text tower."""
        with torch.no_grad():
            tensors, info = self._export_tensors()
        tensors = dict(tensors)
        tensors["rank_values"] = self.rank_values.detach().float().cpu()
        if self.image_encoder is not None:
            for k, v in self.image_encoder.state_dict().items():
                tensors[f"image_encoder.{k}"] = v.detach().cpu().contiguous()
            encoder = self.config.image_encoder
        else:
            encoder = "backbone"
        info = {"kind": "ordinal", "method": self.name, "image_encoder": encoder, **info,
                "consecutive_rank_values": consecutive_integers(self.rank_values.cpu())}
        return tensors, info

    _head_cache: ClassVar[list] = []  # [(tensors dict, encoder)] -- predict calls head_logits once per batch

    @classmethod
    def head_logits(cls, tensors: dict, info: dict, backbone, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, R)`` of an exported ``ordinal`` head on preprocessed images ``(B, 3, H, W)``."""
        encoder = info.get("image_encoder")
        x = x.to(backbone.device)
        with torch.no_grad():
            if encoder == "backbone":
                feats = backbone.encode_image(x)
            else:
                if cls._head_cache and cls._head_cache[0][0] is tensors:
                    module = cls._head_cache[0][1]
                else:
                    # the architecture only: the exported tensors replace every weight and buffer
                    module = build_image_encoder(encoder, backbone, "none", announce=False)
                    state = {k[len("image_encoder."):]: v for k, v in tensors.items() if k.startswith("image_encoder.")}
                    try:
                        module.load_state_dict({k: v.to(backbone.device) for k, v in state.items()})
                    except RuntimeError as e:
                        raise CheckpointError(f"exported image encoder {encoder!r} does not load: {e}") from e
                    module.eval()
                    cls._head_cache[:] = [(tensors, module)]
                with backbone.autocast():
                    feats = module(x).float()
            return _head_logits_from(feats.float(), tensors, info, backbone.device)

    @classmethod
    def head_values(cls, logits: torch.Tensor, tensors: dict, info: dict) -> torch.Tensor:
        """``(B,)`` predicted values of an exported head: the expectation over rank values (the regressed value
        itself for ``rank-regression``)."""
        return head_predictions(logits, tensors, info)["value"]

    def on_test_end(self, run_dir, logits: Optional[torch.Tensor], samples) -> dict:
        """Run-directory extras: ``predictions.png`` (predicted vs true values on ``samples``),
        ``prototype_similarity.png`` (cosine similarities of the prototypes) and the prototypes' ordinality
        (percent, :func:`.ordinal_parts.ordinality_score`, both definitions), returned for ``results.json``."""
        run_dir = Path(run_dir)
        out: dict = {}
        protos = self.prototypes()
        if protos is not None:
            with torch.no_grad():
                sim = similarity_matrix(protos.detach().float().cpu())
            out["ordinality"] = ordinality_score(protos.detach().float().cpu())
            out["ordinality_triples"] = ordinality_score(protos.detach().float().cpu(), definition="triples")
            _plot_similarity(run_dir / "prototype_similarity.png", sim, self.rank_values.cpu(), out["ordinality"],
                             self.name)
        if logits is not None and samples:
            labels = torch.tensor([s.label for s in samples])
            targets = None
            if all(s.target is not None for s in samples):
                targets = torch.tensor([float(s.target) for s in samples])
            pred = self.predictions(logits.float().cpu())
            _plot_predictions(run_dir / "predictions.png", self.target_values(labels, targets),
                              pred["expectation"], pred["argmax"], self.name)
        return out


def _numeric(names: Sequence[str]) -> bool:
    try:
        [float(c) for c in names]
    except ValueError:
        return False
    return True


# --------------------------------------------------------------------------------------------------
# Exported heads
# --------------------------------------------------------------------------------------------------
def _head_logits_from(feats: torch.Tensor, tensors: dict, info: dict, device) -> torch.Tensor:
    head = info.get("head")
    if head == "cosine":
        protos = tensors["prototypes"].to(device).float()
        return float(info["logit_scale"]) * F.normalize(feats, dim=-1) @ F.normalize(protos, dim=-1).t()
    if head == "linear":
        return F.linear(feats, tensors["weight"].to(device).float(), tensors["bias"].to(device).float())
    if head == "regression":
        z = F.linear(feats, tensors["weight"].to(device).float(), tensors["bias"].to(device).float())[:, 0]
        return regression_logits(z, tensors["rank_units"].float(), float(info["tau"]))
    raise CheckpointError(f"unknown ordinal head {head!r}")


def head_predictions(logits: torch.Tensor, tensors: dict, info: dict) -> dict[str, torch.Tensor]:
    """Predicted values of an exported ``ordinal`` head: ``dict(value=(N,), argmax=(N,), index=(N,))``.

    ``value`` is the expectation over rank values (the regressed value itself for ``rank-regression``)."""
    rv = tensors["rank_values"].float()
    logits = logits.float().cpu()
    if info.get("head") == "regression":
        value = regression_decode(logits, tensors["rank_units"].float(), float(info["tau"]), float(info["mean"]),
                                  float(info["scale"]))
        idx = logits.argmax(-1)
        return {"value": value, "argmax": rv[idx], "index": idx}
    pred = predict(logits, rv)
    return {"value": pred["expectation"], "argmax": pred["argmax"], "index": pred["index"]}


# --------------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------------
def _save_figure(fig, path: Path) -> None:
    import os

    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def _plot_predictions(path: Path, true: torch.Tensor, expectation: torch.Tensor, argmax: torch.Tensor,
                      title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t, e, a = (x.float().numpy() for x in (true, expectation, argmax))
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.scatter(t, a, s=6, alpha=0.35, color="tab:orange", label=f"argmax (MAE {abs(a - t).mean():.2f})")
    ax.scatter(t, e, s=6, alpha=0.5, color="tab:blue", label=f"expectation (MAE {abs(e - t).mean():.2f})")
    lo, hi = float(min(t.min(), e.min(), a.min())), float(max(t.max(), e.max(), a.max()))
    ax.plot([lo, hi], [lo, hi], color="gray", lw=1, ls="--")
    ax.set_xlabel("true value")
    ax.set_ylabel("predicted value")
    ax.set_title(f"{title}: predicted vs true ({len(t)} images)", fontsize=9)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    _save_figure(fig, path)


def _plot_similarity(path: Path, sim: torch.Tensor, rank_values: torch.Tensor, ordinality: float, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.6, 4.6))
    lo, hi = float(rank_values[0]), float(rank_values[-1])
    im = ax.imshow(sim.numpy(), cmap="viridis", extent=(lo, hi, hi, lo), interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="cosine similarity")
    ax.set_xlabel("rank value")
    ax.set_ylabel("rank value")
    ax.set_title(f"{title}: prototype similarities (ordinality {ordinality:.1f}%)", fontsize=9)
    fig.tight_layout()
    _save_figure(fig, path)


# --------------------------------------------------------------------------------------------------
# Rank prompts
# --------------------------------------------------------------------------------------------------
class RankPrompts(nn.Module):
    """``R`` prompts ``<sot> ctx_1..ctx_M w_r . <eot> <pad>..`` sharing their context; ``w_r`` = rank ``r``'s tokens.

    * context ``ctx`` ``(M, D)``: from words (their token embeddings; ``M`` = their token count, and an
      ``n_ctx`` that says otherwise is an error) or ``n_ctx`` (default :data:`DEFAULT_N_CTX`) draws of
      N(0, ``init_std``);
    * rank tokens, one of:

      - ``rank_embeddings`` (OrdinalCLIP): a :class:`.ordinal_parts.RankEmbeddings` giving ``(R, T, D)``,
        interpolated from ``B`` bases or free;
      - ``rank_words`` (CoOp on ranks): the token embeddings of each rank's words (any number of tokens per rank),
        fixed, or learned from that initialisation when ``learn_words`` is set.

    The prefix ``<sot> + ctx`` ``(1 + M, D)`` is shared; each rank's suffix ``(S, D)`` (``S = L - 1 - M``) is its
    rank tokens followed by the embeddings of ``". <eot> <pad>.."`` taken from the tokenizer, joined by
    concatenation / ``where`` (no in-place writes). ``encode()`` gives the ``(R, E)`` text features through
    :meth:`vlprompt.backbone.text_encoder.TextEncoder.encode_prompts` (``text_mode``: auto = shared prefix when exact).
    """

    def __init__(self, text_encoder, num_ranks: int, *, n_ctx: Optional[int] = None, init_words: Optional[str] = None,
                 init_std: float = 0.02, rank_embeddings: Optional[RankEmbeddings] = None,
                 rank_words: Optional[Sequence[str]] = None, learn_words: bool = False, text_mode: str = "auto",
                 chunk_size: Optional[int] = 256):
        super().__init__()
        if (rank_embeddings is None) == (rank_words is None):
            raise VLPromptError("rank prompts need either learned rank embeddings or rank words")
        self.text = text_encoder
        self.num_ranks = int(num_ranks)
        self.text_mode = text_mode
        self.chunk_size = chunk_size
        te = text_encoder
        self.init_words = clean_init_words(init_words)
        if self.init_words is not None:
            tokens = te.tokenize([self.init_words])
            n_words = int(te.eot_positions(tokens)[0]) - 1
            if n_ctx is not None and n_ctx != n_words:
                raise ConfigError(f"n_ctx (--n-ctx) = {n_ctx} but init (--init) {self.init_words!r} is {n_words} "
                                  f"tokens: word init learns one vector per token; drop n_ctx or set it to {n_words}")
            n_ctx = n_words
            ctx = te.embed(tokens)[0, 1:1 + n_ctx].clone()
        else:
            n_ctx = DEFAULT_N_CTX if n_ctx is None else n_ctx
            if n_ctx < 1:
                raise ConfigError(f"n_ctx must be >= 1 (the context needs at least one vector), got {n_ctx}")
            ctx = torch.empty(n_ctx, te.width)
            nn.init.normal_(ctx, std=init_std)
        self.n_ctx = int(n_ctx)
        self.ctx = nn.Parameter(ctx.to(te.device))
        self.rank_embeddings = rank_embeddings
        placeholder = " ".join(["X"] * self.n_ctx)
        if rank_embeddings is not None:
            if rank_embeddings.num_ranks != self.num_ranks:
                raise VLPromptError(f"{rank_embeddings.num_ranks} rank embeddings for {self.num_ranks} ranks")
            t = rank_embeddings.num_tokens
            words = [" ".join(["X"] * t)]  # one template: every rank has T tokens
        else:
            words = [str(w).replace("_", " ").strip() for w in rank_words]
            if len(words) != self.num_ranks or not all(words):
                raise ConfigError(f"rank_words: need {self.num_ranks} non-empty rank words, got {len(words)}")
        tokens = te.tokenize([f"{placeholder} {w}." for w in words])
        eot = te.eot_positions(tokens)
        if int(eot.max()) >= te.context_length or (tokens[:, -1] != 0).any():
            raise ConfigError(f"n_ctx: rank prompts longer than the context length {te.context_length} "
                                f"({self.n_ctx} context tokens + rank tokens)")
        emb = te.embed(tokens)  # (1 or R, L, D)
        p = 1 + self.n_ctx
        lengths = eot - 1 - p  # rank tokens of each prompt (between the context and ".")
        self.register_buffer("sot", emb[0, :1].clone(), persistent=False)  # (1, D)
        self.register_buffer("tail", emb[:, p:].clone(), persistent=False)  # (1 or R, S, D)
        self.register_buffer("eot", eot.expand(self.num_ranks).clone(), persistent=False)  # (R,)
        self.register_buffer("lengths", lengths.expand(self.num_ranks).clone(), persistent=False)
        self.words = None if rank_words is None else words
        self.word_embeds = None
        if rank_words is not None and learn_words:
            tmax = int(lengths.max())
            s = emb.shape[1] - p
            pos = torch.arange(s, device=emb.device)
            mask = pos[None, :] < lengths[:, None]  # (R, S)
            self.register_buffer("word_mask", mask[:, :, None], persistent=False)
            init = emb[:, p:p + tmax] * mask[:, :tmax, None]  # (R, Tmax, D), zero beyond each word
            self.word_embeds = nn.Parameter(init.clone())

    def rank_tokens(self) -> Optional[torch.Tensor]:
        """The learned rank tokens ``(R, T, D)`` (None for fixed rank words)."""
        if self.rank_embeddings is not None:
            return self.rank_embeddings()
        return self.word_embeds

    def prompt_embeddings(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prefix ``(P, D)``, suffix ``(R, S, D)`` and EOT positions ``(R,)`` (in the whole sequence)."""
        prefix = torch.cat([self.sot, self.ctx], dim=0)
        r = self.num_ranks
        if self.rank_embeddings is not None:
            ranks = self.rank_embeddings()  # (R, T, D)
            t = ranks.shape[1]
            rest = self.tail[:, t:].expand(r, -1, -1)
            suffix = torch.cat([ranks.to(rest.dtype), rest], dim=1)
        elif self.word_embeds is not None:
            s = self.tail.shape[1]
            padded = F.pad(self.word_embeds, (0, 0, 0, s - self.word_embeds.shape[1]))  # (R, S, D)
            suffix = torch.where(self.word_mask, padded, self.tail)
        else:
            suffix = self.tail
        return prefix, suffix, self.eot

    def encode(self, mode: Optional[str] = None) -> torch.Tensor:
        """Text features ``(R, E)``, not normalised."""
        prefix, suffix, eot = self.prompt_embeddings()
        return self.text.encode_prompts(prefix, suffix, eot, mode=mode or self.text_mode, chunk_size=self.chunk_size)

    def full_embeddings(self) -> torch.Tensor:
        """Whole token sequences ``(R, L, D)`` as the reference builds them (tests, the benchmark)."""
        prefix, suffix, _ = self.prompt_embeddings()
        return torch.cat([prefix[None].expand(self.num_ranks, -1, -1), suffix], dim=1)


def _word_embeddings(text_encoder, words: Sequence[str]) -> torch.Tensor:
    """Token embeddings of each word, padded to the longest with the embedding of token id 0 (as the reference
    pads its rank-name tokens): ``(len(words), Tmax, D)``."""
    te = text_encoder
    tokens = te.tokenize([str(w).replace("_", " ").strip() for w in words])
    counts = te.eot_positions(tokens) - 1
    tmax = int(counts.max())
    ids = torch.zeros(len(words), tmax, dtype=torch.long, device=tokens.device)
    for i, c in enumerate(counts.tolist()):
        ids[i, :c] = tokens[i, 1:1 + c]
    return te.embed(ids)


class PromptPrototypes:
    """For ordinal methods whose rank prototypes come from prompts (``self.prompts``, a :class:`RankPrompts`):
    logits = logit_scale * cos(image feature, prototype)."""

    def text_features(self) -> torch.Tensor:
        """``(R, E)`` normalised prototypes; computed once per evaluation."""
        return self.once_per_eval(lambda: F.normalize(self.prompts.encode().float(), dim=-1))

    def forward(self, feats: Features) -> torch.Tensor:
        image = F.normalize(self.image_features(feats), dim=-1)
        return self.logit_scale * image @ self.text_features().t()

    def prototypes(self) -> torch.Tensor:
        with torch.no_grad():
            return F.normalize(self.prompts.encode().float(), dim=-1)

    def interpretable_vectors(self) -> list[tuple[dict, torch.Tensor]]:
        """The context shared by all ranks ``({"context": "shared"}, (M, D))`` and each rank's own tokens
        ``({"rank": classname}, (T, D))`` where they are embeddings (OrdinalCLIP, rank-coop with learned words)."""
        with torch.no_grad():
            out = [({"context": "shared"}, self.prompts.ctx.detach().float())]
            tokens = self.prompts.rank_tokens()
            if tokens is not None:
                for r, name in enumerate(self.classnames):
                    out.append(({"rank": name}, tokens[r, :int(self.prompts.lengths[r])].detach().float()))
        return out
