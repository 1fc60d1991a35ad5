"""``vlprompt datasets``: the dataset readers vlprompt knows and the on-disk layout each expects."""
from __future__ import annotations

import textwrap

from .common import print_json


def register(sub) -> None:
    p = sub.add_parser("datasets", help="list the supported datasets and the layout each expects",
                       description="The names --dataset accepts (CoOp's class names such as OxfordFlowers work "
                                   "too), the folder layout expected under --root, the hand-crafted prompt and the "
                                   "reader options (--dataset-option KEY=VALUE).")
    p.add_argument("name", nargs="?", default=None, help="show only this dataset")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_datasets)


def _rows(name):
    from ..data import ALIASES, DATASETS, get_dataset_info

    infos = [get_dataset_info(name)] if name else list(DATASETS.values())
    aliases: dict[str, list[str]] = {}
    for alias, target in ALIASES.items():
        aliases.setdefault(target, []).append(alias)
    key = {info.name: k for k, info in DATASETS.items()}
    return [{"name": i.name, "title": i.title, "aliases": aliases.get(key[i.name], []), "template": i.template,
             "test_only": i.test_only, "options": i.options, "layout": i.layout} for i in infos]


def cmd_datasets(args) -> int:
    rows = _rows(args.name)
    if args.json:
        print_json(rows)
        return 0
    for i, r in enumerate(rows):
        if i:
            print()
        alias = f" (also {', '.join(r['aliases'])})" if r["aliases"] else ""
        print(f"{r['name']}{alias}: {r['title']}")
        print(f"  prompt: {r['template']!r}" + ("    test split only" if r["test_only"] else ""))
        if r["options"]:
            print(f"  options: {', '.join(r['options'])}")
        print("  layout under --root:")
        print(textwrap.indent(r["layout"].rstrip("\n"), "    "))
    return 0
