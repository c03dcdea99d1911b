"""Label-scarce runs: only a fraction of the training slides keep their labels."""

from collections import Counter

import pytest

from resdistill.data import (
    DatasetInfo,
    make_loader,
    read_manifest,
    select_labelled_slides,
    shard_keys,
)
from tests.fixtures_data import write_dataset


@pytest.fixture(scope="module")
def many_slides(tmp_path_factory):
    root = tmp_path_factory.mktemp("many-slides")
    write_dataset(
        root, samples={"train": 120, "val": 16}, shards={"train": 3, "val": 1}, slides_per_split=20
    )
    return root


def test_selection_is_seeded_and_keeps_every_class(many_slides):
    manifest = read_manifest(str(many_slides))
    chosen = select_labelled_slides(manifest, ["train"], 0.1, seed=0)
    assert chosen == select_labelled_slides(manifest, ["train"], 0.1, seed=0)
    rows = manifest.to_pylist()
    label_of = {r["slide"]: r["label"] for r in rows if r["split"] == "train"}
    assert set(label_of[s] for s in chosen) == set(label_of.values()), "a class lost every label"
    assert len(chosen) < len(label_of) / 2
    assert select_labelled_slides(manifest, ["train"], 1.0) is None
    with pytest.raises(ValueError):
        select_labelled_slides(manifest, ["train"], 0.0)


def test_loader_hides_labels_of_other_slides(many_slides):
    manifest = read_manifest(str(many_slides))
    chosen = select_labelled_slides(manifest, ["train"], 0.1, seed=1)
    keys = shard_keys(manifest, ["train"], labelled_only=True, labelled_slides=chosen)
    kept = {k.rsplit("_", 2)[0] for v in keys.values() for k in v}
    assert kept == set(chosen)
    info = DatasetInfo.load(str(many_slides))
    loader = make_loader(
        info,
        ["train"],
        ["10x"],
        batch_size=8,
        train=False,
        num_workers=0,
        manifest=manifest,
        labelled_slides=chosen,
    )
    seen = Counter()
    for batch in loader.epoch():
        for key, label in zip(batch.keys, batch.labels.tolist(), strict=True):
            seen[(key.rsplit("_", 2)[0] in chosen, label >= 0)] += 1
    assert seen[(True, True)] > 0 and seen[(False, False)] > 0
    assert seen[(True, False)] == 0 and seen[(False, True)] == 0


def test_label_scarce_stream_decodes_only_what_it_yields(many_slides, monkeypatch):
    """Unlabelled samples are dropped before their images are decoded (a 10% run would
    otherwise decode and augment ten samples for each one it trains on)."""
    import resdistill.data.stream as D

    manifest = read_manifest(str(many_slides))
    chosen = select_labelled_slides(manifest, ["train"], 0.1, seed=1)
    decoded = Counter()
    real = D.decode_image

    def counting(data):
        decoded["images"] += 1
        return real(data)

    monkeypatch.setattr(D, "decode_image", counting)
    loader = make_loader(DatasetInfo.load(str(many_slides)), ["train"], ["10x"], batch_size=4,
                         train=True, steps=3, num_workers=0, shuffle_buffer=8, manifest=manifest,
                         labelled_only=True, labelled_slides=chosen)  # fmt: skip
    yielded = 0
    for batch in loader.epoch():
        assert all(k.rsplit("_", 2)[0] in chosen for k in batch.keys)
        assert (batch.labels >= 0).all()
        yielded += len(batch.keys)
    assert yielded == 12
    # the shuffle buffer reads ahead by at most its size; nothing unlabelled is ever decoded
    assert yielded <= decoded["images"] <= yielded + 8, decoded
