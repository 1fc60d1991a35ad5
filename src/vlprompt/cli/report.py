"""``vlprompt table``: results of many runs as one table (one row per configuration, never merging two)."""
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


def cmd_table(args) -> int:
    from .._io import atomic_write_text
    from ..report import collect_results, markdown, summarize, summarize_base_to_new
    from ..stats import STD_CONVENTION

    summary = summarize(collect_results(args.paths), args.metric)
    b2n = summarize_base_to_new(args.paths)
    text = markdown(summary, b2n)
    if args.json:
        print_json({"std": STD_CONVENTION, "runs": summary, "base_to_new": b2n})
    else:
        print(text, end="")
    if args.output:
        atomic_write_text(args.output, text)
    return 0
