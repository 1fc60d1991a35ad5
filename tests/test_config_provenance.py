"""config.yaml keeps apart what the user set and what the method's recipe derived: flags over a run's config.yaml
used as --config derive the recipe again (a plausible wrong number otherwise: --shots 1 kept the 16-shot
epochs), the file alone is the same run, and --show-config says where each value came from."""
import json

import pytest
import yaml

from conftest import color_folder
from vlprompt.cli import main
from vlprompt.runs import merge_requests, request_of, resolve, run
from vlprompt.runs.config import load_request
from vlprompt.testing import make_tiny_checkpoint


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("prov_models"), "tiny-vit", seed=4)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return color_folder(tmp_path_factory.mktemp("prov_data") / "shapes")


@pytest.fixture(scope="module")
def coop16(model_files, folder, tmp_path_factory):
    """A real CoOp run's directory: 16 shots (all 5 training images per class), the recipe's 200 epochs, stopped
    after one step (a smoke run: ``max_steps`` is the user's)."""
    cfg, weights = model_files
    out = tmp_path_factory.mktemp("prov_runs") / "coop16"
    request = {"method": "coop", "backbone": str(cfg), "pretrained": str(weights),
               "cache_dir": str(tmp_path_factory.mktemp("prov_cache")),
               "data": {"dataset": "folder", "root": str(folder), "shots": 16, "allow_fewer": True},
               "train": {"max_steps": 1, "views": 1}, "method_options": {"n_ctx": 2}}
    with pytest.warns(UserWarning, match="fewer images than asked"):
        results = run(resolve(request), out, progress=False)
    return out, results


def _show(argv, capsys) -> tuple[dict, str]:
    rc = main([*argv, "--show-config"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return yaml.safe_load(out), out


def test_config_yaml_records_what_the_user_set(coop16):
    out, results = coop16
    on_disk = yaml.safe_load((out / "config.yaml").read_text())
    assert on_disk["train"]["epochs"] == 200  # the recipe's, for 16 shots
    assert "train.epochs" not in on_disk["user_set"]
    assert {"method", "data.shots", "data.allow_fewer", "train.max_steps", "method_options.n_ctx"} <= \
        set(on_disk["user_set"])
    assert on_disk["user_set"]["data.shots"] == 16 and on_disk["user_set"]["data.root"] == on_disk["data"]["root"]
    assert results["config"] == on_disk  # results.json carries the resolved configuration with it
    assert "user_set" not in results["identity"]


@pytest.mark.parametrize("flags, epochs", [(["--shots", "1"], 50), (["--shots", "4"], 100), ([], 200)])
def test_flags_over_a_runs_config_derive_the_recipe_again(flags, epochs, coop16, capsys):
    out, _ = coop16
    shown, _ = _show(["train", "--config", str(out / "config.yaml"), *flags], capsys)
    assert shown["train"]["epochs"] == epochs  # the fresh --shots 1 value: CoOp's 50 epochs at 1 shot
    assert shown["train"]["max_steps"] == 1 and shown["method_options"]["n_ctx"] == 2  # the user's are kept


def test_another_dataset_over_a_runs_config_gets_its_recipe(coop16, tmp_path, capsys):
    out, _ = coop16
    shown, _ = _show(["train", "--config", str(out / "config.yaml"), "--dataset", "imagenet", "--root",
                      str(tmp_path)], capsys)
    assert shown["train"]["epochs"] == 50  # CoOp's ImageNet recipe (resolution reads no data)


def test_the_python_api_and_a_grid_spec_derive_the_same_way(coop16, tmp_path):
    import vlprompt
    from vlprompt.grid.spec import expand, resolve_cells, spec_from_mapping

    out, _ = coop16
    on_disk = yaml.safe_load((out / "config.yaml").read_text())
    res = vlprompt.train(on_disk, data={"shots": 1}, output=tmp_path / "one", progress=False)  # a loaded config.yaml
    assert res["config"]["train"]["epochs"] == 50 and res["config"]["data"]["shots"] == 1
    assert resolve({**on_disk}).identity_hash() == resolve(request_of(on_disk)).identity_hash()
    from vlprompt.runs import merge_requests

    merged = merge_requests(on_disk, {"data": {"dataset": "imagenet"}})  # values merged over the file itself
    assert resolve(merged).train.epochs == 50
    spec = spec_from_mapping({**on_disk, "axes": {"data.shots": [1, 16]}})
    cells = resolve_cells(expand(spec))
    assert sorted(c.config.train.epochs for c in cells) == [50, 200]


def test_a_runs_own_config_is_the_same_run(coop16, capsys):
    out, results = coop16
    again = resolve(load_request(out / "config.yaml"))
    assert again.identity_hash() == results["config_hash"]
    rc = main(["train", "--config", str(out / "config.yaml"), "--output", str(out), "--quiet"])
    printed, err = capsys.readouterr()
    assert rc == 0, err
    assert json.loads(printed)["metrics"] == results["metrics"]  # already finished: the same run, not another


def test_a_value_set_in_the_file_is_kept(coop16, tmp_path, capsys):
    """An explicit --epochs is the user's; a value edited by hand in config.yaml is kept too (it differs from
    what the recipe gives), and a hand-written config without user_set is all the user's."""
    out, _ = coop16
    on_disk = yaml.safe_load((out / "config.yaml").read_text())
    explicit = tmp_path / "explicit.yaml"
    explicit.write_text(yaml.safe_dump({**on_disk, "train": {**on_disk["train"], "epochs": 7},
                                        "user_set": {**on_disk["user_set"], "train.epochs": 7}}))
    shown, _ = _show(["train", "--config", str(explicit), "--shots", "1"], capsys)
    assert shown["train"]["epochs"] == 7
    edited = tmp_path / "edited.yaml"
    edited.write_text((out / "config.yaml").read_text().replace("epochs: 200", "epochs: 30"))
    shown, _ = _show(["train", "--config", str(edited), "--shots", "1"], capsys)
    assert shown["train"]["epochs"] == 30 and shown["user_set"]["train.epochs"] == 30
    # a value the user set, edited by hand: the recipe follows it
    shots = tmp_path / "shots.yaml"
    shots.write_text(yaml.safe_dump({**on_disk, "data": {**on_disk["data"], "shots": 1}}))
    shown, _ = _show(["train", "--config", str(shots)], capsys)
    assert shown["train"]["epochs"] == 50
    hand = tmp_path / "hand.yaml"
    hand.write_text(yaml.safe_dump({k: v for k, v in on_disk.items() if k != "user_set"}))
    shown, _ = _show(["train", "--config", str(hand), "--shots", "1"], capsys)
    assert shown["train"]["epochs"] == 200  # no provenance: every value is the user's


def test_show_config_names_where_each_value_came_from(coop16, capsys):
    out, _ = coop16
    shown, text = _show(["train", "--config", str(out / "config.yaml"), "--shots", "1"], capsys)
    lines = text.splitlines()

    def origin(key: str, section: str) -> str:
        start = lines.index(f"{section}:")
        line = next(x for x in lines[start + 1:] if x.startswith(f"  {key}:"))
        return line.rsplit("#", 1)[1].strip()

    assert origin("shots", "data") == "user"
    assert origin("epochs", "train") == "recipe"
    assert origin("lr", "train") == "recipe"  # CoOp's recipe names its learning rate
    assert origin("grad_clip", "train") == "default"
    assert origin("n_ctx", "method_options") == "user"
    assert "method: coop  # user" in lines
    assert "recipe = coop's preset" in text
    # the annotated text is the same YAML as config.yaml holds
    assert shown == yaml.safe_load(text) and shown["data"]["shots"] == 1


def test_values_the_method_fixes_when_built_are_derived_again(model_files, folder, tmp_path):
    """A word init fixes n_ctx, zero-shot expands its template set when they are built: config.yaml records what
    was used, and its ``built_from`` keeps them derived (not the user's) when the file is used again: zero-shot's
    config on another dataset takes that dataset's prompt, a CoOp config with another init its length."""
    cfg, weights = model_files
    base = {"backbone": str(cfg), "pretrained": str(weights), "cache_dir": str(tmp_path / "cache"),
            "data": {"dataset": "folder", "root": str(folder)}}
    zs = run(resolve({**base, "method": "zeroshot"}), tmp_path / "zs", progress=False)
    assert zs["config"]["method_options"]["templates"] == ["a photo of a {}."]
    on_disk = yaml.safe_load((tmp_path / "zs" / "config.yaml").read_text())
    assert on_disk["built_from"] == {"method_options.templates": ["dataset"]}
    again = resolve(request_of(on_disk))
    assert again.method_options["templates"] == ["dataset"] and again.identity_hash() != zs["config_hash"]
    other = merge_requests(request_of(on_disk), {"data": {"options": {"template": "{} texture."}}})
    dtd_like = run(resolve(other), tmp_path / "zs-texture", progress=False)
    assert dtd_like["config"]["method_options"]["templates"] == ["{} texture."]  # the dataset's own prompt
    # the same run again from its own file: the same identity (the built value is what it derives)
    assert run(resolve(request_of(on_disk)), tmp_path / "zs", progress=False)["config_hash"] == zs["config_hash"]
    coop = {**base, "method": "coop", "data": {**base["data"], "shots": 2},
            "train": {"epochs": 1, "views": 1}, "method_options": {"init": "a photo of a"}}
    first = run(resolve(coop), tmp_path / "coop", progress=False)
    assert first["config"]["method_options"]["n_ctx"] == 4
    on_disk = yaml.safe_load((tmp_path / "coop" / "config.yaml").read_text())
    longer = resolve(merge_requests(request_of(on_disk), {"method_options": {"init": "a good photo of a"}}))
    assert longer.method_options["n_ctx"] is None  # derived from the new init when built (5), not the old 4


def test_an_option_added_later_leaves_the_identity_of_earlier_runs_at_its_default():
    """init_placement came after runs were made: at its default it is not part of the identity (an earlier run's
    directory keeps its hash), set otherwise it is."""
    base = {"method": "coop", "data": {"dataset": "dtd", "root": "/data"}, "method_options": {"n_ctx": 4}}
    cfg = resolve(base)
    assert cfg.method_options["init_placement"] == "start" and "init_placement" not in cfg.identity()["method_options"]
    placed = resolve({**base, "method_options": {"n_ctx": 6, "init": "a photo of a", "init_placement": "end"}})
    assert placed.identity()["method_options"]["init_placement"] == "end"
