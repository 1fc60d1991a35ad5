"""``vlprompt report``: the tables of a grid (or any runs), the published numbers beside them, few-shot curves.

:func:`build_report` (the numbers, as data), :func:`render` (Markdown, CSV, LaTeX), :func:`fewshot_curves`
(PNG + PDF). Everything reads the run directories only (results.json, eval/*.json): nothing is recomputed.
"""
from .figures import curve_data, fewshot_curves
from .render import FORMATS, records, render, sections
from .tables import (COLLAPSE_K, COLLAPSE_POINTS, COLLAPSE_RULE, COOP_DATASETS, DG_TARGETS, build_report, collapsed,
                     recipe_key)

__all__ = ["build_report", "render", "records", "sections", "FORMATS", "fewshot_curves", "curve_data", "collapsed",
           "recipe_key", "COLLAPSE_RULE", "COLLAPSE_POINTS", "COLLAPSE_K", "COOP_DATASETS", "DG_TARGETS"]
