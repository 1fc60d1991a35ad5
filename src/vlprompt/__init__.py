"""vlprompt: prompt learning for CLIP-style vision-language models.

    >>> import vlprompt
    >>> backbone = vlprompt.load_backbone("RN50", "openai")
    >>> backbone.encode_text(["a photo of a cat."]).shape
    torch.Size([1, 1024])

Methods (CoOp, CoCoOp, PLOT, OrdinalCLIP...) are listed in :data:`vlprompt.methods.METHODS`; runs are driven by
:mod:`vlprompt.runner` or the ``vlprompt`` command.
"""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["load_backbone", "Backbone", "__version__"]


def __getattr__(name):  # keep `import vlprompt` light: torch and open_clip load on first use
    if name in ("load_backbone", "Backbone"):
        from . import backbone

        return getattr(backbone, name)
    raise AttributeError(f"module 'vlprompt' has no attribute {name!r}")
