"""The experiment layer: one path from a request to a run directory, for every method and baseline.

The CLI (``vlprompt train``, ``zeroshot``, ``linear-probe``), the Python API (:func:`train`), YAML config files
(``--config``) and grid cells all build a *request* (the keys of config.yaml, only what the user set) and call
:func:`resolve` (method preset, then the user's overrides, then validation of every field) and :func:`run`.
"""
from .config import (DataConfig, RunConfig, config_hash, default_cache_dir, dump_config, load_request,
                     merge_requests, request_of, resolve)
from .assembly import load_method, prepare_data, transforms_for
from .evaluate import base_to_new, evaluate, evaluate_run, harmonic_mean
from .execute import run, show_config, train
from .heads import export_run, interpret_run, predict_images

__all__ = ["DataConfig", "RunConfig", "resolve", "run", "train", "show_config", "load_request", "merge_requests",
           "request_of", "dump_config", "config_hash", "default_cache_dir", "prepare_data", "evaluate",
           "evaluate_run", "base_to_new", "harmonic_mean", "export_run", "predict_images", "interpret_run",
           "load_method", "transforms_for"]
