"""Methods: each one is a config dataclass + an ``nn.Module`` in its own file, and one line below.

The registry names modules, not imported classes, so it does not depend on import side effects and importing
``vlprompt.methods`` stays cheap.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

from ..errors import VLPromptError
from .base import Features, Method, MethodConfig


@dataclass(frozen=True)
class MethodSpec:
    module: str
    cls: str
    config: str
    summary: str


METHODS: dict[str, MethodSpec] = {
    "coop": MethodSpec("vlprompt.methods.coop", "CoOp", "CoOpConfig",
                       "CoOp: learned context (unified or class-specific; class token end/middle/front)"),
    "cocoop": MethodSpec("vlprompt.methods.cocoop", "CoCoOp", "CoCoOpConfig",
                         "CoCoOp: context conditioned on each image by a meta-network"),
    "plot": MethodSpec("vlprompt.methods.plot", "PLOT", "PLOTConfig",
                       "PLOT: N prompts per class matched to local image features by optimal transport"),
    "ordinalclip": MethodSpec("vlprompt.methods.ordinalclip", "OrdinalCLIP", "OrdinalCLIPConfig",
                              "OrdinalCLIP: interpolated rank prompts as language prototypes, trained image encoder"),
    "rank-linear": MethodSpec("vlprompt.methods.ordinal_baselines", "RankLinear", "RankLinearConfig",
                              "ordinal baseline: image encoder + linear head over ranks (cross-entropy)"),
    "rank-regression": MethodSpec("vlprompt.methods.ordinal_baselines", "RankRegression", "RankRegressionConfig",
                                  "ordinal baseline: image encoder + direct regression of the value (L1 / L2)"),
    "rank-zeroshot": MethodSpec("vlprompt.methods.ordinal_baselines", "RankZeroShot", "RankZeroShotConfig",
                                "ordinal baseline: zero-shot CLIP over rank sentences (nothing trained)"),
    "rank-coop": MethodSpec("vlprompt.methods.ordinal_baselines", "RankCoOp", "RankCoOpConfig",
                            "ordinal baseline: CoOp context + fixed rank words, trained image encoder"),
}


def method_names() -> list[str]:
    return list(METHODS)


def get_method(name: str):
    """(Method class, config class) of a registered method."""
    spec = METHODS.get(name)
    if spec is None:
        raise VLPromptError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
    module = importlib.import_module(spec.module)
    return getattr(module, spec.cls), getattr(module, spec.config)


def build_method(name: str, config: dict | MethodConfig, backbone, classnames) -> Method:
    cls, cfg_cls = get_method(name)
    cfg = config if isinstance(config, MethodConfig) else cfg_cls.from_dict(dict(config or {}))
    return cls(cfg, backbone, classnames)


__all__ = ["METHODS", "MethodSpec", "Method", "MethodConfig", "Features", "get_method", "build_method",
           "method_names"]
