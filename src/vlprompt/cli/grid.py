"""``vlprompt grid``: a grid of ordinary runs, resumable, on a local process pool, Ray or Slurm.

    vlprompt grid --preset coop-fewshot --root ~/data --output runs/coop-fewshot --workers 4
    vlprompt grid --preset coop-fewshot --datasets dtd,oxford_flowers --backbone RN50 --output runs/fs
    vlprompt grid grid.yaml --output runs/g --executor ray --gpus-per-cell 1
    vlprompt grid --methods coop,cocoop --datasets dtd --shots 1,2,4 --seeds 1,2,3 --root ~/data \\
        --set train.epochs=10 --output runs/g
    vlprompt grid --preset coop-fewshot --root ~/data --output runs/coop-fewshot --status

A spec file holds the keys of a run's config.yaml and `axes:` (`{key: [values]}`, dotted keys for nested
options), optionally `grids:` (sub-grids), `evaluations:`, `roots:` and `preset:`. Each cell is an ordinary run
directory OUTPUT/<cell name>, e.g. OUTPUT/coop/dtd/shots4/seed1. Starting the same command again skips finished
cells, resumes interrupted ones and retries failed ones.
"""
from __future__ import annotations

import argparse

from ..errors import ConfigError
from .common import S, add_backbone_options, print_json, top_request

AXIS_FLAGS = (("--methods", "methods", "method"), ("--datasets", "datasets", "data.dataset"),
              ("--shots", "shots", "data.shots"), ("--seeds", "seeds", "seed"))


def register(sub) -> None:
    p = sub.add_parser("grid", help="a resumable grid of runs (protocol presets, a YAML spec or flags) on a local "
                       "pool, Ray or Slurm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("spec", nargs="?", default=None, help="grid spec YAML (run options, axes:, grids:, evaluations:)")
    p.add_argument("--preset", default=None, help="a protocol preset (see --list-presets); the spec and flags "
                   "override it")
    p.add_argument("--output", default=None, help="the grid's folder (one run directory per cell)")
    p.add_argument("--status", action="store_true", help="show each cell's state (done / running / failed / "
                   "interrupted / pending) from the run directories, and exit")
    p.add_argument("--list-presets", action="store_true", help="list the protocol presets and their cells, and exit")
    g = p.add_argument_group("axes (comma-separated values; on a preset's axis they replace its values, on a "
                             "sub-grid's axis they select among them)")
    for flag, dest, key in AXIS_FLAGS:
        g.add_argument(flag, dest=dest, default=None, metavar="V1,V2", help=f"values of {key}")
    g.add_argument("--set", dest="set_items", action="append", default=[], metavar="KEY=V1[,V2...]",
                   help="any run option, dotted for nested ones (train.epochs=10, method_options.n_ctx=4,8): one "
                        "value sets it, several make an axis (repeatable)")
    d = p.add_argument_group("data")
    d.add_argument("--root", default=S, help="data root of the cells (standard datasets live under it)")
    add_backbone_options(p)
    e = p.add_argument_group("executor")
    e.add_argument("--executor", default="local", help="local (process pool), ray, or slurm (submitit)")
    e.add_argument("--workers", type=int, default=None,
                   help="cells at once (local: the pool size, default 1, or one per GPU when there are several; "
                        "ray: tasks in flight; slurm: the array's parallelism)")
    e.add_argument("--cpus-per-cell", type=int, default=None,
                   help="CPU threads of a cell (local default: cores / workers; ray default: cores / workers or 1; "
                        "slurm default 4)")
    e.add_argument("--gpus-per-cell", type=float, default=None,
                   help="GPUs of a cell (ray, slurm; default 1 when this machine has CUDA, else 0)")
    e.add_argument("--ray-address", default=None, help="a Ray cluster to join (default: ray.init() here)")
    e.add_argument("--submitit-cluster", default=None,
                   help="slurm (default) or local (submitit's LocalExecutor: the jobs as processes here)")
    e.add_argument("--slurm-partition", default=None)
    e.add_argument("--slurm-time", type=int, default=None, help="minutes per job (default 1440)")
    e.add_argument("--slurm-mem", type=int, default=None, help="GB of memory per job")
    p.set_defaults(func=cmd_grid)


def build_spec(args):
    from ..grid import GridSpec, load_preset, load_spec, merge_over_preset, parse_values

    if args.spec:
        spec = load_spec(args.spec)
        if args.preset:
            if spec.preset and spec.preset != args.preset:
                raise ConfigError(f"--preset {args.preset} contradicts the spec's preset: {spec.preset}")
            if not spec.preset:
                spec = merge_over_preset(load_preset(args.preset), spec)
    elif args.preset:
        spec = load_preset(args.preset)
    else:
        spec = GridSpec()
    for flag, dest, key in AXIS_FLAGS:
        text = getattr(args, dest)
        if text is not None:
            spec.set_axis(key, parse_values(text), flag)
    for item in args.set_items:
        if "=" not in item:
            raise ConfigError(f"--set expects KEY=VALUE[,VALUE...], got {item!r}")
        key, text = item.split("=", 1)
        values = parse_values(text)
        if not values:
            raise ConfigError(f"--set {key}: give a value")
        if len(values) == 1:
            spec.set_value(key.strip(), values[0], f"--set {key.strip()}")
        else:
            spec.set_axis(key.strip(), values, f"--set {key.strip()}")
    singles = dict(top_request(args))
    if "root" in vars(args):
        singles["data.root"] = args.root
    for key, value in singles.items():
        spec.set_value(key, value, f"--{key.split('.')[-1].replace('_', '-')}")
    return spec


def cmd_grid(args) -> int:
    from ..grid import describe_presets, expand, grid_status, resolve_cells, run_grid
    from ..grid.status import STATES

    if args.list_presets:
        print(describe_presets())
        return 0
    cells = resolve_cells(expand(build_spec(args)))
    if not args.output:
        raise ConfigError("--output is required (the grid's folder)")
    if args.status:
        rows = grid_status(cells, args.output)
        width = max(len(r["name"]) for r in rows)
        for r in rows:
            from ..grid.status import main_metric

            detail = main_metric(r["metrics"]) if r["state"] == "done" else r["detail"]
            print(f"{r['state']:<11} {r['name']:<{width}}  {detail}".rstrip())
        counts = {s: sum(r["state"] == s for r in rows) for s in STATES}
        print(", ".join(f"{n} {s}" for s, n in counts.items() if n) + f" ({len(rows)} cells)")
        return 0
    summary = run_grid(cells, args.output, executor=args.executor, workers=args.workers,
                       cpus_per_cell=args.cpus_per_cell, gpus_per_cell=args.gpus_per_cell,
                       ray_address=args.ray_address, submitit_cluster=args.submitit_cluster,
                       slurm_partition=args.slurm_partition, slurm_time=args.slurm_time, slurm_mem=args.slurm_mem,
                       quiet=args.quiet)
    print_json(summary)
    return 1 if summary["failed"] or summary["busy"] else 0
