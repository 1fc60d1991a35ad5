"""The bundled published numbers: they load, every number has a source, and they join on everything or nothing."""
import json

import pytest

from vlprompt.errors import VLPromptError
from vlprompt.papers import PROTOCOLS, load_papers, matches, normalize_backbone, paper_files, paper_notes


def test_bundled_paper_files_load_and_every_number_has_its_source():
    numbers = load_papers()
    assert {f.name for f in paper_files()} == {"coop.json", "cocoop.json", "plot.json", "ordinalclip.json"}
    assert numbers and all(n.source.strip() and n.protocol in PROTOCOLS for n in numbers)
    notes = paper_notes()
    assert set(notes) == {"CoOp", "CoCoOp", "PLOT", "OrdinalCLIP"}
    assert all(v["notes"] and v["citation"] for v in notes.values())  # what was bundled and why, per paper


def test_bundled_numbers_are_the_cited_ones():
    by = {(n.method, n.dataset, n.protocol, n.metric, n.seed): n.value for n in load_papers()}
    assert [by["coop", "dtd", "fewshot", "accuracy", s] for s in (1, 2, 3)] == [62.53, 64.07, 64.13]
    assert [by["coop", "oxford_flowers", "fewshot", "accuracy", s] for s in (1, 2, 3)] == [94.68, 94.44, 94.40]
    assert by["zeroshot", "imagenet", "fewshot", "accuracy", None] == 58.18
    for method, (b, n, h) in {"zeroshot": (69.34, 74.22, 71.70), "coop": (82.69, 63.22, 71.66),
                              "cocoop": (80.47, 71.69, 75.83)}.items():
        assert [by[method, "average11", "base2new", m, None] for m in ("base", "new", "harmonic_mean")] == [b, n, h]
        assert 2 * b * n / (b + n) == pytest.approx(h, abs=0.006)  # the paper's H is of its averages
    assert by["ordinalclip", "morph2", "ordinal", "mae", None] == 2.32
    assert by["ordinalclip", "hci-dating", "ordinal", "accuracy", None] == 56.44


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
