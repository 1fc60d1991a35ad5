"""The backbone layer: a frozen open_clip model with the views every method needs, and its extension points.

* :mod:`.loading`: ``load_backbone(name, pretrained)`` -- names, weights, the hub probe, checkpoint diagnostics,
  pixel statistics;
* :mod:`.model`: :class:`Backbone` -- the tokenizer, text encoding of strings, global ``(B, E)`` and local
  ``(B, M, E)`` image features in the joint space (frozen, or with prompts inside the image tower and gradients),
  the logit scale, the preprocess config of the weights, and :meth:`Backbone.supports`;
* :mod:`.text_encoder`: :class:`TextEncoder` -- the text tower on token embeddings (learned prompts), with per-layer
  prompts, on three exact paths (plain, cut, shared prefix);
* :mod:`.patches`: per-layer prompts of either tower and LoRA on the attention projections, applied only inside a
  context manager (the shared backbone is never left changed);
* :mod:`.cache`: the on-disk :class:`FeatureCache` of the frozen image tower's features (keyed by the unpatched
  tower's fingerprint).
"""
from __future__ import annotations

from .loading import (OPENAI_EXTRA_KEYS, RANDOM_WEIGHTS, check_pixels, load_backbone, openai_format,
                      quick_gelu_hint, resolve_device, tag_pixel_statistics)
from .model import PIXEL_KEYS, PRECISIONS, Backbone, BackboneSpec, compute_dtype, cpu_has_fast_bf16

__all__ = ["load_backbone", "Backbone", "BackboneSpec", "resolve_device", "RANDOM_WEIGHTS", "PIXEL_KEYS",
           "check_pixels", "tag_pixel_statistics", "PRECISIONS", "compute_dtype", "cpu_has_fast_bf16", "openai_format", "quick_gelu_hint", "OPENAI_EXTRA_KEYS"]
