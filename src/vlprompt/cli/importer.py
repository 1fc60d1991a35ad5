"""``vlprompt import PATH --from coop|cocoop|plot|ordinalclip|maple|ivlp|tip-adapter|... --dataset D --root R --output RUN``.

Turns a run of the original repositories (a Dassl output folder or checkpoint, an OrdinalCLIP Lightning
``.ckpt``, a CLIP-LoRA ``lora_weights.pt``, Tip-Adapter's ``caches/<dataset>/`` tensors) into an ordinary run
directory (:mod:`vlprompt.runs.importer`). The run options are ``vlprompt train``'s: the source's own configuration
fills what the flags leave out.
"""
from __future__ import annotations

import argparse

from .common import add_backbone_options, add_data_options, print_json
from .options import add_config_options

_TAKEN = {"--from", "--output", "--epoch", "--source-config", "--force", "--config", "--method-option", "--help",
          "--debug", "--quiet", "--backbone", "--pretrained", "--precision", "--preprocess", "--device",
          "--cache-dir", "--dataset", "--root", "--shots", "--seed", "--allow-fewer", "--classes",
          "--dataset-option", "--skip-bad-images", "--image-mean", "--image-std",
          "--image-interpolation", "--image-resize-mode", "--val-shots", "--crop-scale", "--sampler",
          "--fewshot-file"}


def register(sub) -> None:
    import dataclasses

    from ..engine.trainer import TrainConfig
    from ..methods import method_class
    from ..runs.importer import importable_methods

    sources = importable_methods()

    p = sub.add_parser("import", help="import a run of a method's original code (--from lists them)",
                       description="Import a run of the original repositories (Dassl output folder or checkpoint, "
                                   "OrdinalCLIP Lightning .ckpt, CLIP-LoRA lora_weights.pt, Tip-Adapter's "
                                   "caches/<dataset> folder) into a vlprompt run directory, evaluated on the test "
                                   "split. Nothing from the files is executed.")
    p.add_argument("path", help="Dassl output folder (with its module folder: prompt_learner/, "
                                "MultiModalPromptLearner/, VLPromptLearner/...), a model.pth.tar-N / "
                                "model-best.pth.tar file, an OrdinalCLIP .ckpt, a CLIP-LoRA lora_weights.pt, or "
                                "Tip-Adapter's caches/<dataset> folder (or one of its files, to pick the shots)")
    p.add_argument("--from", dest="source", required=True, choices=sources, help="the repository that wrote it")
    p.add_argument("--output", required=True, help="the run directory to write")
    p.add_argument("--epoch", type=int, default=None, help="Dassl: import model.pth.tar-EPOCH (default: "
                   "model-best.pth.tar, else the last epoch)")
    p.add_argument("--source-config", default=None, metavar="YAML",
                   help="OrdinalCLIP: the run's config.yaml (default: found beside the .ckpt or above it)")
    p.add_argument("--config", default=None, metavar="YAML", help="a run configuration; the flags override it")
    p.add_argument("--force", action="store_true", help="replace the vlprompt run the output directory holds")
    add_backbone_options(p)
    add_data_options(p)
    taken = set(_TAKEN)
    add_config_options(p, TrainConfig, "training record (what the original run did; default: its configuration)",
                       "train", taken=taken)
    seen: set = set()
    for name in sources:  # the options of every importable method, each once; resolve() refuses a foreign one
        cls = method_class(name).config_class
        skip = tuple(f.name for f in dataclasses.fields(cls) if f.name in seen)
        seen |= {f.name for f in dataclasses.fields(cls)}
        add_config_options(p, cls, f"{name} options (over the source's; `vlprompt train --method {name} --help`)",
                           "method_options", skip=skip, taken=taken)
    p.add_argument("--method-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a field of the method's config as KEY=VALUE (JSON values; repeatable)")
    p.set_defaults(func=cmd_import, fixed_method=None)


def cmd_import(args: argparse.Namespace) -> int:
    from ..runs.importer import import_run
    from .train import request_from_args

    request = request_from_args(args)
    results = import_run(args.source, args.path, request, args.output, epoch=args.epoch,
                         source_config=args.source_config, force=args.force, progress=not args.quiet)
    print_json(results)
    return 0
