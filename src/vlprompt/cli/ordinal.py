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
    import copy

    from ..runs import resolve, run
    from . import build_parser
    from .train import request_from_args

    rest = list(args.train_args)
    if rest and rest[0] == "--":
        rest = rest[1:]
    if not rest:
        raise VLPromptError("give the training options after --, e.g. -- --method ordinalclip --dataset utkface ...")
    if "--output" in rest or any(a.startswith("--output=") for a in rest):
        raise VLPromptError("ordinal-folds writes OUTPUT/fold_<k>: give --output before --, not among the "
                            "train options")
    # the train command line, parsed and resolved as `vlprompt train` does (everything is checked before fold 0)
    parser = build_parser(["train", *rest])
    request = request_from_args(parser.parse_args(["train", *rest, "--output", "unused"]))
    probe = resolve(request)
    k, add = fold_plan(probe.data.dataset, dict(probe.data.options), args.folds)
    folds = list(range(k))
    if args.only:
        try:
            folds = sorted({int(x) for x in args.only.split(",")})
        except ValueError as e:
            raise VLPromptError(f"--only expects fold numbers like 0,2; got {args.only!r}") from e
        bad = [f for f in folds if not 0 <= f < k]
        if bad:
            raise VLPromptError(f"--only: fold(s) {bad} outside 0..{k - 1}")
    out = Path(args.output)
    runs = []
    for f in folds:
        req = copy.deepcopy(request)
        data = req.setdefault("data", {})
        data["options"] = {**data.get("options", {}), **add, "fold": f}
        res = run(resolve(req), out / f"fold_{f}", resume=args.resume, force=args.force,
                  progress=not getattr(args, "quiet", False))
        runs.append({"fold": f, "run": str(out / f"fold_{f}"), "results": res})
    summary = write_summary(out, probe.method, probe.data.dataset, k, runs)
    print_json(summary)
    return 0


def summarise_folds(rows: list[dict]) -> dict[str, dict]:
    """``{metric: {"mean", "std", "n"}}`` over folds, in the first fold's key order, with vlprompt's one mean +-
    std convention (:func:`vlprompt.stats.mean_std`: the population std, as CoOp's tables). Every fold must report
    the same metrics: a mean over a subset of the folds would be a plausible wrong number."""
    from ..stats import mean_std

    keys = list(rows[0])
    for i, row in enumerate(rows):
        if set(row) != set(keys):
            raise VLPromptError(f"fold {i} reports other metrics than the first fold: "
                                f"{sorted(set(keys) ^ set(row))}")
    out = {}
    for key in keys:
        mean, std = mean_std(row[key] for row in rows)
        out[key] = {"mean": mean, "std": std, "n": len(rows)}
    return out


def write_summary(out: Path, method: str, dataset: str, k: int, runs: list[dict]) -> dict:
    """``OUTPUT/summary.json``: every fold's test metrics (and ordinality) and their mean / std over folds."""
    from .._io import atomic_write_json
    from ..stats import STD_CONVENTION

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
               "mean_std": summarise_folds(rows), "std": STD_CONVENTION}
    atomic_write_json(out / "summary.json", summary)
    return summary
