"""vlprompt: prompt learning for CLIP-style vision-language models.

    >>> import vlprompt
    >>> backbone = vlprompt.load_backbone("RN50", "openai")
    >>> backbone.encode_text(["a photo of a cat."]).shape
    torch.Size([1, 1024])

    >>> results = vlprompt.train({"method": "coop", "data": {"dataset": "dtd", "root": "~/data", "shots": 16},
    ...                           "seed": 1}, output="runs/coop")

Methods (CoOp, CoCoOp, PLOT, OrdinalCLIP, the baselines...) are registered in :mod:`vlprompt.methods`
(``method_names()``; ``build_method(name, options, backbone, classnames)``); runs go through :mod:`vlprompt.runs`
(``resolve``, ``run``, ``train``, ``load_method(run_dir)``), exactly as the ``vlprompt`` command does.
"""
from __future__ import annotations

__version__ = "0.2.0"

__all__ = ["load_backbone", "Backbone", "train", "resolve", "run", "show_config", "build_method", "load_method",
           "method_names", "__version__"]


def __getattr__(name):  # keep `import vlprompt` light: torch and open_clip load on first use
    if name in ("load_backbone", "Backbone"):
        from . import backbone

        return getattr(backbone, name)
    if name in ("train", "resolve", "run", "show_config", "load_method"):
        from . import runs

        return getattr(runs, name)
    if name in ("build_method", "method_names"):
        from . import methods

        return getattr(methods, name)
    raise AttributeError(f"module 'vlprompt' has no attribute {name!r}")
