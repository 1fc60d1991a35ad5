"""A report (:func:`vlprompt.reporting.build_report`) as Markdown, CSV (one line per number) or LaTeX."""
from __future__ import annotations

import csv
import io
import json
from typing import Any, Optional

from . import collect as table

__all__ = ["FORMATS", "render", "sections"]

FORMATS = ("md", "csv", "tex")


def _pm(mean: Optional[float], std: Optional[float]) -> str:
    if mean is None:
        return table._MISSING
    return f"{mean:.2f} ± {std:.2f}" if std is not None else f"{mean:.2f}"


def _diff(d: Optional[float]) -> str:
    return "" if d is None else f"{d:+.2f}"


def _seeds(values: list) -> str:
    return ", ".join(table._MISSING if s is None else table._fmt(s) for s in values)


def _paper(p: Optional[dict]) -> str:
    if p is None:
        return ""
    refs = "".join(f"[{i}]" for i in p["refs"])
    if p["std"] is not None:
        return f"{p['value']:.2f} ± {p['std']:.2f} ({p['runs']} seeds) {refs}"
    return f"{p['value']:.2f} {refs}"


def _incomplete(g: dict, what: str) -> str:
    parts = []
    if g.get("missing"):
        parts.append(f"missing {len(g['missing'])}: {', '.join(g['missing'])}")
    if g.get("ambiguous"):
        parts.append(f"two configurations of {', '.join(g['ambiguous'])}")
    if not parts and not g.get("complete"):
        parts.append(f"trained on {g.get('trained_on')}, not one of CoOp's 11 datasets")
    return f"no {what} ({'; '.join(parts)})"


def _cols(rows: list[dict]) -> list[str]:
    return table._column_keys(rows) if rows else []


def sections(report: dict) -> list[dict]:
    """The report as tables: ``{"title", "headers", "rows" (lists of text cells), "notes"}``."""
    out = []
    few = report["fewshot"]
    if few:
        cols = _cols(few)
        out.append({"title": "Few-shot accuracy (mean ± std over seeds)",
                    "headers": ["method", "dataset", "classes", "backbone", "shots", *cols, "accuracy", "runs",
                                "seeds", "collapsed", "paper", "Δ"],
                    "rows": [[table._fmt(s["method"]), table._fmt(s["dataset"]), table._fmt(s["classes"]),
                              table._fmt(s["backbone"]), table._fmt(s["shots"]), *(table._cell(s, c) for c in cols),
                              _pm(s["mean"], s["std"]), str(s["runs"]), _seeds(s["seeds"]), _seeds(s["collapsed"]),
                              _paper(s["paper"]), _diff(s["diff"])] for s in few], "notes": []})
    avg = report["fewshot_average"]
    if avg:
        cols = _cols(avg)
        out.append({"title": "Average over CoOp's 11 datasets (mean of the per-dataset means)",
                    "headers": ["method", "backbone", "shots", *cols, "average", "paper", "Δ"],
                    "rows": [[table._fmt(g["method"]), table._fmt(g["backbone"]), table._fmt(g["shots"]),
                              *(table._cell(g, c) for c in cols),
                              _pm(g["mean"], None) if g["complete"] else _incomplete(g, "11-dataset average"),
                              _paper(g["paper"]), _diff(g["diff"])] for g in avg], "notes": []})
    b2n = report["base2new"]
    if b2n:
        cols = _cols(b2n)
        out.append({"title": "Base-to-new generalisation (mean ± std over seeds; H of the averages)",
                    "headers": ["method", "dataset", "shots", *cols, "base", "new", "H", "runs", "seeds", "collapsed",
                                "paper base", "paper new", "paper H", "Δ H"],
                    "rows": [[table._fmt(s["method"]), table._fmt(s["dataset"]), table._fmt(s["shots"]),
                              *(table._cell(s, c) for c in cols), _pm(s["base"], s["base_std"]),
                              _pm(s["new"], s["new_std"]), _pm(s["harmonic_mean"], None), str(s["runs"]),
                              _seeds(s["seeds"]), _seeds(s["collapsed"]), _paper(s["paper_base"]),
                              _paper(s["paper_new"]), _paper(s["paper_harmonic_mean"]),
                              _diff(s["paper_harmonic_mean_diff"])] for s in b2n], "notes": []})
    bavg = report["base2new_average"]
    if bavg:
        cols = _cols(bavg)
        rows = []
        for g in bavg:
            if g["complete"]:
                cells = [_pm(g["base"], None), _pm(g["new"], None), _pm(g["harmonic_mean"], None)]
            else:
                cells = [_incomplete(g, "11-dataset average"), "", ""]
            rows.append([table._fmt(g["method"]), table._fmt(g["backbone"]), table._fmt(g["shots"]),
                         *(table._cell(g, c) for c in cols), *cells, _paper(g["paper_base"]), _paper(g["paper_new"]),
                         _paper(g["paper_harmonic_mean"]), _diff(g["paper_harmonic_mean_diff"])])
        out.append({"title": "Base-to-new, average over CoOp's 11 datasets (H of the average base and new)",
                    "headers": ["method", "backbone", "shots", *cols, "base", "new", "H", "paper base", "paper new",
                                "paper H", "Δ H"], "rows": rows, "notes": []})
    tr = report["transfer"]
    if tr:
        cols = _cols(tr)
        out.append({"title": "Domain generalisation and cross-dataset transfer (accuracy, mean ± std over seeds)",
                    "headers": ["protocol", "method", "trained on", "target", *cols, "accuracy", "runs", "seeds",
                                "collapsed", "paper", "Δ"],
                    "rows": [[r["kind"], table._fmt(r["method"]), table._fmt(r["trained_on"]), table._fmt(r["dataset"]),
                              *(table._cell(r, c) for c in cols), _pm(r["mean"], r["std"]), str(r["runs"]),
                              _seeds(r["seeds"]), _seeds(r["collapsed"]), _paper(r["paper"]), _diff(r["diff"])]
                             for r in tr], "notes": []})
    tavg = report["transfer_average"]
    if tavg:
        out.append({"title": "Transfer averages over the protocol's targets",
                    "headers": ["protocol", "method", "trained on", "options", "targets", "average"],
                    "rows": [[g["kind"], table._fmt(g["method"]), table._fmt(g["trained_on"]),
                              table._fmt(g["columns"]) if g["columns"] else "", str(len(g["targets"])),
                              _pm(g["mean"], None) if g["complete"] else _incomplete(g, "average")] for g in tavg],
                    "notes": []})
    ords = report["ordinal"]
    if ords:
        cols = _cols(ords)
        rows, unjoined = [], False
        for r in ords:
            m = r["metrics"]
            paper = {}
            for pm, a, b in (("mae", "mae_expectation", "mae_argmax"), ("accuracy", "acc_expectation", "acc_argmax")):
                p = r["paper"].get(pm)
                if p is not None:
                    paper[pm] = (f"{_paper(p)} (Δ expectation {_diff(p['diff'][a])}, Δ argmax "
                                 f"{_diff(p['diff'][b])})")
                else:
                    listed = [u for u in r["published_unjoined"] if u["metric"] == pm]
                    unjoined |= bool(listed)
                    paper[pm] = " ".join(f"{u['value']:g} [{u['ref']}]†" for u in listed)
            rows.append([table._fmt(r["method"]), table._fmt(r["dataset"]), table._fmt(r["backbone"]),
                         table._fmt(r["shots"]), *(table._cell(r, c) for c in cols),
                         *(_pm(m[k]["mean"], m[k]["std"]) for k in ("mae_expectation", "mae_argmax",
                                                                   "acc_expectation", "acc_argmax")),
                         f"{r['runs']} {r['unit']}", _seeds(r["units"]), _seeds(r["collapsed"]),
                         paper["mae"], paper["accuracy"]])
        notes = ["† published, not compared: the bundled source does not state the backbone (or which prediction)"
                 ] if unjoined else []
        out.append({"title": "Ordinal regression: MAE and accuracy (mean ± std over folds, or seeds)",
                    "headers": ["method", "dataset", "backbone", "shots", *cols, "MAE (expectation)", "MAE (argmax)",
                                "acc (expectation)", "acc (argmax)", "over", "folds / seeds", "collapsed",
                                "paper MAE", "paper acc"], "rows": rows, "notes": notes})
    return out


def _footer(report: dict) -> list[str]:
    lines = [f"std: {report['std']}", f"collapsed: {report['collapse_rule']}",
             "H: harmonic mean of the average base and new accuracies (CoCoOp); Δ: measured - paper",
             "paper numbers are shown only for the same protocol, backbone, weights, shots and recipe options"]
    if report["ignored"]:
        lines.append(f"runs without accuracy or MAE (not shown): {', '.join(report['ignored'])}")
    lines += [table.excluded_line(e) for e in report.get("base2new_excluded", [])]
    for s in report["sources"]:
        lines.append(f"[{s['ref']}] {s['paper']}: {s['source']}" + (f" — {s['citation']}" if s["citation"] else ""))
    return lines


def _markdown(report: dict) -> str:
    lines = ["# Report", ""]
    for sec in sections(report):
        lines += [f"## {sec['title']}", "", "| " + " | ".join(sec["headers"]) + " |",
                  "|" + "---|" * len(sec["headers"])]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in sec["rows"]]
        lines += [""] + [f"{n}  " for n in sec["notes"]] + ([""] if sec["notes"] else [])
    lines += [f"{line}  " for line in _footer(report)]
    return "\n".join(lines) + "\n"


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
        "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def _tex(text: str) -> str:
    out = "".join(_TEX.get(ch, ch) for ch in text)
    return out.replace("±", r"$\pm$").replace("Δ", r"$\Delta$").replace("†", r"$^\dagger$").replace("—", "--")


def _latex(report: dict) -> str:
    lines = ["% vlprompt report (needs no package beyond LaTeX's own tabular)"]
    for sec in sections(report):
        lines += [f"% {sec['title']}", r"\begin{table}[t]", r"\centering", r"\small",
                  r"\begin{tabular}{" + "l" * len(sec["headers"]) + "}", r"\hline",
                  " & ".join(_tex(h) for h in sec["headers"]) + r" \\", r"\hline"]
        lines += [" & ".join(_tex(c) for c in row) + r" \\" for row in sec["rows"]]
        lines += [r"\hline", r"\end{tabular}", rf"\caption{{{_tex(sec['title'])}}}", r"\end{table}", ""]
    lines += [f"% {line}" for line in _footer(report)]
    return "\n".join(lines) + "\n"


CSV_FIELDS = ("section", "method", "dataset", "trained_on", "classes", "backbone", "pretrained", "shots", "options",
              "metric", "mean", "std", "runs", "seeds", "collapsed", "paper", "paper_std", "diff", "refs", "note")


def records(report: dict) -> list[dict]:
    """One record per number of the report (the CSV's lines)."""
    out = []

    def add(section: str, row: dict, metric: str, mean, std, paper: Optional[dict], diff, note: str = "",
            seeds=None, collapsed=None, **extra: Any):
        out.append({"section": section, "method": row.get("method"), "dataset": row.get("dataset"),
                    "trained_on": row.get("trained_on"), "classes": row.get("classes"),
                    "backbone": row.get("backbone"), "pretrained": row.get("pretrained"), "shots": row.get("shots"),
                    "options": json.dumps(row.get("columns") or {}, sort_keys=True, default=repr), "metric": metric,
                    "mean": mean, "std": std, "runs": row.get("runs"),
                    "seeds": " ".join(map(str, seeds if seeds is not None else row.get("seeds", []))),
                    "collapsed": " ".join(map(str, collapsed if collapsed is not None else row.get("collapsed", []))),
                    "paper": None if paper is None else paper["value"],
                    "paper_std": None if paper is None else paper["std"], "diff": diff,
                    "refs": "" if paper is None else " ".join(map(str, paper["refs"])), "note": note, **extra})

    for s in report["fewshot"]:
        add("fewshot", s, "accuracy", s["mean"], s["std"], s["paper"], s["diff"])
    for g in report["fewshot_average"]:
        add("fewshot_average11", g, "accuracy", g["mean"], None, g["paper"], g["diff"],
            "" if g["complete"] else _incomplete(g, "11-dataset average"), seeds=[], collapsed=[])
    for s in report["base2new"]:
        for m, std in (("base", s["base_std"]), ("new", s["new_std"]), ("harmonic_mean", None)):
            add("base2new", s, m, s[m], std, s[f"paper_{m}"], s[f"paper_{m}_diff"])
    for g in report["base2new_average"]:
        for m in ("base", "new", "harmonic_mean"):
            add("base2new_average11", g, m, g[m], None, g[f"paper_{m}"], g[f"paper_{m}_diff"],
                "" if g["complete"] else _incomplete(g, "11-dataset average"), seeds=[], collapsed=[])
    for r in report["transfer"]:
        add(r["kind"], r, "accuracy", r["mean"], r["std"], r["paper"], r["diff"])
    for g in report["transfer_average"]:
        add(f"{g['kind']}_average", g, "accuracy", g["mean"], None, None, None,
            "" if g["complete"] else _incomplete(g, "average"), seeds=[], collapsed=[])
    for r in report["ordinal"]:
        for m in ("mae_expectation", "mae_argmax", "acc_expectation", "acc_argmax"):
            pm = "mae" if m.startswith("mae") else "accuracy"
            p = r["paper"].get(pm)
            add("ordinal", r, m, r["metrics"][m]["mean"], r["metrics"][m]["std"], p,
                None if p is None else p["diff"][m], f"over {r['unit']}", seeds=r["units"])
    return out


def _csv(report: dict) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    for rec in records(report):
        w.writerow({k: ("" if rec[k] is None else rec[k]) for k in CSV_FIELDS})
    return buf.getvalue()


def render(report: dict, fmt: str = "md") -> str:
    if fmt == "md":
        return _markdown(report)
    if fmt == "csv":
        return _csv(report)
    if fmt == "tex":
        return _latex(report)
    raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
