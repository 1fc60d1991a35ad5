"""CoOp (Zhou et al., IJCV 2022): a learned context in front of (or around) each class name."""
from __future__ import annotations

from dataclasses import dataclass

from ...errors import CheckpointError
from ..parts.context import ContextClassifier
from ..parts.options import ClassContextOptions
from ..parts.originals import check_known_tensors, check_trainer, dassl_context_import, shape
from ..parts.recipes import coop_recipe


@dataclass
class CoOpConfig(ClassContextOptions):
    pass


class CoOp(ContextClassifier):
    name = "coop"
    family = "prompts"
    config_class = CoOpConfig
    summary = "learned context (unified or class-specific; class token end/middle/front)"
    original_format = "dassl"

    @classmethod
    def preset(cls, data) -> dict:
        """CoOp's recipe (:func:`..parts.recipes.coop_recipe`): SGD lr 0.002, momentum 0.9, weight decay 5e-4,
        batch 32, one constant warm-up epoch at 1e-5, cosine, epochs by shots (50 / 100 / 100 / 200 / 200 for
        1 / 2 / 4 / 8 / 16 shots, ImageNet 50)."""
        return {"train": coop_recipe(data)}

    @classmethod
    def import_original(cls, run):
        """A KaiyangZhou/CoOp run: the prompt learner's ``ctx`` -- (M, D) unified or (K, M, D) class-specific
        (the shape says which: the original ignores CSC with a word init) -- and its config (TRAINER.COOP)."""
        check_trainer(run, "CoOp", "coop")
        check_known_tensors(run, {"ctx", "token_prefix", "token_suffix"}, "CoOp prompt learner")
        ctx = run.state.get("ctx")
        if ctx is None or ctx.dim() not in (2, 3):
            raise CheckpointError(f"{run.path}: ctx has shape {shape(ctx) if ctx is not None else None}; CoOp saves "
                                  f"(n_ctx, dim) or, class-specific, (n_cls, n_ctx, dim)")
        csc = ctx.dim() == 3
        return dassl_context_import(cls, run, ctx=ctx, mapped=ctx[None] if csc else ctx[None, None],
                                    section="TRAINER.COOP", options={"csc": csc},
                                    num_classes=int(ctx.shape[0]) if csc else None)
