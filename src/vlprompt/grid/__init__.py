"""Grids of ordinary runs (``vlprompt grid``): a spec (a base request and axes, a protocol preset, or flags)
expands into named cells, each resolved by :func:`vlprompt.runs.resolve` before anything runs and run by
:func:`vlprompt.runs.run` into ``OUTPUT/<cell name>``; the features are computed once per grid; the cells run on a
local process pool, Ray or Slurm (submitit); the state lives in the run directories.

    from vlprompt.grid import load_preset, expand, resolve_cells, run_grid
    spec = load_preset("coop-fewshot")
    spec.set_axis("data.dataset", ["dtd"], "--datasets")
    spec.set_value("data.root", "~/data", "--root")
    summary = run_grid(resolve_cells(expand(spec)), "runs/coop-fewshot", workers=2)
"""
from .presets import preset_names
from .runner import run_grid
from .spec import (Cell, GridSpec, describe_presets, expand, load_preset, load_spec, merge_over_preset, parse_values,
                   resolve_cells, spec_from_mapping)
from .status import grid_status

__all__ = ["Cell", "GridSpec", "expand", "load_spec", "spec_from_mapping", "merge_over_preset", "parse_values",
           "resolve_cells", "load_preset", "preset_names", "describe_presets", "run_grid", "grid_status"]
