"""``vlprompt methods``: the registered methods, grouped by family, with what each reads and whether it trains."""
from __future__ import annotations

from .common import print_json


def register(sub) -> None:
    p = sub.add_parser("methods", help="list the methods by family (baselines, prompts, adapters, ...)",
                       description="Every registered method (`vlprompt train --method NAME`), grouped by family, with "
                                   "one line on what it does, what it reads of an image and whether it trains by "
                                   "gradient. `vlprompt train --method NAME --help` shows its options and recipe.")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_methods)


def rows() -> list[dict]:
    from ..methods import method_class, method_families

    out = []
    for family, names in method_families().items():
        for name in names:
            cls = method_class(name)
            config = cls.config_class()
            out.append({"name": name, "family": family, "summary": cls.summary,
                        "inputs": sorted(cls.input_kinds(config)), "trains": cls.trains(config),
                        "setup_reads": sorted(cls.setup_reads), "head": cls.head_kind})
    return out


def cmd_methods(args) -> int:
    table = rows()
    if args.json:
        print_json(table)
        return 0
    family = None
    width = max(len(r["name"]) for r in table)
    for r in table:
        if r["family"] != family:
            family = r["family"]
            print(f"{'' if r is table[0] else chr(10)}{family}:")
        how = "trains" if r["trains"] else ("fits from the training data" if r["setup_reads"] else "no training")
        print(f"  {r['name']:<{width}}  {r['summary'].split('. ')[0]}  [{how}; reads {', '.join(r['inputs'])}]")
    return 0
