"""``vlprompt table``: results of many runs as one table."""
from __future__ import annotations

from .common import print_json


def register(sub) -> None:
    p = sub.add_parser("table", help="summarise runs: mean ± std over seeds, and base-to-new with H")
    p.add_argument("paths", nargs="+", help="run directories or folders holding runs")
    p.add_argument("--metric", default="accuracy", help="metric of results.json (default accuracy)")
    p.add_argument("--output", default=None, help="also write the Markdown table to this file")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_table)


def cmd_table(args) -> int:
    from .._io import atomic_write_text
    from ..report import collect_results, markdown, summarize, summarize_base_to_new

    summary = summarize(collect_results(args.paths), args.metric)
    b2n = summarize_base_to_new(args.paths)
    if args.json:
        print_json({"runs": summary, "base_to_new": b2n})
    else:
        text = markdown(summary, b2n)
        print(text, end="")
        if args.output:
            atomic_write_text(args.output, text)
    return 0
