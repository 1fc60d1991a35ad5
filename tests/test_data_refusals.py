"""What the data layer refuses instead of guessing: CSV columns it would not read, integer labels that would
invent classes, contradicting class names, and images that only fail once decoded."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from conftest import jpeg, write_csv
from vlprompt.data import Sample, check_samples, load_dataset, load_image, verify_image
from vlprompt.errors import DataError


@pytest.fixture
def img(tmp_path) -> Path:
    return jpeg(tmp_path / "a.jpg")


# ------------------------------------------------------------------------------------------- CSV columns


def test_csv_unknown_column_is_an_error_naming_it_and_the_known_ones(tmp_path, img):
    path = write_csv(tmp_path / "d.csv", ["path", "label", "clasname", "Split"], [["a.jpg", 0, "dog", "train"]])
    with pytest.raises(DataError) as ei:
        load_dataset("csv", path)
    msg = str(ei.value)
    assert "d.csv" in msg and "unknown column(s) ['clasname']" in msg
    assert "path, label, classname, split" in msg


def test_csv_target_column_is_known_only_when_asked_for(tmp_path, img):
    path = write_csv(tmp_path / "d.csv", ["path", "label", "Age"], [["a.jpg", 0, 30]])
    with pytest.raises(DataError, match=r"unknown column\(s\) \['Age'\].*target=<column>"):
        load_dataset("csv", path)
    assert load_dataset("csv", path, target="age", split_seed=1).extra["target"] == "Age"


def test_csv_repeated_column_and_values_under_no_column_are_errors(tmp_path, img):
    rep = write_csv(tmp_path / "rep.csv", ["path", "label", "Label"], [["a.jpg", 0, 1]])
    with pytest.raises(DataError, match=r"rep\.csv has repeated column\(s\) \['Label', 'label'\]"):
        load_dataset("csv", rep)
    extra = tmp_path / "extra.csv"
    extra.write_text("path,label\na.jpg,0\nb,c.jpg,1\n")
    with pytest.raises(DataError, match=r"extra\.csv row 3 has 3 fields, the header has 2"):
        load_dataset("csv", extra)


def test_ordinal_target_csv_still_reads_through_the_shared_parser(tmp_path, img):
    rows = [["a.jpg", i, 20 + i] for i in range(10)]
    path = write_csv(tmp_path / "ages.csv", ["path", "label", "age"], rows)
    ds = load_dataset("csv", path, target_column="age", folds=2, fold=0)
    assert sorted(s.target for s in ds.train + ds.val + ds.test) == [20.0 + i for i in range(10)]


# ------------------------------------------------------------------------------------------ CSV labels


def test_csv_integer_labels_make_exactly_the_classes_present(tmp_path, img):
    rows = [["a.jpg", lab] for lab in (7, 0, 1, 7, 0, 1, 7, 0, 1, 7)]
    path = write_csv(tmp_path / "d.csv", ["path", "label"], rows)
    ds = load_dataset("csv", path)
    assert ds.classnames == ["0", "1", "7"]  # not 8 classes '0'..'7' with five empty ones
    labels = sorted({s.label for s in ds.train + ds.val + ds.test})
    assert labels == [0, 1, 2]
    assert all(ds.classnames[s.label] == s.classname for s in ds.train + ds.val + ds.test)


def test_csv_integer_labels_are_sorted_numerically_and_named_by_the_classname_column(tmp_path, img):
    rows = [["a.jpg", 10, "ten"], ["a.jpg", 2, "two"], ["a.jpg", 10, ""], ["a.jpg", 3, "three"],
            ["a.jpg", 2, "two"], ["a.jpg", 3, "three"]]
    path = write_csv(tmp_path / "d.csv", ["path", "label", "classname", "split"],
                     [r + ["test"] for r in rows])
    ds = load_dataset("csv", path)
    assert ds.classnames == ["two", "three", "ten"]  # 2 < 3 < 10, not '10' < '2' < '3'
    assert [(s.label, s.classname) for s in ds.test] == [(2, "ten"), (0, "two"), (2, "ten"), (1, "three"),
                                                          (0, "two"), (1, "three")]


def test_csv_label_named_differently_names_both_rows(tmp_path, img):
    rows = [["a.jpg", 0, "cat"], ["a.jpg", 1, "dog"], ["a.jpg", 1, "dog"], ["a.jpg", 0, "kitten"]]
    path = write_csv(tmp_path / "d.csv", ["path", "label", "classname"], rows)
    with pytest.raises(DataError, match=r"d\.csv: label 0 is named 'cat' in row 2 but 'kitten' in row 5"):
        load_dataset("csv", path)


def test_csv_two_labels_with_one_name_are_an_error(tmp_path, img):
    path = write_csv(tmp_path / "d.csv", ["path", "label", "classname"], [["a.jpg", 0, "cat"], ["a.jpg", 1, "cat"]])
    with pytest.raises(DataError, match="several classes have the same name.*'cat'"):
        load_dataset("csv", path)


def test_csv_label_never_named_in_a_classname_column_is_an_error(tmp_path, img):
    path = write_csv(tmp_path / "d.csv", ["path", "label", "classname"],
                     [["a.jpg", 0, "cat"], ["a.jpg", 4, ""], ["a.jpg", 4, " "]])
    with pytest.raises(DataError, match=r"label 4 has an empty classname in every row \(rows \[3, 4\]\)"):
        load_dataset("csv", path)


def test_csv_mixed_index_and_name_labels_are_an_error(tmp_path, img):
    path = write_csv(tmp_path / "d.csv", ["path", "label"], [["a.jpg", 0], ["a.jpg", 1], ["a.jpg", "cat"]])
    with pytest.raises(DataError, match=r"class index in row 2 \('0'\) but not in row 4 \('cat'\)"):
        load_dataset("csv", path)


def test_csv_name_labels_with_a_contradicting_classname_are_an_error(tmp_path, img):
    same = write_csv(tmp_path / "same.csv", ["path", "label", "classname"],
                     [["a.jpg", "cat_face", "cat face"], ["a.jpg", "dog", ""]])
    assert load_dataset("csv", same).classnames == ["cat face", "dog"]
    other = write_csv(tmp_path / "other.csv", ["path", "label", "classname"],
                      [["a.jpg", "cat", "cat"], ["a.jpg", "dog", "puppy"]])
    with pytest.raises(DataError, match=r"other\.csv row 3: label 'dog' is a class name but the classname "
                                        r"column says 'puppy'"):
        load_dataset("csv", other)


def test_csv_integer_labels_with_given_classnames_still_index_the_list(tmp_path, img):
    path = write_csv(tmp_path / "d.csv", ["path", "label"], [["a.jpg", 0], ["a.jpg", 2]])
    ds = load_dataset("csv", path, classnames=["cat", "dog", "bird"])
    assert ds.classnames == ["cat", "dog", "bird"]
    assert sorted(s.label for s in ds.train + ds.val + ds.test) == [0, 2]


# ------------------------------------------------------------------------------- images failing to decode


def _cut_jpeg(tmp_path: Path) -> tuple[Path, Path]:
    """A real JPEG and a copy cut in half: its header is intact, its entropy-coded data is not."""
    good = tmp_path / "good.jpg"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(good, quality=90)
    data = good.read_bytes()
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data[: len(data) // 2])
    with Image.open(cut) as im:  # the header-level check cannot see it
        im.verify()
    return good, cut


def test_skip_mode_skips_a_jpeg_that_fails_while_decoding(tmp_path):
    good, cut = _cut_jpeg(tmp_path)
    samples = [Sample(str(good), 0, "a"), Sample(str(cut), 1, "b"), Sample(str(good), 1, "b")]
    ok, problems = check_samples(samples, mode="skip")
    assert [s.path for s in ok] == [str(good), str(good)]
    assert len(problems) == 1
    path, reason = problems[0]
    assert path == str(cut) and "truncated" in reason  # the file and the decoder's own words


def test_error_mode_fails_at_once_naming_the_file_and_the_decoder_message(tmp_path):
    good, cut = _cut_jpeg(tmp_path)
    with pytest.raises(DataError) as ei:
        check_samples([Sample(str(good), 0, "a"), Sample(str(cut), 0, "a")], source="mine train split")
    msg = str(ei.value)
    assert msg.startswith("mine train split: 1 of 2 image file(s) cannot be used")
    assert str(cut) in msg and "truncated" in msg
    assert verify_image(good) is None and "truncated" in verify_image(cut)
    with pytest.raises(DataError, match="cut.jpg.*truncated"):
        load_image(cut)


def test_pil_switch_that_pads_truncated_images_is_refused(tmp_path, monkeypatch):
    good, cut = _cut_jpeg(tmp_path)
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with Image.open(cut) as im:  # what PIL does then: grey padding, no error
        im.load()
    for call in (lambda: load_image(good), lambda: check_samples([Sample(str(good), 0, "a")], mode="skip")):
        with pytest.raises(DataError, match="LOAD_TRUNCATED_IMAGES is True"):
            call()
