"""``vlprompt ordinal-folds``: one training run per fold of an ordinal dataset, and their mean +- std.

Everything after ``--`` is a ``vlprompt train`` command line without ``--output``; the command adds
``--dataset-option fold=<k>`` (and ``folds=<K>`` for datasets cut into folds here) and writes each fold's run
directory as ``OUTPUT/fold_<k>`` and the summary as ``OUTPUT/summary.json``. Finished folds are not retrained
(the run directories are the engine's: ``--resume`` continues interrupted ones).

    vlprompt ordinal-folds --output runs/adience -- --method ordinalclip --dataset adience --root ~/data/adience \\
        --shots 0 --backbone RN50 --pretrained openai --method-option image_encoder=vgg16
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import VLPromptError
from .common import print_json


def register(sub) -> None:
    p = sub.add_parser("ordinal-folds", help="k-fold runs of an ordinal method (mean +- std over folds)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True, help="folder of the fold runs (fold_<k>/) and summary.json")
    p.add_argument("--folds", type=int, default=None,
                   help="number of folds (default: the dataset's protocol: Adience 5, HCI dating 10, others 5)")
    p.add_argument("--only", default=None, help="run only these folds, e.g. 0,1 (the summary covers them)")
    p.add_argument("--resume", action="store_true", help="continue interrupted fold runs")
    p.add_argument("--force", action="store_true", help="retrain every fold")
    p.add_argument("train_args", nargs=argparse.REMAINDER,
                   help="-- followed by `vlprompt train` options (without --output)")
    p.set_defaults(func=cmd_ordinal_folds)


def fold_plan(dataset: str, options: dict, folds_arg) -> tuple[int, dict]:
    """(number of folds, dataset options to add besides ``fold``) for a dataset and its options."""
    from ..data import get_dataset_info
    from ..data.ordinal import NATURAL_FOLDS, fold_count

    info = get_dataset_info(dataset)
    if "fold" not in info.options:
        raise VLPromptError(f"dataset {dataset!r} has no folds (its options: {', '.join(info.options)})")
    if "fold" in options:
        raise VLPromptError("ordinal-folds sets --dataset-option fold=<k> itself; do not pass it")
    natural = NATURAL_FOLDS.get(dataset)
    if natural is not None:
        if folds_arg is not None and folds_arg != natural:
            raise VLPromptError(f"{dataset} comes with {natural} folds; --folds {folds_arg} does not apply")
        return natural, {}
    if folds_arg is not None and options.get("folds") is not None and int(options["folds"]) != folds_arg:
        raise VLPromptError(f"--folds {folds_arg} contradicts --dataset-option folds={options['folds']}")
    k = folds_arg if folds_arg is not None else fold_count(dataset, options)
    if k is None:
        raise VLPromptError(f"dataset {dataset!r} with these options has no folds (a split column, or fixed lists)")
    if k < 2:
        raise VLPromptError(f"--folds must be >= 2, got {k}")
    return k, ({"folds": k} if "folds" in info.options else {})


def cmd_ordinal_folds(args) -> int:
    from ..runner import RunConfig, default_cache_dir, run_training
    from . import build_parser
    from .common import data_config, parse_kv, pretrained_arg
    from .train import method_options, train_config

    rest = list(args.train_args)
    if rest and rest[0] == "--":
        rest = rest[1:]
    if not rest:
        raise VLPromptError("give the training options after --, e.g. -- --method ordinalclip --dataset utkface ...")
    if "--output" in rest or any(a.startswith("--output=") for a in rest):
        raise VLPromptError("ordinal-folds writes OUTPUT/fold_<k>: give --output before --, not among the "
                            "train options")
    parser = build_parser()
    probe = parser.parse_args(["train", *rest, "--output", "unused"])
    k, add = fold_plan(probe.dataset, parse_kv(probe.dataset_option), args.folds)
    folds = list(range(k))
    if args.only:
        try:
            folds = sorted({int(x) for x in args.only.split(",")})
        except ValueError:
            raise VLPromptError(f"--only expects fold numbers like 0,2; got {args.only!r}") from None
        bad = [f for f in folds if not 0 <= f < k]
        if bad:
            raise VLPromptError(f"--only: fold(s) {bad} outside 0..{k - 1}")
    out = Path(args.output)
    runs = []
    for f in folds:
        extra = [x for key, v in {**add, "fold": f}.items() for x in ("--dataset-option", f"{key}={v}")]
        fa = parser.parse_args(["train", *rest, *extra, "--output", str(out / f"fold_{f}")])
        cfg = RunConfig(method=fa.method, backbone=fa.backbone, pretrained=pretrained_arg(fa.pretrained),
                        data=data_config(fa), method_options=method_options(fa), train=train_config(fa),
                        device=fa.device, precision=fa.precision, cache_dir=fa.cache_dir or default_cache_dir(),
                        preprocess=fa.preprocess)
        res = run_training(cfg, out / f"fold_{f}", resume=args.resume, force=args.force,
                           progress=not getattr(args, "quiet", False))
        runs.append({"fold": f, "run": str(out / f"fold_{f}"), "results": res})
    summary = write_summary(out, probe.method, probe.dataset, k, runs)
    print_json(summary)
    return 0


def write_summary(out: Path, method: str, dataset: str, k: int, runs: list[dict]) -> dict:
    """``OUTPUT/summary.json``: every fold's test metrics (and ordinality) and their mean / std over folds."""
    from .._io import atomic_write_json
    from ..ordinal import summarise_folds

    rows = []
    for r in runs:
        res = r["results"]
        row = {k2: float(v) for k2, v in res.get("metrics", {}).items() if isinstance(v, (int, float))}
        for extra in ("ordinality", "ordinality_triples"):
            if isinstance(res.get(extra), (int, float)):
                row[extra] = float(res[extra])
        rows.append(row)
    if not rows or not rows[0]:
        raise VLPromptError("no fold produced test metrics (empty test splits?)")
    summary = {"method": method, "dataset": dataset, "folds": k, "ran": [r["fold"] for r in runs],
               "runs": [{"fold": r["fold"], "run": r["run"], "metrics": row} for r, row in zip(runs, rows)],
               "mean_std": summarise_folds(rows)}
    atomic_write_json(out / "summary.json", summary)
    return summary
