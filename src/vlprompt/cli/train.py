"""``vlprompt train | zeroshot | linear-probe | eval | export | predict | interpret``.

``train`` runs any registered method; ``zeroshot`` and ``linear-probe`` are ``train --method zeroshot`` and
``train --method linear-probe`` (the same parser, the same resolution, the same run directory). The method's own
options are generated from its config class, so ``vlprompt train --method plot --help`` lists PLOT's options.
"""
from __future__ import annotations

import argparse
from typing import Optional

from ..errors import ConfigError
from .common import (add_backbone_options, add_data_options, data_request, parse_kv, print_json, top_request)
from .options import add_config_options, given_sections

#: the flags the run layer defines itself (a method option may not reuse one)
_COMMON_FLAGS = {"--method", "--config", "--output", "--resume", "--force", "--show-config", "--tensorboard",
                 "--method-option", "--backbone", "--pretrained", "--precision", "--preprocess", "--device",
                 "--cache-dir", "--dataset", "--root", "--shots", "--seed", "--allow-fewer", "--classes",
                 "--dataset-option", "--skip-bad-images", "--help", "--debug", "--quiet",
                 "--image-mean", "--image-std", "--image-interpolation", "--image-resize-mode", "--val-shots",
                 "--crop-scale"}


def prescan_method(argv) -> Optional[str]:
    """The method a ``train`` command line names (``--method M`` or the ``method`` of its ``--config`` file), so
    that its options can be added to the parser before parsing."""
    argv = list(argv or [])
    method = config = None
    for i, a in enumerate(argv):
        if a == "--method" and i + 1 < len(argv):
            method = argv[i + 1]
        elif a.startswith("--method="):
            method = a.split("=", 1)[1]
        elif a == "--config" and i + 1 < len(argv):
            config = argv[i + 1]
        elif a.startswith("--config="):
            config = a.split("=", 1)[1]
    if method is None and config is not None:
        try:
            from ..runs.config import read_yaml_mapping

            method = read_yaml_mapping(config, "--config").get("method")
        except ConfigError:  # the file is read again, and its error reported, when the command runs
            method = None
    return method


def _recipe(cls) -> dict:
    """The method's preset for a typical request (16 shots of a dataset other than ImageNet), to show the
    defaults a user gets in --help; --show-config prints the recipe for the actual data."""
    if cls is None:
        return {}
    from ..runs.config import DataConfig

    return cls.preset(DataConfig(dataset="folder", root="/", shots=16)) or {}


def _add_run_parser(sub, name: str, help_text: str, method: Optional[str], fixed: bool) -> None:
    from ..engine.trainer import TrainConfig
    from ..methods import method_class, method_names

    p = sub.add_parser(name, help=help_text, description=help_text,
                       epilog=None if (method or fixed) else
                       f"Methods: {', '.join(method_names())}. `vlprompt train --method M --help` lists the "
                       f"options of method M.")
    if not fixed:
        p.add_argument("--method", default=argparse.SUPPRESS, choices=method_names(),
                       help="the method to train (or the `method` of --config)")
    p.add_argument("--config", default=None, metavar="YAML",
                   help="a run configuration (the keys of a run's config.yaml); the flags given override it")
    p.add_argument("--output", default=None, help="run directory (required unless --show-config)")
    p.add_argument("--show-config", action="store_true",
                   help="print the resolved configuration (the method's preset + your settings), each value with "
                        "where it came from (user / recipe / default), and exit")
    add_backbone_options(p)
    add_data_options(p)
    cls = None
    if method is not None:
        try:
            cls = method_class(method)
        except ConfigError:  # an unknown method is reported by resolve(), with the known names
            cls = None
    taken = set(_COMMON_FLAGS)
    if cls is None or cls.trains(cls.config_class()):
        recipe = _recipe(cls)
        add_config_options(p, TrainConfig, "training (defaults: the method's paper recipe)", "train", taken=taken,
                           recipe=recipe.get("train"), recipe_name=f"{method}'s recipe for 16 shots")
        p.add_argument("--tensorboard", action="store_true", default=argparse.SUPPRESS,
                       help="also log the per-epoch records to RUN/tensorboard (needs tensorboard)")
        p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint")
    if cls is not None:
        add_config_options(p, cls.config_class, f"{method} options ({cls.summary})" if cls.summary
                           else f"{method} options", "method_options", taken=taken,
                           recipe=_recipe(cls).get("method_options"), recipe_name=f"{method}'s recipe")
    p.add_argument("--method-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a field of the method's config as KEY=VALUE (JSON values; repeatable)")
    p.add_argument("--force", action="store_true",
                   help="run again even if the run directory holds this run or another (only a vlprompt run "
                        "directory is ever cleared)")
    p.set_defaults(func=cmd_train, fixed_method=method if fixed else None)


def register(sub, method: Optional[str] = None) -> None:
    from ..methods import method_class, method_commands

    _add_run_parser(sub, "train", "train (or fit) a method: CoOp, CoCoOp, PLOT, OrdinalCLIP, the baselines...",
                    method, fixed=False)
    for command, name in method_commands().items():  # e.g. `vlprompt zeroshot` = `vlprompt train --method zeroshot`
        cls = method_class(name)
        _add_run_parser(sub, command, f"{cls.summary} (= train --method {name})", name, fixed=True)

    e = sub.add_parser("eval", help="evaluate a trained run on any dataset or class split")
    e.add_argument("run", help="run directory")
    add_data_options(e, fewshot=False, required=True)
    e.add_argument("--split", default="test", choices=["train", "val", "test"])
    e.add_argument("--base-to-new", action="store_true",
                   help="evaluate the base and the new classes (test split) and report their harmonic mean")
    add_backbone_options(e, device_only=True, cache_default="the run's own, from its config.yaml")
    e.set_defaults(func=cmd_eval)

    x = sub.add_parser("export", help="export a deployable head (safetensors + JSON)")
    x.add_argument("run")
    x.add_argument("--output", default=None, help="head directory (default RUN/export)")
    x.set_defaults(func=cmd_export)

    r = sub.add_parser("predict", help="top-k classes of image files with an exported head")
    r.add_argument("head", help="head directory written by `vlprompt export`")
    r.add_argument("images", nargs="+")
    r.add_argument("--topk", type=int, default=5)
    r.add_argument("--device", default=None)
    r.add_argument("--json", action="store_true", help="print JSON")
    r.set_defaults(func=cmd_predict)

    i = sub.add_parser("interpret", help="nearest vocabulary words to each learned context vector")
    i.add_argument("run")
    i.add_argument("--topk", type=int, default=5)
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_interpret)


def request_from_args(args) -> dict:
    """The run request of a ``train`` command line: its --config file, then the flags given over it."""
    from ..errors import ConfigError
    from ..runs import load_request, merge_requests

    req = load_request(args.config) if args.config else {}
    flags: dict = dict(top_request(args))
    method = args.fixed_method or getattr(args, "method", None)
    if args.fixed_method and req.get("method") not in (None, args.fixed_method):
        raise ConfigError(f"--config names method {req['method']!r}; this command runs {args.fixed_method}")
    if method is not None:
        flags["method"] = method
    data = data_request(args)
    if data:
        flags["data"] = data
    sections = given_sections(args, ("train", "method_options"))
    extra = parse_kv(args.method_option, "--method-option")
    both = sorted(set(extra) & set(sections["method_options"]))
    if both:
        raise ConfigError(f"{', '.join(both)} given both as a flag and as --method-option")
    sections["method_options"].update(extra)
    for key, value in sections.items():
        if value:
            flags[key] = value
    return merge_requests(req, flags)


def cmd_train(args) -> int:
    from ..errors import ConfigError
    from ..runs import dump_config, resolve, run

    cfg = resolve(request_from_args(args))
    if args.show_config:
        print(dump_config(cfg, annotate=True), end="")
        return 0
    if not args.output:
        raise ConfigError("--output is required (the run directory)")
    results = run(cfg, args.output, resume=getattr(args, "resume", False), force=args.force,
                  progress=not args.quiet)
    from ..engine import distributed

    if distributed.is_main():  # under torchrun every rank returns the results; one prints them
        print_json(results)
    return 0


def _eval_data(args):
    from ..runs import DataConfig

    d = data_request(args)
    return DataConfig(**d)


def cmd_eval(args) -> int:
    from ..errors import ConfigError
    from ..runs import base_to_new, evaluate_run

    device = getattr(args, "device", None)
    cache_dir = getattr(args, "cache_dir", None)
    if args.base_to_new:
        if getattr(args, "classes", "all") != "all" or args.split != "test":
            raise ConfigError("--base-to-new evaluates both halves of the test split: drop --classes / --split")
        print_json(base_to_new(args.run, _eval_data(args), device=device, cache_dir=cache_dir,
                               progress=not args.quiet))
        return 0
    print_json(evaluate_run(args.run, _eval_data(args), split=args.split, device=device, cache_dir=cache_dir,
                            progress=not args.quiet))
    return 0


def cmd_export(args) -> int:
    from ..runs import export_run

    out = export_run(args.run, args.output)
    print(f"exported head to {out}")
    return 0


def cmd_predict(args) -> int:
    from ..runs import predict_images
    from ..runs.config import check_device

    rows = predict_images(args.head, args.images, topk=args.topk, device=check_device(args.device))
    if args.json:
        print_json(rows)
    else:
        for row in rows:
            top = ", ".join(f"{t['class']} ({100 * t['probability']:.1f}%)" for t in row["top"])
            value = f"value {row['value']:.2f}; " if "value" in row else ""  # heads that predict a value
            print(f"{row['image']}: {value}{top}")
    return 0


def cmd_interpret(args) -> int:
    from ..runs import interpret_run

    rows = interpret_run(args.run, topk=args.topk)
    if args.json:
        print_json(rows)
    else:
        for r in rows:
            who = ", ".join(f"{k} {v}" for k, v in r.items() if k not in ("position", "words", "distances")
                            and v is not None)
            print(f"{who}, vector {r['position'] + 1}: " + " ".join(r["words"]))
    return 0
