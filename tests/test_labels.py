from collections import Counter

import pytest

from sharding.labels import LabelsError, assign_splits, patient_splits, read_labels


def write(tmp_path, text, name="labels.csv"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_good_labels(tmp_path):
    p = write(tmp_path, "slide,label,patient\ns1,tumor,P1\ns2,benign,P1\ns3,benign,\n")
    out = read_labels(p, {"s1", "s2", "s3", "s4"})
    assert out.label == {"s1": "tumor", "s2": "benign", "s3": "benign"}
    assert out.patient == {"s1": "P1", "s2": "P1"}
    assert out.problems == [] and out.skip == {}
    assert out.classes == ["benign", "tumor"]


def test_each_bad_row_gets_one_line(tmp_path):
    p = write(
        tmp_path,
        "slide,label\ns1,tumor\nghost,tumor\ns2,\ns3,tumor\ns3,benign\ns4,weird\n../x,tumor\n",
    )
    out = read_labels(p, {"s1", "s2", "s3", "s4"}, classes=["tumor", "benign"])
    assert out.label == {"s1": "tumor"}
    assert set(out.skip) == {"s2", "s3", "s4"}
    assert len(out.problems) == 5
    text = "\n".join(out.problems)
    for needle in [
        "'ghost' is not among the input slides",
        "empty label",
        "listed again",
        "'weird', not one of",
        "escape the output prefix",
    ]:
        assert needle in text
    assert all(line.startswith(str(p)) for line in out.problems)


@pytest.mark.parametrize(
    ("text", "match"),
    [("", "no rows"), ("name,class\na,b\n", "must name the columns"), (None, "not found")],
)
def test_unusable_file(tmp_path, text, match):
    p = tmp_path / "labels.csv" if text is None else write(tmp_path, text)
    with pytest.raises(LabelsError, match=match):
        read_labels(p, {"a"})


def test_splits_by_patient_stratified_deterministic():
    labels = {f"s{i}": ("a" if i % 2 else "b") for i in range(40)}
    patients = {f"s{i}": f"P{i // 2}" for i in range(40)}  # two slides per patient, one label each?
    patients = {
        s: f"P{s}-{labels[s]}" if int(s[1:]) % 4 < 2 else f"Q{int(s[1:]) // 4}-{labels[s]}"
        for s in labels
    }
    out = assign_splits(labels, patients, (0.7, 0.15, 0.15), seed=3)
    assert out == assign_splits(labels, patients, (0.7, 0.15, 0.15), seed=3)
    assert set(out) == set(labels)
    by_patient: dict[str, set] = {}
    for s, split in out.items():
        by_patient.setdefault(patients[s], set()).add(split)
    assert all(len(v) == 1 for v in by_patient.values()), "a patient spans two splits"
    for label in "ab":
        counts = Counter(out[s] for s in labels if labels[s] == label)
        assert set(counts) == {"train", "val", "test"}
        assert counts["train"] > counts["val"]
    assert out != assign_splits(labels, patients, (0.7, 0.15, 0.15), seed=4)


def test_splits_keep_fixed_assignments():
    labels = {f"s{i}": "a" for i in range(10)}
    first = assign_splits(labels, {}, (0.5, 0.25, 0.25), seed=0)
    moved = {s: ("test" if v == "train" else "train") for s, v in first.items()}
    assert assign_splits(labels, {}, (0.5, 0.25, 0.25), seed=0, fixed=moved) == moved


def test_small_counts():
    assert set(assign_splits({"s1": "a"}, {}, (0.7, 0.15, 0.15)).values()) == {"train"}
    three = assign_splits({"s1": "a", "s2": "a", "s3": "a"}, {}, (0.7, 0.15, 0.15))
    assert sorted(three.values()) == ["test", "train", "val"]


def test_patient_without_label(tmp_path):
    """``slide,,patient`` names the patient of an unlabelled slide: no problem, no skip."""
    p = write(tmp_path, "slide,label,patient\ns1,tumor,P1\ns2,,P1\ns3,,\n")
    out = read_labels(p, {"s1", "s2", "s3"})
    assert out.label == {"s1": "tumor"}
    assert out.patient == {"s1": "P1", "s2": "P1"}
    assert set(out.skip) == {"s3"} and len(out.problems) == 1  # no label and no patient


def test_unlabelled_slides_follow_their_patient():
    split_of = {"a": "test", "b": "train"}
    patients = {"a": "P1", "b": "P2", "u1": "P1", "u2": "P2", "u3": "P3"}
    assert patient_splits(split_of, patients, ["u1", "u2", "u3", "u4"]) == {
        "u1": "test",
        "u2": "train",
    }
