"""``vlprompt zeroshot | linear-probe | features``: the training-free baselines and feature precomputation."""
from __future__ import annotations

import argparse

from ..errors import VLPromptError
from .common import add_backbone_options, add_data_options, data_config, pretrained_arg, print_json


def register(sub) -> None:
    z = sub.add_parser("zeroshot", help="zero-shot CLIP: hand-crafted prompts or a prompt ensemble, no training",
                       description="Classify every test image with the class text features of one or more "
                                   "prompt templates (several: prompt ensembling). Writes a run directory.")
    add_backbone_options(z)
    add_data_options(z, shots_default=0)
    z.set_defaults(seed=None)  # zero-shot samples nothing: a given --seed is refused, not ignored
    for action in z._actions:
        if action.dest == "shots":
            action.help = "must be 0: zero-shot evaluates every test image"
        elif action.dest == "seed":
            action.help = "not used by zero-shot (refused)"
    z.add_argument("--templates", nargs="+", default=["dataset"], metavar="TEMPLATE",
                   help="templates with '{}' for the class name and/or set names: dataset (the dataset's own "
                        "prompt, default), imagenet80 (CLIP's 80), imagenet-select (CoOp's 7), ensemble (CoOp's 7 "
                        "+ the dataset's); several are ensembled")
    _add_run_options(z)
    z.set_defaults(func=cmd_zeroshot)

    lp = sub.add_parser("linear-probe", help="CoOp's linear probe: logistic regression on frozen image features",
                        description="scikit-learn L-BFGS logistic regression on the unnormalised image features "
                                    "of the few-shot train split; C searched on the few-shot val split as CoOp "
                                    "does (coarse sweep 1e6..1e-6, then bisection). Writes a run directory.")
    add_backbone_options(lp)
    add_data_options(lp)
    g = lp.add_argument_group("linear probe")
    g.add_argument("--C", type=float, default=None, dest="C",
                   help="fixed inverse regularisation strength (default: searched on the val split)")
    g.add_argument("--search-steps", type=int, default=8, help="bisection steps after the coarse sweep (default 8)")
    g.add_argument("--max-iter", type=int, default=1000, help="L-BFGS iterations (default 1000)")
    _add_run_options(lp)
    lp.set_defaults(func=cmd_linear_probe)

    f = sub.add_parser("features", help="precompute (cache) the image features of a dataset, or inspect/clear "
                                        "the feature cache",
                       description="Encode a dataset's splits once into the feature cache (test transform; with "
                                   "--views N also N augmented views of the train split, as `vlprompt train "
                                   "--views N` uses them), so that later runs only read them.")
    add_backbone_options(f)
    add_data_options(f, shots_default=0)
    for action in f._actions:  # not needed by --info / --clear; checked in cmd_features otherwise
        if action.dest in ("dataset", "root"):
            action.required = False
    f.add_argument("--splits", default="train,val,test", help="comma-separated splits to encode (default all)")
    f.add_argument("--views", type=int, default=0, help="augmented views of the train split to cache (default 0)")
    f.add_argument("--local", action="store_true", help="cache local features too (PLOT)")
    f.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    mode = f.add_mutually_exclusive_group()
    mode.add_argument("--info", action="store_true", help="list what the cache holds and exit")
    mode.add_argument("--clear", nargs="?", const="all", default=None, metavar="FINGERPRINT",
                      help="delete the cached features (all, or one backbone fingerprint from --info) and exit")
    f.add_argument("--json", action="store_true", help="print JSON")
    f.set_defaults(func=cmd_features)


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", required=True, help="run directory (config.yaml, split.json, results.json, log.txt)")
    p.add_argument("--force", action="store_true", help="overwrite a run directory holding another run")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")


def _config(args, method: str, **extra):
    from ..baselines import BaselineConfig
    from ..runner import default_cache_dir

    return BaselineConfig(method=method, backbone=args.backbone, pretrained=pretrained_arg(args.pretrained),
                          data=data_config(args), device=args.device, precision=args.precision,
                          cache_dir=args.cache_dir or default_cache_dir(), preprocess=args.preprocess,
                          batch_size=args.batch_size, **extra)


def cmd_zeroshot(args) -> int:
    from ..baselines import run_baseline

    if args.seed is not None:
        raise VLPromptError("zero-shot samples nothing: --seed does not apply (it evaluates on all test images)")
    cfg = _config(args, "zeroshot", templates=list(args.templates))
    print_json(run_baseline(cfg, args.output, force=args.force, progress=not args.quiet))
    return 0


def cmd_linear_probe(args) -> int:
    from ..baselines import LinearProbeConfig, run_baseline

    probe = LinearProbeConfig(C=args.C, search_steps=args.search_steps, max_iter=args.max_iter)
    cfg = _config(args, "linear_probe", probe=probe)
    print_json(run_baseline(cfg, args.output, force=args.force, progress=not args.quiet))
    return 0


def cmd_features(args) -> int:
    from ..cache import FeatureCache
    from ..runner import default_cache_dir

    root = args.cache_dir or default_cache_dir()
    if args.info or args.clear is not None:
        given = [opt for opt, value in (("--dataset", args.dataset), ("--root", args.root)) if value is not None]
        if given:
            raise VLPromptError(f"{' and '.join(given)} do(es) not apply to --info / --clear (they act on the whole "
                                f"cache under --cache-dir)")
        cache = FeatureCache(root, progress=False)
        if args.info:
            _print_info(root, cache.info(), args.json)
        else:
            n = cache.clear(None if args.clear == "all" else args.clear)
            if args.json:
                print_json({"cache_dir": root, "removed_directories": n})
            else:
                print(f"removed {n} cache director{'y' if n == 1 else 'ies'} under {root}")
        return 0
    missing = [opt for opt, value in (("--dataset", args.dataset), ("--root", args.root)) if value is None]
    if missing:
        raise VLPromptError(f"the following arguments are required: {', '.join(missing)} (or pass --info / --clear)")
    which = [w.strip() for w in args.splits.split(",") if w.strip()]
    bad = [w for w in which if w not in ("train", "val", "test")]
    if bad or not which:
        raise VLPromptError(f"--splits: unknown split(s) {bad or [args.splits]}; use a comma-separated subset of "
                            f"train,val,test")
    if args.views < 0:
        raise VLPromptError(f"--views must be >= 0, got {args.views}")
    if args.views and "train" not in which:
        raise VLPromptError("--views caches augmented views of the train split: include train in --splits")
    if args.batch_size < 1:
        raise VLPromptError(f"--batch-size must be >= 1, got {args.batch_size}")
    from ..backbone import load_backbone
    from ..baselines import cache_features, prepare_splits

    data = data_config(args)
    splits = prepare_splits(data, which)
    backbone = load_backbone(args.backbone, pretrained_arg(args.pretrained), args.device, precision=args.precision)
    rows = cache_features(backbone, splits, FeatureCache(root, progress=not args.quiet), which=which,
                          views=args.views, local=args.local, preprocess=args.preprocess, batch_size=args.batch_size)
    summary = {"cache_dir": root, "dataset": splits.name, "backbone": args.backbone,
               "fingerprint": backbone.fingerprint, "requests": rows}
    if args.json:
        print_json(summary)
    else:
        for r in rows:
            print(f"{splits.name} {r['split']:5s} {r['transform']} view {r['view']}{' +local' if r['local'] else ''}: "
                  f"{r['images']} images ({r['misses']} encoded, {r['hits']} cached)")
        print(f"cache: {root} (backbone fingerprint {backbone.fingerprint})")
    return 0


def _print_info(root: str, rows: list, as_json: bool) -> None:
    if as_json:
        print_json({"cache_dir": root, "directories": rows})
        return
    if not rows:
        print(f"feature cache {root}: empty")
        return
    total = sum(r["bytes"] for r in rows)
    print(f"feature cache {root}: {len(rows)} director{'y' if len(rows) == 1 else 'ies'}, {total / 2**20:.1f} MiB")
    for r in rows:
        print(f"  {r['fingerprint']}  {r['backbone'] or '?'}  transform {r['transform_id']}  view {r['view']} "
              f"seed {r['seed']}{' local' if r['local'] else ''}  {r['images']} images  {r['bytes'] / 2**20:.1f} MiB")
