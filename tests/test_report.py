"""``vlprompt table``: one row per configuration (identity minus seed), never two configurations averaged."""
import json
import statistics

import numpy as np
import pytest
import yaml

from vlprompt.cli import main
from vlprompt.errors import VLPromptError
from vlprompt.reporting.collect import collect_results, markdown, summarize, summarize_base_to_new
from vlprompt.stats import mean_std


def _identity(seed, method="coop", dataset="caltech101", root="/data/caltech-101", shots=16, epochs=200,
              classes="all", **method_options):
    train = {"epochs": epochs, "lr": 0.002, "batch_size": 32} if method != "zeroshot" else None
    ident = {"method": method, "backbone": "RN50", "pretrained": "openai", "precision": "amp",
             "data": {"dataset": dataset, "root": root, "options": {}, "shots": shots, "classes": classes},
             "method_options": method_options, "seed": seed}
    if train:
        ident["train"] = train
    return ident


def _write_run(run_dir, identity, accuracy):
    """A results.json of the current contract (identity, config_hash), written by hand."""
    run_dir.mkdir(parents=True)
    res = {"method": identity["method"], "dataset": identity["data"]["dataset"],
           "classes": identity["data"]["classes"], "backbone": identity["backbone"],
           "pretrained": identity["pretrained"], "shots": identity["data"]["shots"], "seed": identity["seed"],
           "metrics": {"accuracy": accuracy}, "config": identity, "identity": identity,
           "config_hash": "x" * 64}
    (run_dir / "results.json").write_text(json.dumps(res))
    return run_dir


def _legacy_config(seed, lr=0.002, cache_dir="/tmp/cache", device="cpu", checkpoint_every=1):
    """A config.yaml as older versions wrote it (seeds in data and train, run-only keys)."""
    return {"method": "coop", "backbone": "RN50", "pretrained": "openai",
            "data": {"dataset": "dtd", "root": "/data/dtd", "options": {}, "shots": 16, "seed": seed,
                     "classes": "all", "allow_fewer": False, "on_bad_image": "error"},
            "method_options": {}, "train": {"epochs": 200, "lr": lr, "seed": seed,
                                            "checkpoint_every": checkpoint_every},
            "device": device, "precision": "amp", "cache_dir": cache_dir, "preprocess": "coop",
            "tensorboard": False}


def _write_legacy(run_dir, config, accuracy):
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    res = {"method": config["method"], "dataset": config["data"]["dataset"], "classes": config["data"]["classes"],
           "backbone": config["backbone"], "pretrained": config["pretrained"], "shots": config["data"]["shots"],
           "seed": config["data"]["seed"], "metrics": {"accuracy": accuracy}}
    (run_dir / "results.json").write_text(json.dumps(res))
    return run_dir


def _table_lines(text):
    return [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| method")]


def test_mean_std_is_coops_population_std():
    values = [71.2, 73.5, 70.1]
    mean, std = mean_std(values)
    assert mean == pytest.approx(np.mean(values)) and std == pytest.approx(np.std(values))  # parse_test_res.py
    assert std == pytest.approx(statistics.pstdev(values)) and std != pytest.approx(statistics.stdev(values))
    assert mean_std([5.0]) == (5.0, 0.0)
    with pytest.raises(ValueError):
        mean_std([])


def test_five_coop_variants_over_two_seeds_are_five_rows(tmp_path):
    variants = [{}, {"csc": True}, {"class_token_position": "middle"}, {"n_ctx": 4}, {"epochs": 100}]
    for v, opts in enumerate(variants):
        for seed in (1, 2):
            _write_run(tmp_path / f"v{v}" / f"seed{seed}", _identity(seed, **opts), 60.0 + 10 * v + seed)
    summary = summarize(collect_results([tmp_path]))
    assert len(summary) == 5
    assert all(s["runs"] == 2 and s["seeds"] == [1, 2] for s in summary)
    assert sorted(s["mean"] for s in summary) == [61.5, 71.5, 81.5, 91.5, 101.5]
    cols = set().union(*(s["columns"] for s in summary))
    assert cols == {"method_options.csc", "method_options.class_token_position", "method_options.n_ctx",
                    "train.epochs"}  # only what varies; not data.root, train.lr, ...
    lines = _table_lines(markdown(summary, []))
    assert len(lines) == 5 and len(set(l.split(" ± ")[0].rsplit("|", 1)[0] for l in lines)) == 5
    assert "| train.epochs |" in markdown(summary, []).splitlines()[0]


def test_zeroshot_on_two_folder_datasets_is_two_rows_with_a_data_root_column(tmp_path):
    for name, acc in (("birds", 40.0), ("cars", 80.0)):
        _write_run(tmp_path / name, _identity(None, method="zeroshot", dataset="folder",
                                              root=f"/data/{name}", shots=0), acc)
    summary = summarize(collect_results([tmp_path]))
    assert [(s["columns"], s["mean"], s["std"]) for s in summary] == [
        ({"data.root": "/data/birds"}, 40.0, 0.0), ({"data.root": "/data/cars"}, 80.0, 0.0)]
    text = markdown(summary, [])
    assert "| data.root |" in text.splitlines()[0]
    assert "/data/birds" in text and "/data/cars" in text


def test_one_configuration_two_seeds_is_one_row_with_population_std(tmp_path):
    _write_run(tmp_path / "s10", _identity(10), 70.25)
    _write_run(tmp_path / "s2", _identity(2), 73.75)
    (row,) = summarize(collect_results([tmp_path]))
    assert row["runs"] == 2 and row["seeds"] == [2, 10] and row["columns"] == {}
    assert row["mean"] == pytest.approx(np.mean([70.25, 73.75]))
    assert row["std"] == pytest.approx(np.std([70.25, 73.75]))  # 1.75 (the sample std would be 2.47)
    assert "seed" not in row["identity"] and row["identity"]["method_options"] == {}
    assert "72.00 ± 1.75 | 2 | 2, 10 |" in markdown([row], [])


def test_legacy_runs_are_grouped_by_config_yaml_without_seeds_and_run_keys(tmp_path):
    # Same configuration, different seeds, cache dirs, devices, checkpointing: one group.
    _write_legacy(tmp_path / "a1", _legacy_config(1, cache_dir="/c1", device="cpu"), 50.0)
    _write_legacy(tmp_path / "a2", _legacy_config(2, cache_dir="/c2", device="cuda", checkpoint_every=5), 52.0)
    # Another learning rate: another group, shown by a train.lr column.
    _write_legacy(tmp_path / "b1", _legacy_config(1, lr=0.01), 40.0)
    _write_legacy(tmp_path / "b2", _legacy_config(2, lr=0.01), 44.0)
    summary = summarize(collect_results([tmp_path]))
    assert [(s["columns"], s["seeds"], s["mean"], s["std"]) for s in summary] == [
        ({"train.lr": 0.002}, [1, 2], 51.0, 1.0), ({"train.lr": 0.01}, [1, 2], 42.0, 2.0)]
    ident = summary[0]["identity"]
    assert "cache_dir" not in ident and "device" not in ident and "seed" not in ident["data"]
    assert "seed" not in ident["train"] and "checkpoint_every" not in ident["train"]


def test_run_without_identity_or_config_is_never_merged(tmp_path):
    for name, acc in (("x", 30.0), ("y", 35.0)):
        d = tmp_path / name
        d.mkdir()
        (d / "results.json").write_text(json.dumps({"method": "coop", "dataset": "dtd", "classes": "all",
                                                    "backbone": "RN50", "shots": 16, "seed": 1,
                                                    "metrics": {"accuracy": acc}}))
    summary = summarize(collect_results([tmp_path]))
    assert [s["runs"] for s in summary] == [1, 1] and summary[0]["identity"] is None
    lines = _table_lines(markdown(summary, []))
    assert len(set(lines)) == 2 and str(tmp_path / "x") in lines[0]  # told apart by their paths


def test_rows_that_would_print_alike_get_a_group_column(tmp_path):
    _write_run(tmp_path / "int", _identity(1, n_ctx=4), 60.0)
    _write_run(tmp_path / "str", _identity(1, n_ctx="4"), 61.0)  # different configurations, same text
    summary = summarize(collect_results([tmp_path]))
    assert len(summary) == 2 and all("group" in s["columns"] for s in summary)
    lines = [l.split(" ± ")[0].rsplit("|", 1)[0] for l in _table_lines(markdown(summary, []))]
    assert len(set(lines)) == 2


def test_duplicate_seed_is_an_error_naming_both_paths(tmp_path):
    a = _write_run(tmp_path / "a", _identity(1), 60.0)
    b = _write_run(tmp_path / "b", _identity(1), 61.0)
    with pytest.raises(VLPromptError, match="duplicate") as e:
        summarize(collect_results([tmp_path]))
    assert str(a) in str(e.value) and str(b) in str(e.value)


def test_overlapping_paths_find_a_run_once(tmp_path):
    _write_run(tmp_path / "a", _identity(1), 60.0)
    (row,) = summarize(collect_results([tmp_path, tmp_path / "a" / ".." / "a"]))
    assert row["runs"] == 1


def _write_b2n(run_dir, identity, base, new, eval_root="/data/caltech-101"):
    (run_dir / "eval").mkdir(parents=True, exist_ok=True)
    (run_dir / "eval" / "base2new-caltech101.json").write_text(json.dumps({
        "run": str(run_dir), "method": identity["method"], "dataset": "caltech101", "metric": "accuracy",
        "base": base, "new": new, "harmonic_mean": 2 * base * new / (base + new), "identity": identity,
        "eval_data": {"dataset": "caltech101", "root": eval_root, "options": {}}}))


def test_base_to_new_groups_by_identity_and_eval_data_with_h_on_averages(tmp_path):
    for seed, (base, new) in zip((1, 2), ((90.0, 50.0), (70.0, 70.0))):
        _write_b2n(tmp_path / f"coop{seed}", _identity(seed, classes="base"), base, new)
        _write_b2n(tmp_path / f"csc{seed}", _identity(seed, classes="base", csc=True), base - 10, new - 10)
        # The same trained run evaluated on another copy of the data: its own row.
        _write_b2n(tmp_path / f"coop{seed}-other", _identity(seed, classes="base"), 10.0, 20.0, eval_root="/other")
    rows = summarize_base_to_new([tmp_path])
    assert len(rows) == 3 and all(r["runs"] == 2 and r["seeds"] == [1, 2] for r in rows)
    (coop,) = [r for r in rows if r["identity"]["method_options"] == {}
               and r["identity"]["eval_data"]["root"] == "/data/caltech-101"]
    assert (coop["base"], coop["new"]) == (80.0, 60.0)
    assert coop["harmonic_mean"] == pytest.approx(2 * 80 * 60 / 140)  # on the averages, not the mean of Hs
    assert coop["harmonic_mean"] != pytest.approx(np.mean([2 * 90 * 50 / 140, 70.0]))
    assert coop["base_std"] == pytest.approx(np.std([90.0, 70.0]))
    text = markdown([], rows)
    assert "eval_data.root" in text and "68.57" in text


def test_base_to_new_duplicate_seed_is_an_error(tmp_path):
    _write_b2n(tmp_path / "a", _identity(1, classes="base"), 80.0, 60.0)
    _write_b2n(tmp_path / "b", _identity(1, classes="base"), 81.0, 61.0)
    with pytest.raises(VLPromptError, match="duplicate"):
        summarize_base_to_new([tmp_path])


def test_cli_table_json_carries_the_full_group_identity(tmp_path, capsys):
    _write_run(tmp_path / "runs" / "a", _identity(1, csc=True), 60.0)
    _write_run(tmp_path / "runs" / "b", _identity(1), 62.0)
    out_md = tmp_path / "table.md"
    assert main(["table", str(tmp_path / "runs"), "--json", "--output", str(out_md)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert "population" in data["std"]
    assert sorted(json.dumps(r["identity"]["method_options"]) for r in data["runs"]) == ['{"csc": true}', '{}']
    assert all(r["identity"]["data"]["root"] == "/data/caltech-101" for r in data["runs"])
    assert "method_options.csc" in out_md.read_text()  # --output is honoured with --json too
    assert main(["table", str(tmp_path / "runs"), "--metric", "nope"]) == 2
    assert "nope" in capsys.readouterr().err


def test_a_metric_that_is_not_a_number_is_an_error_naming_the_run(tmp_path):
    run = _write_run(tmp_path / "a", _identity(1), None)
    with pytest.raises(VLPromptError, match=f"{run}: accuracy is None"):
        summarize(collect_results([tmp_path]))


def test_cli_table_on_a_folder_without_finished_runs_is_one_line_and_writes_nothing(tmp_path, capsys):
    empty = tmp_path / "runs"
    empty.mkdir()
    out_md = tmp_path / "table.md"
    assert main(["table", str(empty), "--output", str(out_md)]) == 2
    err = capsys.readouterr().err
    assert "no run results under" in err and str(empty) in err and len(err.strip().splitlines()) == 1
    assert not out_md.exists()
    (empty / "unfinished").mkdir()  # a run that has not written results.json yet
    (empty / "unfinished" / "run.json").write_text(json.dumps({"vlprompt_run": 1, "status": "running"}))
    assert main(["table", str(empty), "--json", "--output", str(out_md)]) == 2
    assert not out_md.exists() and capsys.readouterr().out == ""
