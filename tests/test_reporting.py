"""``vlprompt report``: the tables of a grid from hand-written run directories, checked against the runs' own
results.json; the 11-dataset averages, base-to-new H, transfer, ordinal folds, collapsed seeds, paper numbers."""
import csv
import io
import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from vlprompt.cli import main
from vlprompt.errors import VLPromptError
from vlprompt.reporting import (COLLAPSE_POINTS, COOP_DATASETS, DG_TARGETS, build_report, collapsed, curve_data,
                                fewshot_curves, render)


# a resolved CoOp configuration holds every option (here the ones the bundled numbers' conditions name)
COOP_DEFAULTS = {"n_ctx": None, "csc": False, "class_position": "end", "init": None}


def _identity(seed, method="coop", dataset="dtd", shots=16, backbone="RN50", pretrained="openai", classes="all",
              epochs=200, batch_size=32, options=None, **method_options):
    ident = {"method": method, "backbone": backbone, "pretrained": pretrained, "precision": "amp",
             "data": {"dataset": dataset, "root": f"/data/{dataset}", "options": dict(options or {}), "shots": shots,
                      "classes": classes},
             "method_options": {**(COOP_DEFAULTS if method == "coop" else {}), **method_options}, "seed": seed}
    if method != "zeroshot":
        ident["train"] = {"epochs": epochs, "batch_size": batch_size, "lr": 0.002}
    return ident


def _write_run(run_dir, identity, metrics):
    run_dir.mkdir(parents=True)
    res = {"method": identity["method"], "dataset": identity["data"]["dataset"],
           "classes": identity["data"]["classes"], "backbone": identity["backbone"],
           "pretrained": identity["pretrained"], "shots": identity["data"]["shots"], "seed": identity["seed"],
           "metrics": metrics if isinstance(metrics, dict) else {"accuracy": metrics},
           "config": identity, "identity": identity, "config_hash": "x" * 64}
    (run_dir / "results.json").write_text(json.dumps(res))
    return run_dir


def _write_eval(run_dir, identity, dataset, accuracy, classes="all"):
    (run_dir / "eval").mkdir(parents=True, exist_ok=True)
    (run_dir / "eval" / f"{dataset}-{classes}-test.json").write_text(json.dumps({
        "run": str(run_dir), "method": identity["method"], "trained_on": identity["data"]["dataset"],
        "dataset": dataset, "classes": classes, "split": "test", "metrics": {"accuracy": accuracy},
        "identity": identity, "eval_data": {"dataset": dataset, "root": f"/data/{dataset}", "options": {}}}))


def _write_b2n(run_dir, identity, base, new, eval_dataset=None):
    (run_dir / "eval").mkdir(parents=True, exist_ok=True)
    ds = eval_dataset or identity["data"]["dataset"]
    (run_dir / "eval" / f"base2new-{ds}.json").write_text(json.dumps({
        "run": str(run_dir), "method": identity["method"], "dataset": ds, "metric": "accuracy", "base": base,
        "new": new, "harmonic_mean": 2 * base * new / (base + new), "identity": identity,
        "eval_data": {"dataset": ds, "root": f"/data/{ds}", "options": {}, "shots": 0, "classes": "all"}}))


def _grid(root, rng):
    """coop and coop+csc on dtd and eurosat, 1/2/4 shots, 3 seeds; zero-shot on both (grid-style cell names)."""
    for variant, opts in (("coop", {}), ("coop-csc", {"csc": True})):
        for ds in ("dtd", "eurosat"):
            for shots in (1, 2, 4):
                for seed in (1, 2, 3):
                    acc = float(rng.uniform(30, 90))
                    _write_run(root / variant / ds / f"shots{shots}" / f"seed{seed}",
                               _identity(seed, dataset=ds, shots=shots, epochs=50 if shots == 1 else 100, **opts), acc)
    for ds in ("dtd", "eurosat"):
        _write_run(root / "zeroshot" / ds, _identity(None, method="zeroshot", dataset=ds, shots=0), 40.0)


def test_report_mean_std_equal_the_values_computed_from_the_cells_results_json(tmp_path):
    _grid(tmp_path, np.random.default_rng(0))
    # directly from the files: one group per cell folder without its seed
    direct = defaultdict(list)
    for f in tmp_path.rglob("results.json"):
        direct[str(f.parent.parent if f.parent.name.startswith("seed") else f.parent)].append(
            json.loads(f.read_text())["metrics"]["accuracy"])
    report = build_report([tmp_path])
    assert len(report["fewshot"]) == len(direct) == 2 * 2 * 3 + 2
    for row in report["fewshot"]:
        parents = {str(Path(p).parent) if Path(p).name.startswith("seed") else p for p in row["paths"]}
        (cell,) = parents
        assert row["mean"] == pytest.approx(np.mean(direct[cell]), abs=1e-12)
        assert row["std"] == pytest.approx(np.std(direct[cell]), abs=1e-12)  # population std, as CoOp
    # the CSV carries the same numbers at full precision
    recs = [r for r in csv.DictReader(io.StringIO(render(report, "csv"))) if r["section"] == "fewshot"]
    assert sorted(float(r["mean"]) for r in recs) == pytest.approx(sorted(np.mean(v) for v in direct.values()))
    md = render(report, "md")
    some = report["fewshot"][0]
    assert f"{some['mean']:.2f} ± {some['std']:.2f}" in md
    assert "method_options.csc" in md.splitlines()[4] and "train.epochs" in md  # the options that vary


def test_the_11_dataset_average_needs_all_11_and_names_the_missing(tmp_path):
    for i, ds in enumerate(COOP_DATASETS[:10]):
        for seed in (1, 2):
            _write_run(tmp_path / ds / f"seed{seed}", _identity(seed, dataset=ds, shots=16,
                                                                 epochs=50 if ds == "imagenet" else 200),
                       50.0 + i + seed)
    (g,) = build_report([tmp_path])["fewshot_average"]
    assert g["mean"] is None and g["missing"] == ["ucf101"]
    assert "no 11-dataset average (missing 1: ucf101)" in render(build_report([tmp_path]), "md")
    for seed in (1, 2):
        _write_run(tmp_path / "ucf101" / f"seed{seed}", _identity(seed, dataset="ucf101"), 70.0 + seed)
    report = build_report([tmp_path])
    (g,) = report["fewshot_average"]  # ImageNet's 50 epochs (the preset) do not split the recipe
    per_dataset = [np.mean([50.0 + i + 1, 50.0 + i + 2]) for i in range(10)] + [71.5]
    assert g["complete"] and g["mean"] == pytest.approx(np.mean(per_dataset))


def test_two_configurations_of_one_dataset_in_a_recipe_are_not_averaged(tmp_path):
    for ds in COOP_DATASETS:
        _write_run(tmp_path / ds, _identity(1, dataset=ds), 60.0)
    _write_run(tmp_path / "dtd-lr", {**_identity(1, dataset="dtd"), "train": {"epochs": 200, "lr": 0.01}}, 10.0)
    (g,) = build_report([tmp_path])["fewshot_average"]
    assert g["mean"] is None and g["ambiguous"] == ["dtd"]


def test_collapse_rule_flags_a_seed_far_below_the_median_of_its_siblings():
    assert collapsed([44.50, 93.87, 94.97]) == [0]  # KaiyangZhou/CoOp issue #24, Flowers seed 1
    assert collapsed([62.53, 64.07, 64.13]) == []  # the maintainer's DTD seeds
    assert collapsed([12.00, 15.19, 63.42]) == []  # two of three low: no sibling median to trust, nothing flagged
    assert collapsed([60.0, 60.0 - COLLAPSE_POINTS - 0.01]) == [1]
    assert collapsed([60.0, 60.0 - COLLAPSE_POINTS + 0.01]) == []
    assert collapsed([70.0]) == []
    # spread siblings widen the threshold to 3 robust SDs: 40 points below a median of siblings 2..98 is not far
    assert collapsed([20.0, 40.0, 60.0, 80.0, 100.0, 20.0 - 0.0]) == []


def test_a_collapsed_seed_is_flagged_in_the_report_and_stays_in_the_mean(tmp_path):
    for seed, acc in zip((1, 2, 3), (44.50, 93.87, 94.97)):
        _write_run(tmp_path / f"seed{seed}", _identity(seed, dataset="oxford_flowers"), acc)
    report = build_report([tmp_path])
    (row,) = report["fewshot"]
    assert row["collapsed"] == [1] and row["mean"] == pytest.approx(np.mean([44.50, 93.87, 94.97]))
    md = render(report, "md")
    assert "| 1, 2, 3 | 1 |" in md and "robust SD" in md  # the flag and the rule


def _dtd_grid(root, backbone="RN50", pretrained="openai", **opts):
    for seed, acc in zip((1, 2, 3), (63.0, 64.0, 65.0)):
        _write_run(root / f"seed{seed}", _identity(seed, backbone=backbone, pretrained=pretrained, **opts), acc)


def test_the_papers_numbers_are_shown_beside_with_the_difference(tmp_path):
    _dtd_grid(tmp_path / "rn50", backbone="RN50-quickgelu")
    report = build_report([tmp_path])
    (row,) = report["fewshot"]
    paper = np.mean([62.53, 64.07, 64.13])
    assert row["paper"]["value"] == pytest.approx(paper) and row["paper"]["seeds"] == [1, 2, 3]
    assert row["paper"]["std"] == pytest.approx(np.std([62.53, 64.07, 64.13]))
    assert row["diff"] == pytest.approx(64.0 - paper)
    md = render(report, "md")
    assert f"{paper:.2f} ± 0.74 (3 seeds) [1] | {64.0 - paper:+.2f} |" in md
    assert "[1] CoOp: maintainer's per-seed runs: KaiyangZhou/CoOp issue #24" in md


@pytest.mark.parametrize("change", [dict(backbone="ViT-B-16"), dict(pretrained="/tmp/tiny-vit.pt"),
                                    dict(csc=True), dict(shots=8), dict(classes="base"), dict(dataset="eurosat"),
                                    dict(method="cocoop")])
def test_the_papers_numbers_are_never_joined_across_protocol_backbone_weights_shots_or_recipe(tmp_path, change):
    _dtd_grid(tmp_path, **change)
    (row,) = build_report([tmp_path])["fewshot"]
    assert row["paper"] is None and row["diff"] is None


#: CoCoOp's recipe (its published numbers are of it): 4 context vectors from "a photo of a", 10 epochs, batch 1
COCOOP = dict(method="cocoop", backbone="ViT-B-16", epochs=10, batch_size=1, init="a photo of a", n_ctx=None,
              class_position="end")


def test_base_to_new_average_over_11_datasets_with_h_of_the_averages_beside_cocoop(tmp_path):
    rng = np.random.default_rng(1)
    expected = {"base": [], "new": []}
    for ds in COOP_DATASETS:
        per = {"base": [], "new": []}
        for seed in (1, 2, 3):
            b, n = float(rng.uniform(60, 95)), float(rng.uniform(50, 80))
            per["base"].append(b)
            per["new"].append(n)
            _write_b2n(tmp_path / ds / f"seed{seed}", _identity(seed, dataset=ds, classes="base", **COCOOP), b, n)
        for k in per:
            expected[k].append(np.mean(per[k]))
    report = build_report([tmp_path])
    assert len(report["base2new"]) == 11
    (g,) = report["base2new_average"]
    base, new = np.mean(expected["base"]), np.mean(expected["new"])
    assert (g["base"], g["new"]) == (pytest.approx(base), pytest.approx(new))
    assert g["harmonic_mean"] == pytest.approx(2 * base * new / (base + new))
    assert g["paper_harmonic_mean"]["value"] == 75.83 and g["paper_base"]["value"] == 80.47
    assert g["paper_harmonic_mean_diff"] == pytest.approx(g["harmonic_mean"] - 75.83)
    md = render(report, "md")
    assert re.search(r"75\.83 \[(\d)\] \|", md) and "Table 1, average over 11 datasets" in md
    dtd = next(r for r in report["base2new"] if r["dataset"] == "dtd")  # CoCoOp's Table 1 row, per dataset
    assert (dtd["paper_base"]["value"], dtd["paper_new"]["value"], dtd["paper_harmonic_mean"]["value"]) == (
        77.01, 56.00, 64.85)


@pytest.mark.parametrize("change", [dict(epochs=2), dict(batch_size=32), dict(init=None, n_ctx=16),
                                    dict(backbone="RN50")])
def test_cocoop_numbers_are_not_shown_beside_another_recipe(tmp_path, change):
    for seed in (1, 2):
        _write_b2n(tmp_path / f"seed{seed}", _identity(seed, dataset="dtd", classes="base", **{**COCOOP, **change}),
                   70.0, 60.0)
    (row,) = build_report([tmp_path])["base2new"]
    assert row["paper_base"] is None and row["paper_harmonic_mean"] is None


def test_cocoop_transfer_numbers_beside_its_recipe(tmp_path):
    for seed in (1, 2, 3):
        ident = _identity(seed, dataset="imagenet", **COCOOP)
        run = _write_run(tmp_path / f"seed{seed}", ident, 71.0)
        _write_eval(run, ident, "imagenet_sketch", 48.0 + seed)
        _write_eval(run, ident, "dtd", 45.0)
    rows = {r["dataset"]: r for r in build_report([tmp_path])["transfer"]}
    assert rows["imagenet_sketch"]["paper"]["value"] == 48.75  # CoCoOp Table 3
    assert rows["imagenet_sketch"]["diff"] == pytest.approx(50.0 - 48.75)
    assert rows["dtd"]["paper"]["value"] == 45.73  # CoCoOp Table 2


def test_domain_generalisation_and_cross_dataset_tables_and_their_averages(tmp_path):
    accs = {"imagenetv2": (50.0, 52.0), "imagenet_sketch": (30.0, 31.0), "imagenet_a": (20.0, 24.0),
            "imagenet_r": (55.0, 57.0), "caltech101": (90.0, 92.0)}
    for i, seed in enumerate((1, 2)):
        ident = _identity(seed, dataset="imagenet", epochs=50)
        run = _write_run(tmp_path / f"seed{seed}", ident, 60.0)
        for ds, pair in accs.items():
            _write_eval(run, ident, ds, pair[i])
        _write_eval(run, ident, "caltech101", 11.0, classes="base")  # a base-to-new half: not a transfer result
        _write_eval(run, ident, "imagenet", 60.0)  # re-evaluated on its own data: not a transfer result
    report = build_report([tmp_path])
    rows = {r["dataset"]: r for r in report["transfer"]}
    assert set(rows) == set(accs)
    assert all(rows[d]["kind"] == "domain-generalization" for d in DG_TARGETS)
    assert rows["caltech101"]["kind"] == "cross-dataset"
    assert rows["imagenet_a"]["mean"] == 22.0 and rows["imagenet_a"]["std"] == 2.0
    avg = {g["kind"]: g for g in report["transfer_average"]}
    assert avg["domain-generalization"]["mean"] == pytest.approx(np.mean([51.0, 30.5, 22.0, 56.0]))
    assert avg["cross-dataset"]["mean"] is None and len(avg["cross-dataset"]["missing"]) == 9


def test_ordinal_mae_and_accuracy_over_folds(tmp_path):
    maes = [2.5, 2.7, 2.4, 2.6, 2.8]
    for fold, mae in enumerate(maes):
        m = {"mae_expectation": mae, "mae_argmax": mae + 0.1, "acc_expectation": 60.0 + fold,
             "acc_argmax": 59.0 + fold, "rank_accuracy": 1.0, "num_samples": 10}
        _write_run(tmp_path / f"fold_{fold}", _identity(1, method="ordinalclip", dataset="adience", shots=0,
                                                        options={"fold": fold}), m)
    report = build_report([tmp_path])
    assert report["fewshot"] == []  # ordinal runs are not classification rows
    (row,) = report["ordinal"]
    assert row["unit"] == "folds" and row["units"] == [0, 1, 2, 3, 4]
    assert row["metrics"]["mae_expectation"]["mean"] == pytest.approx(np.mean(maes))
    assert row["metrics"]["mae_expectation"]["std"] == pytest.approx(np.std(maes))
    assert row["metrics"]["acc_argmax"]["mean"] == pytest.approx(61.0)
    # the paper's Adience numbers state no backbone: listed with a mark, no difference
    assert row["paper"] == {} and {u["metric"] for u in row["published_unjoined"]} == {"mae", "accuracy"}
    md = render(report, "md")
    assert "0.47 [1]†" in md and "61.2 [1]†" in md and "not compared" in md


def test_ordinal_fold_missing_a_metric_is_an_error(tmp_path):
    for fold in (0, 1):
        m = {"mae_expectation": 2.0, "mae_argmax": 2.0, "acc_expectation": 50.0}
        if fold == 0:
            m["acc_argmax"] = 50.0
        _write_run(tmp_path / f"fold_{fold}", _identity(1, method="ordinalclip", dataset="adience", shots=0,
                                                        options={"fold": fold}), m)
    with pytest.raises(VLPromptError, match="fold_1.*no acc_argmax"):
        build_report([tmp_path])


def test_fewshot_curves_have_one_line_per_recipe_and_are_written_as_png_and_pdf(tmp_path):
    _grid(tmp_path / "runs", np.random.default_rng(2))
    report = build_report([tmp_path / "runs"])
    data = curve_data(report)
    assert data["datasets"] == ["dtd", "eurosat"]
    assert sorted(data["lines"]) == ["coop (csc=false)", "coop (csc=true)", "zeroshot"]
    assert [s for s, _, _ in data["lines"]["coop (csc=true)"]["dtd"]] == [1, 2, 4]
    assert "not the 11-dataset average" in data["average_title"]
    dtd = {r["shots"]: r["mean"] for r in report["fewshot"] if r["dataset"] == "dtd"
           and r["identity"]["method_options"].get("csc")}
    eur = {r["shots"]: r["mean"] for r in report["fewshot"] if r["dataset"] == "eurosat"
           and r["identity"]["method_options"].get("csc")}
    assert data["average"]["coop (csc=true)"] == [(s, pytest.approx((dtd[s] + eur[s]) / 2)) for s in (1, 2, 4)]
    files = fewshot_curves(report, tmp_path / "fig", title="tiny")
    assert [f.suffix for f in files] == [".png", ".pdf"] and all(f.stat().st_size > 1000 for f in files)
    assert files[0].read_bytes()[:4] == b"\x89PNG" and files[1].read_bytes()[:4] == b"%PDF"


def test_cli_report_writes_md_csv_tex_and_figures(tmp_path, capsys):
    _grid(tmp_path / "runs", np.random.default_rng(3))
    assert main(["report", str(tmp_path / "runs")]) == 0
    assert "## Few-shot accuracy" in capsys.readouterr().out
    out = tmp_path / "r.csv"
    assert main(["report", str(tmp_path / "runs"), "--format", "csv", "--output", str(out),
                 "--figures", str(tmp_path / "figs")]) == 0
    assert capsys.readouterr().out == ""
    recs = list(csv.DictReader(out.open()))
    assert len([r for r in recs if r["section"] == "fewshot"]) == 14
    assert (tmp_path / "figs" / "fewshot_curves.png").is_file() and (tmp_path / "figs" / "fewshot_curves.pdf").is_file()
    assert main(["report", str(tmp_path / "runs"), "--format", "tex", "--output", str(tmp_path / "r.tex")]) == 0
    tex = (tmp_path / "r.tex").read_text()
    assert r"\begin{tabular}" in tex and r"$\pm$" in tex and r"method\_options.csc" in tex
    assert main(["report", str(tmp_path / "runs"), "--format", "html"]) == 2
    assert "--format" in capsys.readouterr().err


def test_cli_report_refuses_figures_without_fewshot_rows_before_writing(tmp_path, capsys):
    _write_b2n(tmp_path / "runs" / "a", _identity(1, classes="base"), 80.0, 60.0)
    out = tmp_path / "r.md"
    assert main(["report", str(tmp_path / "runs"), "--output", str(out), "--figures", str(tmp_path / "f")]) == 2
    assert "--figures" in capsys.readouterr().err and not out.exists() and not (tmp_path / "f").exists()
    assert main(["report", str(tmp_path / "empty-does-not-exist")]) == 2


def test_curves_tell_folder_datasets_apart_by_their_root(tmp_path):
    for name, acc in (("birds", 40.0), ("cars", 80.0)):
        ident = _identity(1, dataset="folder", shots=2)
        ident["data"]["root"] = f"/data/{name}"
        _write_run(tmp_path / name, ident, acc)
    data = curve_data(build_report([tmp_path]))
    assert data["datasets"] == ["folder (birds)", "folder (cars)"]
    assert data["average"]["coop"] == [(2, 60.0)]


def test_a_root_that_only_follows_the_dataset_gets_no_column_but_two_roots_of_one_dataset_do(tmp_path):
    for ds in ("dtd", "eurosat"):  # one folder per dataset (a grid's roots:): the dataset column says it all
        _write_run(tmp_path / "a" / ds, _identity(1, dataset=ds), 60.0)
    rows = build_report([tmp_path / "a"])["fewshot"]
    assert all("data.root" not in r["columns"] for r in rows)
    two = _identity(1, dataset="dtd")
    two["data"]["root"] = "/elsewhere/dtd"  # the same dataset from another folder: maybe other images
    _write_run(tmp_path / "a" / "dtd-elsewhere", two, 61.0)
    rows = build_report([tmp_path / "a"])["fewshot"]
    dtd = sorted(r["columns"]["data.root"] for r in rows if r["dataset"] == "dtd")
    assert dtd == ["/data/dtd", "/elsewhere/dtd"] and len(rows) == 3


def test_base_to_new_shows_the_trained_dataset_only_when_it_is_not_the_evaluated_one(tmp_path):
    _write_b2n(tmp_path / "own", _identity(1, dataset="dtd", classes="base"), 70.0, 60.0)
    assert "data.dataset" not in build_report([tmp_path])["base2new"][0]["columns"]
    _write_b2n(tmp_path / "other", _identity(1, dataset="imagenet", classes="base"), 50.0, 40.0, eval_dataset="dtd")
    rows = build_report([tmp_path])["base2new"]
    assert sorted(r["columns"]["data.dataset"] for r in rows) == ["dtd", "imagenet"]
    assert {r["dataset"] for r in rows} == {"dtd"}


def test_base_to_new_files_of_runs_trained_on_every_class_are_never_beside_the_papers(tmp_path, capsys):
    """An eval/base2new-*.json of a run trained on all classes (written by an earlier version, which allowed it):
    its "new" classes were trained on. The report and the table leave it out and say so; a base-trained sibling of
    the same recipe still gets CoCoOp's numbers."""
    for seed in (1, 2):
        ident = _identity(seed, dataset="dtd", classes="all", **COCOOP)
        _write_b2n(tmp_path / "all" / f"seed{seed}", ident, 90.0, 80.0)
    # an older layout: no identity in the file, the run's configuration in its config.yaml
    legacy = tmp_path / "legacy"
    _write_b2n(legacy, _identity(3, dataset="dtd", classes="all", **COCOOP), 90.0, 80.0)
    doc = json.loads((legacy / "eval" / "base2new-dtd.json").read_text())
    config = doc.pop("identity")
    (legacy / "eval" / "base2new-dtd.json").write_text(json.dumps(doc))
    (legacy / "config.yaml").write_text(json.dumps(config))  # JSON is YAML
    with pytest.raises(VLPromptError, match="no run results under .*trained on every class"):
        build_report([tmp_path])
    # the same recipe trained on the base half: its row, beside the paper; the others left out, named
    _write_b2n(tmp_path / "base" / "seed1", _identity(1, dataset="dtd", classes="base", **COCOOP), 70.0, 60.0)
    report = build_report([tmp_path])
    (row,) = report["base2new"]
    assert row["paths"] == [str(tmp_path / "base" / "seed1" / "eval" / "base2new-dtd.json")]
    assert row["paper_base"]["value"] == 77.01 and row["base"] == 70.0
    assert sorted(e["path"] for e in report["base2new_excluded"]) == sorted(
        str(p / "eval" / "base2new-dtd.json") for p in (tmp_path / "all" / "seed1", tmp_path / "all" / "seed2", legacy))
    assert all("trained on every class" in e["reason"] for e in report["base2new_excluded"])
    md = render(report, "md")
    assert "90.00" not in md and md.count("not a base-to-new result (left out)") == 3
    # vlprompt table: the same rule
    assert main(["table", str(tmp_path / "all"), str(legacy), "--json"]) == 2
    assert "trained on every class" in capsys.readouterr().err
    assert main(["table", str(tmp_path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["base_to_new"]) == 1 and len(data["base_to_new_excluded"]) == 3
    assert main(["table", str(tmp_path)]) == 0
    assert capsys.readouterr().out.count("not a base-to-new result (left out)") == 3


def test_zero_shot_base_to_new_of_all_classes_is_clips_row(tmp_path):
    """Zero-shot learns nothing: evaluated on both halves it is CoCoOp's CLIP row, whatever its classes."""
    ident = _identity(None, method="zeroshot", dataset="dtd", shots=0, backbone="ViT-B-16", classes="all",
                      templates=["dataset"])
    _write_b2n(tmp_path / "zs", ident, 53.24, 59.90)
    report = build_report([tmp_path])
    (row,) = report["base2new"]
    assert report["base2new_excluded"] == [] and row["paper_base"]["value"] == 53.24
