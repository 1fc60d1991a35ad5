"""PLOT (Chen et al., ICLR 2023): N prompts per class matched to the M local features of an image by optimal
transport.

Each class has N learned prompts (CoOp's layout, every CoOp variant: unified or class-specific context, class
token at the end, middle or front, random or word init). An image is M local features (ResNet: the attention pool
applied at every cell of the final grid; ViT: the projected patch tokens). For every (image, class) pair the
M local features and the N prompt features are two discrete distributions; with ``sim = local . text`` (cosines of
L2-normalised features) and cost ``1 - sim``, an entropic transport plan ``T`` (M, N) is found by Sinkhorn
(:func:`vlprompt.methods.parts.ot.sinkhorn_plan`, one batched call, each problem stopping on its own) and

    logits[b, k] = logit_scale * sum_{m, n} T[b, k, m, n] * sim[b, k, m, n].

As in the paper the plan is a constant for the gradient by default (``ot_grad=False``); ``ot_grad=True``
differentiates through the unrolled iterations (same forward values). Options that the reference hard-codes:

* ``marginals="uniform"`` (the reference: 1/M over local features, 1/N over prompts), or
  ``"global_similarity"``: the local features' mass follows their similarity to the image's global feature,
  ``a_m = softmax_m(cos(local_m, global) / ot_eps)`` -- Gibbs weights with the transport's own temperature, i.e.
  the kernel ``exp(-(1 - cos) / eps)`` the plan uses, applied to the distance to the global feature. Regions
  that look like the whole image get more mass; prompts keep 1/N each.
* ``global_logits=True``: add the global-feature logits (the normalised global feature against the normalised
  mean of the N unnormalised prompt features of each class), as the reference does for ImageNet only.

Shapes: B images, K classes, N prompts per class, M local features, E the joint embedding size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional, Sequence

import torch
import torch.nn.functional as F

from ...errors import CheckpointError, VLPromptError
from ..parts.ot import sinkhorn_plan, transport_logits
from ..base import Features, opt
from ..parts.context import ContextPromptMethod
from ..parts.options import ClassContextOptions
from ..parts.originals import check_known_tensors, check_trainer, dassl_context_import, shape

MARGINALS = ("uniform", "global_similarity")

# Transport problems per Sinkhorn call: the classes are processed in chunks of max(1, this // B) so that the
# solver's working tensors stay bounded (about 20 floats per problem entry) whatever the number of classes.
MAX_PROBLEMS = 32768


@dataclass
class PLOTConfig(ClassContextOptions):
    n_prompts: int = opt(4, "prompts per class N", min=1)
    ot_eps: float = opt(0.1, "entropic regularisation of the transport", gt=0)
    ot_iters: int = opt(100, "at most this many Sinkhorn iterations", min=1)
    ot_thresh: float = opt(1e-2, "Sinkhorn stops when the mean change of the row scaling is below this", min=0)
    ot_grad: bool = opt(False, "differentiate through the transport plan (the paper: plan detached)")
    global_logits: bool = opt(False, "add the global feature's logits (the default of the ImageNet recipe, as the "
                              "reference; off for other datasets)")
    marginals: str = opt("uniform", "mass of the local features: uniform (the paper) or global_similarity",
                         choices=MARGINALS)
    # N x K prompts per text chunk (CoOp: 256 prompts): with N = 4 and up to 128 classes the prompts run in one
    # chunk, without the checkpointing (a second forward) that chunks need; a chunk of 512 short suffixes keeps
    # about 2 GB of activations for the backward pass.
    chunk_size: int = opt(512, "prompts (N x K) per text-tower chunk", min=1)


def check_transport_options(eps, iters, thresh, marginals, where: str = "PLOT") -> None:
    if not (isinstance(eps, (int, float)) and eps > 0):
        raise VLPromptError(f"{where}: ot_eps must be a positive number, got {eps!r}")
    if not (isinstance(iters, int) and not isinstance(iters, bool) and iters >= 1):
        raise VLPromptError(f"{where}: ot_iters must be an integer >= 1, got {iters!r}")
    if not (isinstance(thresh, (int, float)) and thresh >= 0):
        raise VLPromptError(f"{where}: ot_thresh must be a number >= 0, got {thresh!r}")
    if marginals not in MARGINALS:
        raise VLPromptError(f"{where}: marginals must be one of {', '.join(MARGINALS)}, got {marginals!r}")


def local_marginals(local_n: torch.Tensor, global_: torch.Tensor, eps: float) -> torch.Tensor:
    """(B, M) mass of each local feature: ``softmax_m(cos(local_m, global) / eps)``; ``local_n`` normalised."""
    g = F.normalize(global_.float(), dim=-1)
    return torch.softmax(torch.einsum("bme,be->bm", local_n, g) / eps, dim=1)


def transport_similarity(global_: Optional[torch.Tensor], local: torch.Tensor, text: torch.Tensor, *,
                         eps: float = 0.1, iters: int = 100, thresh: float = 1e-2, grad: bool = False,
                         marginals: str = "uniform", class_chunk: Optional[int] = None, context: str = "",
                         return_plans: bool = False):
    """Transport similarity ``sum(T * sim)`` of every (image, class) pair: (B, K) (no logit scale).

    Args:
        global_: (B, E) global image features (used by ``marginals="global_similarity"`` only).
        local: (B, M, E) local image features, not necessarily normalised.
        text: (N, K, E) prompt features, not necessarily normalised.
        class_chunk: classes per Sinkhorn call (default: ``max(1, MAX_PROBLEMS // B)``); results do not depend
            on it (problems are independent and stop on their own).
        return_plans: also return the plans (B, K, M, N) (for pictures and tests).

    The similarities and the plan are computed in float32 with autocast off, whatever the input dtypes.
    """
    if local is None:
        raise VLPromptError("PLOT needs local image features (B, M, E); the feature source gave none")
    if local.dim() != 3 or text.dim() != 3 or local.shape[-1] != text.shape[-1]:
        raise VLPromptError(f"PLOT: local features must be (B, M, E) and text features (N, K, E) with the same E; "
                            f"got {tuple(local.shape)} and {tuple(text.shape)}")
    b, m, _ = local.shape
    n, k, _ = text.shape
    with torch.autocast(device_type=local.device.type, enabled=False):
        local_n = F.normalize(local.float(), dim=-1)
        text_n = F.normalize(text.float(), dim=-1)
        a = None
        if marginals == "global_similarity":
            if global_ is None:
                raise VLPromptError("PLOT: marginals='global_similarity' needs the global image features")
            a_img = local_marginals(local_n, global_, eps)  # (B, M)
        step = class_chunk or max(1, MAX_PROBLEMS // max(b, 1))
        out, plans = [], []
        for k0 in range(0, k, step):
            t = text_n[:, k0:k0 + step]  # (N, kc, E)
            kc = t.shape[1]
            sim = torch.einsum("bme,nke->bkmn", local_n, t)  # (B, kc, M, N)
            if marginals == "global_similarity":
                a = a_img[:, None, :].expand(b, kc, m).reshape(b * kc, m)
            plan = sinkhorn_plan((1.0 - sim).reshape(b * kc, m, n), a, None, eps=eps, max_iter=iters,
                                 thresh=thresh, differentiable=grad, context=context).reshape(b, kc, m, n)
            out.append(transport_logits(sim, plan))  # sum over (M, N) of T * sim
            if return_plans:
                plans.append(plan.detach())
        result = torch.cat(out, dim=1)
    if return_plans:
        return result, torch.cat(plans, dim=1)
    return result


def global_feature_logits(global_: torch.Tensor, text: torch.Tensor, scale: float) -> torch.Tensor:
    """(B, K): the normalised global feature against the normalised mean of the N unnormalised prompt features."""
    with torch.autocast(device_type=global_.device.type, enabled=False):
        g = F.normalize(global_.float(), dim=-1)
        t = F.normalize(text.float().mean(dim=0), dim=-1)
        return scale * g @ t.t()


class PLOT(ContextPromptMethod):
    """N learned prompts per class, compared with the image's local features by optimal transport."""

    name = "plot"
    family = "prompts"
    config_class = PLOTConfig
    inputs: ClassVar[frozenset] = frozenset({"global", "local"})
    summary = "N prompts per class matched to local image features by optimal transport"
    original_format = "dassl"

    @classmethod
    def preset(cls, data) -> dict:
        """The reference's recipe (CHENGY12/PLOT, plot-coop): ``configs/trainers/PLOT/rn50.yaml`` batch 128 (line
        3), sgd, lr 0.002, 50 epochs, cosine, one constant warm-up epoch at 1e-5 (lines 16-22) for every dataset
        and shot count; momentum 0.9 and weight decay 5e-4 are Dassl's defaults (``dassl/config/defaults.py``).
        ``scripts/main.sh``: 16 context vectors, unified context, class token at the end (``NCTX=16``, ``CSC=False``,
        ``CTP=end``), N = 4 prompts in the paper's runs (the README's example and Sec. 4.1 of Chen et al.).

        ImageNet: the global-feature logits are added to the transport logits. The reference's
        ``trainers/plot.py`` ``CustomCLIP.forward`` does ``if self.dataset == "ImageNet": logits2 = logits2 +
        logits`` with ``self.dataset = cfg.DATASET.NAME`` -- ImageNet itself, not its variants (their dataset
        configs have other names) -- so this is a preset of the ImageNet recipe, not a branch of the model; a
        run trained with it keeps the option wherever it is evaluated. (The repository's first commit has the
        addition commented out; the later code in its forks has it under that condition.)"""
        # (n_ctx: the config's default of 16 with a random init; set here it would refuse a user's word init)
        method_options = {"n_prompts": 4, "csc": False, "class_position": "end"}
        if data.dataset == "imagenet":
            method_options["global_logits"] = True
        return {"train": {"batch_size": 128, "epochs": 50, "optimizer": "sgd", "lr": 0.002, "momentum": 0.9,
                          "weight_decay": 5e-4, "scheduler": "cosine", "warmup_epochs": 1, "warmup_lr": 1e-5},
                "method_options": method_options}

    @classmethod
    def import_original(cls, run):
        """A CHENGY12/PLOT run: ``ctx`` (N, M, D), its N prompt sets (its class-specific and word-init paths crash
        in the original); the config (TRAINER.COOP, TRAINER.NAME PLOT); a word init counted in words, as CoOp's
        code PLOT builds on."""
        check_trainer(run, "PLOT", "plot")
        check_known_tensors(run, {"ctx", "token_prefix", "token_suffix"}, "PLOT prompt learner")
        ctx = run.state.get("ctx")
        if ctx is None or ctx.dim() != 3:
            raise CheckpointError(f"{run.path}: ctx has shape {shape(ctx) if ctx is not None else None}; PLOT saves "
                                  f"its N prompt sets as (N, n_ctx, dim)")
        return dassl_context_import(cls, run, ctx=ctx, mapped=ctx[:, None], section="TRAINER.COOP",
                                    options={"n_prompts": int(ctx.shape[0])}, n_sets=int(ctx.shape[0]),
                                    position_required=False)  # its other positions crash in the original

    def __init__(self, config: PLOTConfig, backbone, classnames: Sequence[str]):
        check_transport_options(config.ot_eps, config.ot_iters, config.ot_thresh, config.marginals)
        if not isinstance(config.n_prompts, int) or config.n_prompts < 1:
            raise VLPromptError(f"PLOT: n_prompts must be an integer >= 1, got {config.n_prompts!r}")
        super().__init__(config, backbone, classnames, n_prompts=config.n_prompts)
        self._calls = 0  # forward passes in training mode, named in a non-finite-plan error
        self._eval_batches = 0

    def begin_eval(self) -> None:
        super().begin_eval()
        self._eval_batches = 0

    def text_features(self) -> torch.Tensor:
        """(N, K, E) prompt features, not normalised; computed once per evaluation."""
        return self.once_per_eval(self.prompt.encode)

    def _context(self) -> str:
        if self.training:
            self._calls += 1
            return f"PLOT training step {self._calls} of this process"
        self._eval_batches += 1
        return f"PLOT evaluation batch {self._eval_batches}"

    def transport(self, feats: Features, return_plans: bool = False, class_chunk: Optional[int] = None):
        """Logits (B, K) and, with ``return_plans``, the plans (B, K, M, N)."""
        cfg = self.config
        text = self.text_features()
        out = transport_similarity(feats.global_, feats.local, text, eps=cfg.ot_eps, iters=cfg.ot_iters,
                                   thresh=cfg.ot_thresh, grad=cfg.ot_grad, marginals=cfg.marginals,
                                   class_chunk=class_chunk, context=self._context(), return_plans=return_plans)
        sim, plans = out if return_plans else (out, None)
        logits = self.logit_scale * sim
        if cfg.global_logits:
            if feats.global_ is None:
                raise VLPromptError("PLOT: global_logits=True needs the global image features")
            logits = logits + global_feature_logits(feats.global_, text, self.logit_scale)
        return (logits, plans) if return_plans else logits

    def forward(self, feats: Features) -> torch.Tensor:
        return self.transport(feats)

    # -- export: N text features per class, prediction needs local features --
    def export_head(self):
        cfg = self.config
        with torch.no_grad():
            text = self.prompt.encode().float()  # (N, K, E), not normalised (global logits use their mean)
        return {"text_features": text.contiguous()}, {
            "kind": "plot", "method": "plot", "logit_scale": self.logit_scale, "n_prompts": int(text.shape[0]),
            "ot_eps": cfg.ot_eps, "ot_iters": cfg.ot_iters, "ot_thresh": cfg.ot_thresh,
            "global_logits": cfg.global_logits, "marginals": cfg.marginals, "needs_local": True}

    @classmethod
    def head_logits(cls, tensors: dict, info: dict, backbone, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, K) of an exported PLOT head on preprocessed images (B, 3, H, W)."""
        missing = [key for key in ("logit_scale", "ot_eps", "ot_iters", "ot_thresh", "global_logits", "marginals")
                   if key not in info]
        if missing or "text_features" not in tensors:
            raise CheckpointError(f"PLOT head: missing {missing or ['text_features']} in head.json / head.safetensors")
        text = tensors["text_features"].to(backbone.device)
        if text.dim() != 3:
            raise CheckpointError(f"PLOT head: text_features must be (N, K, E), got {tuple(text.shape)}")
        check_transport_options(info["ot_eps"], info["ot_iters"], info["ot_thresh"], info["marginals"], "PLOT head")
        global_, local = backbone.encode_image(x, local=True)
        scale = float(info["logit_scale"])
        logits = scale * transport_similarity(global_, local, text, eps=info["ot_eps"], iters=info["ot_iters"],
                                              thresh=info["ot_thresh"], marginals=info["marginals"],
                                              context="PLOT head prediction")
        if info["global_logits"]:
            logits = logits + global_feature_logits(global_, text, scale)
        return logits
