"""``vlprompt features``: precompute (cache) the image features of a dataset, or inspect / clear the cache.

(``zeroshot`` and ``linear-probe`` are runs like any other: see :mod:`vlprompt.cli.train`.)"""
from __future__ import annotations

from ..errors import ConfigError
from .common import add_backbone_options, add_data_options, data_request, print_json, top_request


def register(sub) -> None:
    f = sub.add_parser("features", help="precompute (cache) the image features of a dataset, or inspect/clear "
                                        "the feature cache",
                       description="Encode a dataset's splits once into the feature cache (the test transform; "
                                   "with --views N also N augmented views of the train split, as `vlprompt train "
                                   "--views N` uses them), so that later runs only read them.")
    add_backbone_options(f)
    add_data_options(f)
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


def cmd_features(args) -> int:
    from ..backbone.cache import FeatureCache
    from ..runs import default_cache_dir

    a = vars(args)
    root = a.get("cache_dir") or default_cache_dir()
    data = data_request(args)
    if args.info or args.clear is not None:
        given = [f"--{k}" for k in ("dataset", "root") if k in data]
        if given:
            raise ConfigError(f"{' and '.join(given)} do(es) not apply to --info / --clear (they act on the whole "
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
    missing = [f"--{k}" for k in ("dataset", "root") if k not in data]
    if missing:
        raise ConfigError(f"the following arguments are required: {', '.join(missing)} (or pass --info / --clear)")
    which = [w.strip() for w in args.splits.split(",") if w.strip()]
    bad = [w for w in which if w not in ("train", "val", "test")]
    if bad or not which:
        raise ConfigError(f"--splits: unknown split(s) {bad or [args.splits]}; use a comma-separated subset of "
                          f"train,val,test")
    if args.views < 0:
        raise ConfigError(f"--views must be >= 0, got {args.views}")
    if args.views and "train" not in which:
        raise ConfigError("--views caches augmented views of the train split: include train in --splits")
    if "crop_scale" in data and not args.views:
        raise ConfigError("--crop-scale sets the crop of the augmented views: give --views N")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    from ..backbone import load_backbone
    from ..runs.config import pixel_overrides, resolve_data, resolve_model
    from ..runs.assembly import prepare_data
    from ..runs.features import cache_features

    # the same resolution and data preparation as a run, so the cached entries are the ones runs read
    top = top_request(args)
    data.setdefault("shots", 0)  # whole splits unless --shots samples a few-shot split as a run would
    d = resolve_data(data)
    seed = top.get("seed", 1) if d.shots else None
    if not d.shots and "seed" in top:
        raise ConfigError("--seed does not apply with --shots 0 (nothing is sampled)")
    model = resolve_model(top)
    splits, _ = prepare_data(d, seed, which)
    backbone = load_backbone(model["backbone"], model["pretrained"], model["device"], precision=model["precision"],
                             pixels=pixel_overrides(model))
    rows = cache_features(backbone, splits, FeatureCache(root, progress=not args.quiet), which=which,
                          views=args.views, local=args.local, preprocess=model["preprocess"],
                          batch_size=args.batch_size, crop_scale=d.crop_scale)
    summary = {"cache_dir": root, "dataset": splits.name, "backbone": model["backbone"],
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
