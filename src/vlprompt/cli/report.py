"""``vlprompt table`` and ``vlprompt report``: results of many runs as tables (one row per configuration, never
merging two), and the report of a grid with the papers' published numbers beside the measured ones."""
from __future__ import annotations

from .common import print_json


def register(sub) -> None:
    p = sub.add_parser("table", help="summarise runs: one row per configuration, mean ± std over its seeds "
                                     "(population std, as CoOp), and base-to-new with H on the averages")
    p.add_argument("paths", nargs="+", help="run directories or folders holding runs")
    p.add_argument("--metric", default="accuracy", help="metric of results.json (default accuracy)")
    p.add_argument("--output", default=None, help="also write the Markdown table to this file")
    p.add_argument("--json", action="store_true",
                   help="print JSON instead (every row with its full configuration identity, seeds and run paths)")
    p.set_defaults(func=cmd_table)

    from ..reporting import FORMATS

    r = sub.add_parser("report", help="the report of a grid: few-shot mean ± std and 11-dataset averages, "
                                      "base-to-new, transfer, ordinal folds, collapsed seeds flagged, the papers' "
                                      "published numbers beside (same protocol and backbone only) and few-shot curves")
    r.add_argument("paths", nargs="+", metavar="DIR", help="grid folders, run directories or folders holding runs")
    r.add_argument("--format", choices=FORMATS, default="md", help="md (default), csv (one line per number) or tex")
    r.add_argument("--output", default=None, help="write the report to this file instead of printing it")
    r.add_argument("--figures", default=None, metavar="DIR",
                   help="also write the few-shot curves (fewshot_curves.png and .pdf) into this folder")
    r.set_defaults(func=cmd_report)


def cmd_table(args) -> int:
    from .._io import atomic_write_text
    from ..errors import VLPromptError
    from ..reporting.collect import collect_results, excluded_line, markdown, summarize, summarize_base_to_new
    from ..stats import STD_CONVENTION

    summary = summarize(collect_results(args.paths), args.metric)
    excluded: list = []
    b2n = summarize_base_to_new(args.paths, excluded)
    if not (summary or b2n):  # refused before anything is written, as `vlprompt report`
        raise VLPromptError(f"no run results under {', '.join(map(str, args.paths))} (results.json of a finished "
                            f"run, or eval/base2new-*.json)" + (f"; {excluded_line(excluded[0])}" if excluded else ""))
    text = markdown(summary, b2n, excluded)
    if args.json:
        print_json({"std": STD_CONVENTION, "runs": summary, "base_to_new": b2n, "base_to_new_excluded": excluded})
    else:
        print(text, end="")
    if args.output:
        atomic_write_text(args.output, text)
    return 0


def cmd_report(args) -> int:
    from .._io import atomic_write_text
    from ..errors import VLPromptError
    from ..reporting import build_report, curve_data, fewshot_curves, render

    report = build_report(args.paths)
    if args.figures and not curve_data(report)["datasets"]:  # refused before anything is written
        raise VLPromptError("--figures: the runs hold no few-shot results (classes all) to draw")
    text = render(report, args.format)
    if args.output:
        atomic_write_text(args.output, text)
    else:
        print(text, end="")
    if args.figures:
        fewshot_curves(report, args.figures)
    return 0
