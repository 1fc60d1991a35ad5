"""The bundled published numbers: they load, every number has a source, and they join on everything or nothing."""
import json

import pytest

from vlprompt.errors import VLPromptError
from vlprompt.papers import PROTOCOLS, load_papers, matches, normalize_backbone, paper_files, paper_notes


def test_bundled_paper_files_load_and_every_number_has_its_source():
    numbers = load_papers()
    assert {f.name for f in paper_files()} == {"coop.json", "cocoop.json", "plot.json", "ordinalclip.json",
                                               "kgcoop.json", "maple.json", "clip_lora.json",
                                               "maple_baselines.json", "promptsrc.json", "tip_adapter.json",
                                               "clip_adapter.json"}
    assert numbers and all(n.source.strip() and n.protocol in PROTOCOLS for n in numbers)
    notes = paper_notes()
    assert set(notes) == {"CoOp", "CoCoOp", "PLOT", "OrdinalCLIP", "KgCoOp", "MaPLe", "CLIP-LoRA", "MaPLe baselines",
                          "PromptSRC", "Tip-Adapter", "CLIP-Adapter"}
    assert all(v["notes"] and v["citation"] for v in notes.values())  # what was bundled and why, per paper


def test_bundled_numbers_are_the_cited_ones():
    by = {(n.method, n.dataset, n.protocol, n.metric, n.seed): n.value for n in load_papers()
          if n.paper != "Tip-Adapter"}  # (its zero-shot ImageNet is the 7-prompt ensemble's: tests/test_tip_adapter.py)
    assert [by["coop", "dtd", "fewshot", "accuracy", s] for s in (1, 2, 3)] == [62.53, 64.07, 64.13]
    assert [by["coop", "oxford_flowers", "fewshot", "accuracy", s] for s in (1, 2, 3)] == [94.68, 94.44, 94.40]
    assert by["zeroshot", "imagenet", "fewshot", "accuracy", None] == 58.18
    for method, (b, n, h) in {"zeroshot": (69.34, 74.22, 71.70), "coop": (82.69, 63.22, 71.66),
                              "cocoop": (80.47, 71.69, 75.83)}.items():
        assert [by[method, "average11", "base2new", m, None] for m in ("base", "new", "harmonic_mean")] == [b, n, h]
        assert 2 * b * n / (b + n) == pytest.approx(h, abs=0.006)  # the paper's H is of its averages
    assert by["ordinalclip", "morph2", "ordinal", "mae", None] == 2.32
    assert by["ordinalclip", "hci-dating", "ordinal", "accuracy", None] == 56.44
    # CoOp's ImageNet points as Tip-Adapter's Table 2 prints them; CoCoOp's Tables 1-3, spot checks
    imagenet = {n.shots: n.value for n in load_papers() if (n.method, n.dataset) == ("coop", "imagenet")}
    assert imagenet == {1: 57.15, 2: 57.81, 4: 59.99, 8: 61.56, 16: 62.95}
    assert [by["cocoop", "dtd", "base2new", m, None] for m in ("base", "new", "harmonic_mean")] == [77.01, 56.00, 64.85]
    assert by["coop", "eurosat", "base2new", "base", None] == 92.19
    assert by["cocoop", "fgvc_aircraft", "cross-dataset", "accuracy", None] == 22.94
    assert by["coop", "imagenet_r", "domain-generalization", "accuracy", None] == 75.21
    # MaPLe's README (11-dataset average), its EuroSAT row as issue #28 quotes it; CLIP-LoRA's Flowers as issue #1 does
    for ds, (b, n, h) in {"average11": (82.28, 75.14, 78.55), "eurosat": (94.07, 73.23, 82.35)}.items():
        assert [by["maple", ds, "base2new", m, None] for m in ("base", "new", "harmonic_mean")] == [b, n, h]
        assert 2 * b * n / (b + n) == pytest.approx(h, abs=0.006)
    assert by["clip-lora", "oxford_flowers", "fewshot", "accuracy", None] == 98.0


def test_cocoop_table_1_is_self_consistent_per_dataset_and_on_average():
    """A transcription error in a base, new or H cell breaks H = 2BN/(B+N) (the paper rounds to 0.01), and a wrong
    dataset row breaks the 11-dataset average the paper prints."""
    from vlprompt.reporting.tables import COOP_DATASETS

    b2n = {(n.method, n.dataset, n.metric): n for n in load_papers() if n.protocol == "base2new"}
    for method, shots in (("zeroshot", 0), ("coop", 16), ("cocoop", 16)):
        for ds in (*COOP_DATASETS, "average11"):
            b, n, h = (b2n[method, ds, m] for m in ("base", "new", "harmonic_mean"))
            assert (b.shots, b.backbone, b.pretrained) == (shots, "ViT-B-16", "openai")
            assert 2 * b.value * n.value / (b.value + n.value) == pytest.approx(h.value, abs=0.006), (method, ds)
        for m in ("base", "new"):
            mean = sum(b2n[method, ds, m].value for ds in COOP_DATASETS) / len(COOP_DATASETS)
            assert mean == pytest.approx(b2n[method, "average11", m].value, abs=0.006), (method, m)
    transfer = [n for n in load_papers() if n.protocol in ("cross-dataset", "domain-generalization")]
    assert sorted((n.method, n.protocol) for n in transfer).count(("cocoop", "cross-dataset")) == 10
    assert {n.dataset for n in transfer if n.protocol == "domain-generalization"} == {
        "imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r"}
    # CoCoOp's numbers are of its recipe (4 context vectors from "a photo of a", 10 epochs, batch 1)
    assert all(n.conditions["train.epochs"] == [10] for n in load_papers() if n.method == "cocoop")


def _write(tmp_path, rows, name="x.json"):
    (tmp_path / name).write_text(json.dumps({"paper": "X", "citation": "c", "notes": ["n"], "rows": rows}))
    return tmp_path


ROW = {"method": "coop", "dataset": "dtd", "protocol": "fewshot", "backbone": "RN50", "pretrained": "openai",
       "shots": 16, "metric": "accuracy", "value": 60.0, "source": "Table 9"}


@pytest.mark.parametrize("change, message", [
    ({"source": " "}, "needs its source"), ({"protocol": "few-shot"}, "protocol"), ({"value": "60"}, "not a number"),
    ({"shots": -1}, "not a count"), ({"extra": 1}, "unknown keys"), ({"conditions": {"a": 1}}, "conditions")])
def test_a_number_without_source_or_with_a_bad_field_is_refused(tmp_path, change, message):
    with pytest.raises(VLPromptError, match=message):
        load_papers(_write(tmp_path, [{**ROW, **change}]))
    row = dict(ROW)
    del row["source"]
    with pytest.raises(VLPromptError, match="missing keys"):
        load_papers(_write(tmp_path, [row]))


def test_the_same_number_twice_is_refused(tmp_path):
    with pytest.raises(VLPromptError, match="the same number"):
        load_papers(_write(tmp_path, [ROW, {**ROW, "value": 61.0}]))


def _m(n, **kw):
    base = dict(method="coop", dataset="dtd", protocol="fewshot", backbone="RN50", pretrained="openai", shots=16,
                metric="accuracy", flat_identity={"method_options.csc": False})
    return matches(n, **{**base, **kw})


def test_join_needs_method_dataset_protocol_backbone_weights_shots_metric_and_conditions(tmp_path):
    (n,) = load_papers(_write(tmp_path, [{**ROW, "conditions": {"method_options.csc": [False]}}]))
    assert _m(n) and _m(n, backbone="RN50-quickgelu")  # the same OpenAI weights under open_clip's name
    for change in ({"method": "cocoop"}, {"dataset": "eurosat"}, {"protocol": "base2new"}, {"backbone": "ViT-B-16"},
                   {"pretrained": "/tmp/tiny.pt"}, {"shots": 8}, {"metric": "new"},
                   {"flat_identity": {"method_options.csc": True}}, {"flat_identity": {}}, {"flat_identity": None}):
        assert not _m(n, **change), change


def test_a_number_whose_backbone_is_not_stated_never_joins():
    morph = [n for n in load_papers() if n.dataset == "morph2" and n.method == "ordinalclip"]
    assert morph and all(n.backbone is None for n in morph)
    assert not any(matches(n, method="ordinalclip", dataset="morph2", protocol="ordinal", backbone="RN50",
                           pretrained="openai", shots=0, metric="mae", flat_identity={}) for n in morph)
    assert normalize_backbone("ViT-B/16") == "ViT-B-16" and normalize_backbone(None) is None


@pytest.mark.parametrize("method, dataset, protocol, shots, classes, backbone", [
    ("cocoop", "dtd", "base2new", 16, "base", "ViT-B-16"), ("coop", "imagenet", "fewshot", 16, "all", "RN50"),
    ("coop", "imagenet", "fewshot", 1, "all", "RN50"), ("zeroshot", "dtd", "base2new", 0, "base", "ViT-B-16"),
    ("kgcoop", "eurosat", "base2new", 16, "base", "ViT-B-16"), ("prograd", "eurosat", "base2new", 16, "base", "ViT-B-16"),
    ("maple", "eurosat", "base2new", 16, "base", "ViT-B-16"),
    ("clip-lora", "oxford_flowers", "fewshot", 16, "all", "ViT-B-16")])
def test_a_default_run_of_the_papers_recipe_meets_its_numbers_conditions(method, dataset, protocol, shots, classes,
                                                                         backbone):
    """The conditions name keys a resolved run really carries, with the values its default (paper) recipe has: a
    condition on a key no run has, or on a value the recipe never takes, would silently never join."""
    from vlprompt.reporting.collect import flatten
    from vlprompt.runs import resolve

    cfg = resolve({"method": method, "backbone": backbone, "pretrained": "openai",
                   "data": {"dataset": dataset, "root": "/nonexistent", "shots": shots, "classes": classes}})
    flat = flatten(cfg.identity())
    found = [n for n in load_papers() if (n.method, n.dataset, n.protocol, n.shots) == (method, dataset, protocol,
                                                                                        shots)]
    assert found
    for n in found:
        assert matches(n, method=method, dataset=dataset, protocol=protocol, backbone=backbone, pretrained="openai",
                       shots=shots, metric=n.metric, flat_identity=flat), n


def test_kgcoop_numbers_are_its_readmes_and_maintainers_and_join_only_its_recipe():
    """htyao89/KgCoOp readme.md (base-to-new averages, ViT-B/16 16 shots: KgCoOp and ProGrad as its comparison
    prints it) and issue #2 (EuroSAT base); KgCoOp's rows join runs of its scripts' recipe only, either schedule."""
    rows = [n for n in load_papers() if n.paper == "KgCoOp"]
    by = {(n.method, n.dataset, n.metric): n for n in rows}
    assert len(by) == len(rows) == 8
    for method, (b, n, h) in {"kgcoop": (80.73, 73.6, 77.0), "prograd": (82.48, 70.75, 76.16)}.items():
        assert [by[method, "average11", m].value for m in ("base", "new", "harmonic_mean")] == [b, n, h]
        assert 2 * b * n / (b + n) == pytest.approx(h, abs=0.01)  # the README's H is of its averages
    assert by["kgcoop", "eurosat", "base"].value == 85.64 and by["prograd", "eurosat", "base"].value == 90.11
    assert all((n.backbone, n.pretrained, n.shots, n.protocol) == ("ViT-B-16", "openai", 16, "base2new")
               for n in rows)
    assert all(not n.conditions for n in rows if n.method == "prograd")
    recipe = {"method_options.init": "a photo of a", "method_options.n_ctx": None, "method_options.csc": False,
              "method_options.class_position": "end", "method_options.kg_weight": 8.0, "train.epochs": 100,
              "train.batch_size": 128, "train.scheduler": "cosine"}
    n = by["kgcoop", "average11", "harmonic_mean"]
    kw = dict(method="kgcoop", dataset="average11", protocol="base2new", backbone="ViT-B-16", pretrained="openai",
              shots=16, metric="harmonic_mean")
    assert matches(n, **kw, flat_identity=recipe)
    assert matches(n, **kw, flat_identity={**recipe, "train.scheduler": "cosine_squared"})
    for change in ({"method_options.kg_weight": 4.0}, {"method_options.init": None}, {"train.epochs": 200},
                   {"method_options.csc": True}, {"train.batch_size": 32}):
        assert not matches(n, **kw, flat_identity={**recipe, **change}), change
