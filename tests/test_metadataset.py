"""Meta-Dataset's own records read without TensorFlow (issue #30): the writer checked by an independent reader, the
three spec kinds on the reference's real spec files, items that decode to the image their record holds, the decoded
and encoded stores equal, every damage case named with its file and byte offset, few open files, one cache reused by
workers and copies, resumable variable episodes, and the store="auto" choice.

Every fabricated record says which record it is in its pixels (``solid_jpeg``: red = class id x 37 mod 256, green =
item x 53 mod 256; the ImageNet tree: the class id in all three channels, ``coded_jpeg``)."""

import gc
import io
import json
import logging
import os
import pickle
import re
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import FakeTrainer
from mdtrees import SPECS, fabricate, flat_spec, real_spec, shrunk_spec, small_source
from PIL import Image
from tfrecord.reader import tfrecord_loader
from tfrecord.writer import TFRecordWriter

from conftest import OMNIGLOT
from lightning_meta import EpisodicDataModule, RaggedEpisode
from lightning_meta.data import MetaDatasetRecords, MetaDatasetSpec, VariableEpisodes, prune_cache
from lightning_meta.data.datasets.metadataset import solid_jpeg, write_source
from lightning_meta.data.datasets.tfrecord import encode_example, parse_example, read_record, scan_tfrecord, write_tfrecord

needs_specs = pytest.mark.skipif(not (SPECS / "ilsvrc_2012_dataset_spec.json").is_file(),
                                 reason=f"the reference's spec files not found in {SPECS} (the project's shared/ folder)")
TOLERANCE = 3  # JPEG's error on a solid colour, in grey levels


def expected_colours(ds):
    """``[n, 3]``: the colour ``solid_jpeg`` gave each item of ``ds`` (its record's class id and position in its file)."""
    labels = ds.labels.numpy()
    position = np.arange(len(labels)) - np.searchsorted(labels, labels)  # labels are sorted: items class by class
    return torch.tensor([[ds.class_ids[y] * 37 % 256, i * 53 % 256, 128] for y, i in zip(labels.tolist(), position.tolist())],
                        dtype=torch.float32)


def assert_hold_their_records(ds):
    images = ds.gather(torch.arange(len(ds)))
    assert images.dtype == torch.uint8 and images.shape == (len(ds), 3, 8, 8)
    error = (images.float().mean((2, 3)) - expected_colours(ds)).abs()
    assert float(error.max()) <= TOLERANCE, int(error.max(1).values.argmax())


def frames(path):
    """The byte offset of each record's frame in a TFRecord file, and of its data."""
    offsets, lengths = scan_tfrecord(path)
    return [int(o) - 12 for o in offsets], offsets, lengths


def flip(path, at):
    data = bytearray(path.read_bytes())
    data[at] ^= 0x40
    path.write_bytes(bytes(data))


def damaged(path, frame):
    return re.escape(f"The TFRecord file {path} is damaged at the record whose frame starts at byte {frame}")


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    """Real-spec sources (shrunk to a few 8 px JPEGs a class), fabricated once for the module."""
    if not (SPECS / "ilsvrc_2012_dataset_spec.json").is_file():
        pytest.skip(f"the reference's spec files not found in {SPECS}")
    root = tmp_path_factory.mktemp("records")
    for name, per_class in (("aircraft", 4), ("omniglot", 2)):
        fabricate(root, name, per_class)
    return root


# ---------------------------------------------------------------- 1. the writer against an independent reader


def test_records_we_write_are_read_back_by_the_tfrecord_package_and_its_records_by_us(tmp_path):
    images = {(c, i): solid_jpeg(c, i, 8 + i) for c in range(2) for i in range(3)}
    assert write_source(tmp_path, flat_spec("w", [3, 3]), lambda c, i: images[c, i]) == 6
    for c in range(2):
        got = list(tfrecord_loader(str(tmp_path / f"{c}.tfrecords"), None, {"image": "byte", "label": "int"}))
        assert [bytes(r["image"]) for r in got] == [images[c, i] for i in range(3)]
        assert [int(r["label"][0]) for r in got] == [c] * 3
    # negative and large labels, several values, floats: the wire format as protobuf writes it
    write_tfrecord(tmp_path / "odd.tfrecords", [encode_example({"image": [b"x", b"yz"], "label": [-3, 2**40],
                                                                "w": [0.5, -1.25]})])
    (odd,) = tfrecord_loader(str(tmp_path / "odd.tfrecords"), None, {"image": "byte", "label": "int", "w": "float"})
    assert odd["label"].tolist() == [-3, 2**40] and odd["w"].tolist() == [0.5, -1.25]

    theirs = tmp_path / "theirs.tfrecords"
    writer = TFRecordWriter(str(theirs))
    for i in range(4):
        writer.write({"image": (solid_jpeg(7, i), "byte"), "label": (7, "int")})
    writer.close()
    _, offsets, lengths = frames(theirs)
    parsed = [parse_example(read_record(theirs, int(o), int(n))) for o, n in zip(offsets, lengths)]
    assert parsed == [{"image": [solid_jpeg(7, i)], "label": [7]} for i in range(4)]


# ---------------------------------------------------------------- 2-3. the three spec kinds, items hold their records


@needs_specs
@pytest.mark.parametrize("store", ["decoded", "encoded"])
def test_a_flat_source_gives_its_splits_classes_with_labels_and_pixels_as_the_spec_says(trees, store):
    spec = real_spec("aircraft")
    for split, ids in (("val", range(70, 85)), ("train", range(0, 70))):
        ds = MetaDatasetRecords(trees / "aircraft", split, image_size=8, store=store, cache=trees / "cache")
        assert ds.store == store and ds.class_ids == list(ids) and len(ds) == 4 * len(ids)
        assert ds.class_names == [spec["class_names"][str(c)] for c in ids]
        assert ds.labels.tolist() == np.repeat(np.arange(len(ids)), 4).tolist()
        assert_hold_their_records(ds)


@needs_specs
def test_a_split_without_classes_is_a_clear_error(tmp_path):
    write_source(tmp_path / "traffic_sign", real_spec("traffic_sign"), lambda c, i: b"", classes=[])
    with pytest.raises(ValueError, match=r"traffic_sign has no train classes \(Meta-Dataset uses it for test only\)"):
        MetaDatasetRecords(tmp_path / "traffic_sign", "train", image_size=8, cache=tmp_path / "c")


@needs_specs
def test_omniglot_splits_are_their_alphabets_classes_in_order_grouped_by_the_real_alphabets(trees):
    spec = real_spec("omniglot")
    per_super = [int(spec["classes_per_superclass"][str(s)]) for s in range(50)]
    names = [spec["superclass_names"][str(s)] for s in range(50)]
    first_class = np.cumsum([0, *per_super])
    groups = {}
    for split, supers in (("train", range(0, 25)), ("val", range(25, 30)), ("test", range(30, 50))):
        ids = [c for s in supers for c in range(first_class[s], first_class[s + 1])]
        ds = MetaDatasetRecords(trees / "omniglot", split, image_size=8, store="encoded", cache=trees / "cache")
        assert ds.class_ids == ids and ds.class_names == [spec["class_names"][str(c)] for c in ids]
        assert ds.labels.tolist() == np.repeat(np.arange(len(ids)), 2).tolist()
        assert ds.class_groups == [names[s] for s in supers for _ in range(per_super[s])]
        groups[split] = set(ds.class_groups)
        assert_hold_their_records(ds)
    assert len(groups["train"]) == 25 and {"Latin", "Greek", "Tifinagh"} <= groups["train"]
    assert len(groups["test"]) == 20 and "Tengwar" in groups["test"] and not groups["test"] & groups["train"]
    if (OMNIGLOT / "images_background_small1.zip").is_file():  # the real background alphabets: never test classes
        for zip_name in ("images_background_small1.zip", "images_background_small2.zip"):
            with zipfile.ZipFile(OMNIGLOT / zip_name) as z:
                alphabets = {n.split("/")[1] for n in z.namelist() if n.count("/") >= 2}
            assert alphabets and alphabets <= groups["train"] | groups["val"]


def coded_jpeg(class_id, i, size=8):
    """A JPEG whose colour holds ``class_id`` < 4096 (16 levels a channel, 16 grey levels apart), whatever ``i``."""
    levels = [class_id % 16, class_id // 16 % 16, class_id // 256]
    buf = io.BytesIO()
    Image.new("RGB", (size, size), tuple(16 * v + 8 for v in levels)).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def class_of(images):
    """The class id each ``coded_jpeg`` image ``[n, 3, H, W]`` holds."""
    levels = ((images.float().mean((2, 3)) - 8) / 16).round().long()
    return (levels[:, 0] + 16 * levels[:, 1] + 256 * levels[:, 2]).tolist()


def leaves_under(graph):
    """Every node's set of leaves, from the spec's own graph (``{wn_id: [children]}``)."""
    memo = {}

    def walk(node):
        if node not in memo:
            children = graph[node]
            memo[node] = frozenset([node]) if not children else frozenset().union(*map(walk, children))
        return memo[node]

    return {node: walk(node) for node in graph}


@needs_specs
def test_imagenet_splits_are_their_graphs_leaves_and_episodes_draw_under_one_node_of_at_most_392_leaves(tmp_path):
    spec = real_spec("ilsvrc_2012")
    graphs = {s: {n["wn_id"]: n["children_ids"] for n in spec["split_subgraphs"][key]}
              for s, key in (("train", "TRAIN"), ("val", "VALID"), ("test", "TEST"))}
    counts = {s: sum(1 for children in g.values() if not children) for s, g in graphs.items()}
    assert counts == {"train": 712, "val": 158, "test": 130}
    root = tmp_path / "ilsvrc_2012"
    write_source(root, shrunk_spec("ilsvrc_2012", 3), coded_jpeg, classes=range(712 + 158))
    sets = {}
    for split, start in (("train", 0), ("val", 712)):
        ds = MetaDatasetRecords(root, split, image_size=8, store="encoded", cache=tmp_path / "cache")
        ids = list(range(start, start + counts[split]))
        assert ds.class_ids == ids and ds.labels.tolist() == np.repeat(np.arange(len(ids)), 3).tolist()
        assert ds.class_names == [spec["class_names"][str(c)] for c in ids]
        leaves = {wn for wn, children in graphs[split].items() if not children}
        assert set(ds.class_names) == leaves and ds.class_dag == graphs[split]
        sets[split] = ds
    train = sets["train"]
    assert class_of(train.gather(torch.arange(0, len(train), 97))) == [train.class_ids[y] for y in
                                                                         train.labels[::97].tolist()]

    spans = leaves_under(graphs["train"])
    id_of = {spec["class_names"][str(c)]: c for c in train.class_ids}
    eligible = [{id_of[wn] for wn in leaves} for leaves in spans.values() if 5 <= len(leaves) <= 392]

    def episodes(hierarchy):
        dm = EpisodicDataModule(train=train, n_way=None, n_shot=None, n_query=None,
                                variable_episodes=VariableEpisodes(), meta_batch_size=2, train_episodes=20, seed=5,
                                hierarchy=hierarchy)
        dm.trainer = FakeTrainer()
        found = []
        for batch in dm.train_dataloader():
            assert isinstance(batch, RaggedEpisode)
            for t in range(batch.num_tasks):
                task = batch.task(t)
                support, query = class_of(task.support_x), class_of(task.query_x)
                by_label = dict(zip(task.support_y.tolist(), support))
                assert by_label == dict(zip(task.query_y.tolist(), query))  # one class per label, both sets
                found.append(set(support))
        return found

    drawn = episodes(True)
    assert len(drawn) == 20 and max(map(len, drawn)) > 5
    assert all(any(classes <= node for node in eligible) for classes in drawn)
    # the check can fail: flat draws from 712 classes do not stay under one such node
    assert not all(any(classes <= node for node in eligible) for classes in episodes(False))


def pooled_spec(pattern):
    return flat_spec("pools", [{"train": 3, "test": 2}, {"train": 2, "test": 1}, {"train": 1, "test": 1}], (2, 1, 0),
                     pattern)


@pytest.mark.parametrize("pattern", ["{}.tfrecords", "{}_{}.tfrecords"])
def test_a_class_count_given_as_pools_is_their_sum_in_one_file_or_one_file_per_pool(tmp_path, pattern):
    write_source(tmp_path, pooled_spec(pattern), lambda c, i: solid_jpeg(c, i, 8))
    files = sorted(p.name for p in tmp_path.glob("*.tfrecords"))
    if pattern == "{}.tfrecords":
        assert files == ["0.tfrecords", "1.tfrecords", "2.tfrecords"]
    else:
        assert files == ["0_test.tfrecords", "0_train.tfrecords", "1_test.tfrecords", "1_train.tfrecords",
                         "2_test.tfrecords", "2_train.tfrecords"]
        assert len(scan_tfrecord(tmp_path / "0_train.tfrecords")[0]) == 3
    assert MetaDatasetSpec.read(tmp_path / "dataset_spec.json").count(0) == 5
    for store in ("decoded", "encoded"):
        ds = MetaDatasetRecords(tmp_path, "train", image_size=8, store=store, cache=tmp_path / "c")
        assert ds.labels.tolist() == [0] * 5 + [1] * 3 and ds.class_names == ["class0", "class1"]
        assert_hold_their_records(ds)  # items 0..4 of class 0: the train pool's, then the test pool's
    assert MetaDatasetRecords(tmp_path, "val", image_size=8, store="encoded", cache=tmp_path / "c").class_ids == [2]


# ---------------------------------------------------------------- 4. both stores give the same pixels


def noise_image(c, i, fmt, size=(12, 10)):
    rng = np.random.default_rng(100 * c + i)
    if fmt == "PNG":  # grayscale: decoded as 3-channel RGB all the same
        image = Image.fromarray(rng.integers(0, 256, size[::-1], dtype=np.uint8), "L")
    else:
        image = Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8), "RGB")
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


def smooth_jpeg(c, i, size):
    """A JPEG photo-like enough to resize: smooth waves whose phase says which record it is."""
    h, w = size[::-1]
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    rgb = [np.sin(6 * x + c) + np.cos(5 * y + i), np.sin(4 * (x + y) + i), np.cos(7 * x * y + c)]
    image = np.stack([(127.5 + 60 * ch) for ch in rgb], -1).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "JPEG", quality=92)
    return buf.getvalue()


@pytest.mark.parametrize("fmt, size", [("JPEG", (12, 10)), ("PNG", (12, 10)), ("JPEG", (8, 8)), ("JPEG", (40, 36))],
                         ids=["jpeg", "png", "jpeg_at_its_size", "jpeg_5x"])
def test_the_decoded_and_encoded_stores_give_the_same_pixels(tmp_path, fmt, size):
    make = smooth_jpeg if size == (40, 36) else (lambda c, i, size: noise_image(c, i, fmt, size))
    write_source(tmp_path, flat_spec("noise", [3, 4, 2]), lambda c, i: make(c, i, size))
    decoded, encoded = (MetaDatasetRecords(tmp_path, "train", image_size=8, store=store, cache=tmp_path / "c")
                        for store in ("decoded", "encoded"))
    assert (decoded.store, encoded.store) == ("decoded", "encoded")
    everything = torch.arange(len(decoded))
    a, b = decoded.gather(everything), encoded.gather(everything)
    assert a.shape == (9, 3, 8, 8) and torch.equal(a, b) and torch.equal(decoded.labels, encoded.labels)
    assert torch.equal(encoded.gather(torch.tensor([8, 0, 8])), a[[8, 0, 8]])
    image, label = encoded[4]
    assert label == 1 and torch.equal(image, a[4].float() / 255)
    # the record's own image as PIL decodes it at full size, then Lanczos to 8 px (PNG: grey, read as RGB)
    reference = np.array(Image.open(io.BytesIO(make(1, 2, size))).convert("RGB").resize((8, 8), Image.LANCZOS))
    reference = torch.from_numpy(reference).permute(2, 0, 1)
    if fmt == "PNG":
        assert torch.equal(a[:, 0], a[:, 1]) and torch.equal(a[:, 0], a[:, 2])
    if size != (40, 36):  # PNG, JPEGs resized from 12x10, and at their own size (libjpeg-turbo's own pixels): equal
        assert torch.equal(a[5], reference)
    else:  # 5x the target: libjpeg decodes at 1/2 scale first (still 2x the target), then Lanczos: near, not equal
        # (here every image's mean difference is 0.27-0.43 grey levels, max 2; at 1/4 scale, a gap of 1, 0.65-0.82)
        for k, (c, i) in enumerate([(c, i) for c, n in enumerate([3, 4, 2]) for i in range(n)]):
            full = Image.open(io.BytesIO(make(c, i, size))).convert("RGB").resize((8, 8), Image.LANCZOS)
            diff = (a[k].int() - torch.from_numpy(np.array(full)).permute(2, 0, 1).int()).abs()
            assert 0 < diff.float().mean() < 0.6 and diff.max() <= 4, (k, diff.float().mean(), diff.max())


# ---------------------------------------------------------------- 5. damage: named, never skipped


def test_a_flipped_data_byte_is_named_when_read_by_the_encoded_store_and_when_decoded(tmp_path):
    small_source(tmp_path / "src")
    path = tmp_path / "src" / "1.tfrecords"
    starts, offsets, lengths = frames(path)
    flip(path, int(offsets[1] + lengths[1] // 2))
    ds = MetaDatasetRecords(tmp_path / "src", image_size=8, store="encoded", cache=tmp_path / "c")
    assert len(ds) == 9  # not skipped: the record is there, and its read fails
    assert ds.gather(torch.tensor([0, 3, 5, 8])).shape == (4, 3, 8, 8)
    with pytest.raises(ValueError, match=damaged(path, starts[1]) + ": the record's data fails its CRC-32C check"):
        ds.gather(torch.tensor([0, 4]))
    with pytest.raises(ValueError, match=damaged(path, starts[1]) + ".*Restore the file"):
        ds[4]
    with pytest.raises(ValueError, match=damaged(path, starts[1]) + ": the record's data fails its CRC-32C check"):
        MetaDatasetRecords(tmp_path / "src", image_size=8, store="decoded", cache=tmp_path / "c")
    assert not list((tmp_path / "c").glob("*.lmcache*"))  # no decoded cache built from it


def test_a_flipped_length_byte_and_truncated_files_are_named_at_index_time(tmp_path):
    small_source(tmp_path / "src")
    path = tmp_path / "src" / "2.tfrecords"
    starts, offsets, lengths = frames(path)
    good = path.read_bytes()
    flip(path, starts[2] + 1)
    for store in ("encoded", "decoded"):
        with pytest.raises(ValueError, match=damaged(path, starts[2]) + ": the record's length field fails its CRC"):
            MetaDatasetRecords(tmp_path / "src", image_size=8, store=store, cache=tmp_path / "c")
    path.write_bytes(good[:int(offsets[1]) + 10])  # ends inside record 1's data
    with pytest.raises(ValueError, match=damaged(path, starts[1]) + f": the record says it holds {int(lengths[1])} "
                                         r"bytes, but the file ends 10 bytes after its header.*truncated"):
        MetaDatasetRecords(tmp_path / "src", image_size=8, store="encoded", cache=tmp_path / "c")
    path.write_bytes(good[:starts[2] + 5])  # ends inside record 2's header
    with pytest.raises(ValueError, match=damaged(path, starts[2]) + ": the file ends 5 bytes into the record's "
                                                                   "12-byte header"):
        MetaDatasetRecords(tmp_path / "src", image_size=8, store="encoded", cache=tmp_path / "c")


def test_a_file_truncated_after_it_was_indexed_is_named_when_read(tmp_path):
    small_source(tmp_path / "src")
    ds = MetaDatasetRecords(tmp_path / "src", image_size=8, store="encoded", cache=tmp_path / "c")
    path = tmp_path / "src" / "0.tfrecords"
    starts, offsets, _ = frames(path)
    with open(path, "r+b") as f:
        f.truncate(int(offsets[2]) + 3)
    assert ds.gather(torch.tensor([1])).shape == (1, 3, 8, 8)
    with pytest.raises(ValueError, match=damaged(path, starts[2]) + ": the file ends inside the record"):
        ds.gather(torch.tensor([2]))


def test_a_missing_class_file_and_a_count_that_disagrees_with_the_spec_are_named(tmp_path):
    small_source(tmp_path / "src", counts=(3, 2, 3))
    (tmp_path / "src" / "2.tfrecords").unlink()
    with pytest.raises(ValueError, match=f"the class file {re.escape(str(tmp_path / 'src' / '2.tfrecords'))} is "
                                         r"missing \(the spec lists class 2\)"):
        MetaDatasetRecords(tmp_path / "src", image_size=8, store="encoded", cache=tmp_path / "c")
    write_source(tmp_path / "src", flat_spec("tiny", [3, 2, 3]), lambda c, i: solid_jpeg(c, i), classes=[2])
    spec = flat_spec("tiny", [3, 3, 3])  # the spec says 3 where class 1's file holds 2
    (tmp_path / "src" / "dataset_spec.json").write_text(json.dumps(spec))
    for store in ("encoded", "decoded"):
        with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'src' / '1.tfrecords'} holds 2 records, but the "
                                                       "source's dataset_spec.json says class 1 has 3")):
            MetaDatasetRecords(tmp_path / "src", image_size=8, store=store, cache=tmp_path / "c")


def test_a_record_whose_label_is_not_its_files_class_is_named(tmp_path):
    small_source(tmp_path / "src")
    path = tmp_path / "src" / "1.tfrecords"
    write_tfrecord(path, [encode_example({"image": [solid_jpeg(1, i)], "label": [2 if i == 1 else 1]})
                          for i in range(3)])
    starts, _, _ = frames(path)
    ds = MetaDatasetRecords(tmp_path / "src", image_size=8, store="encoded", cache=tmp_path / "c")
    message = re.escape(f"The record whose frame starts at byte {starts[1]} of {path} has label 2, but the file holds "
                        "class 1")
    assert ds.gather(torch.tensor([3, 5])).shape == (2, 3, 8, 8)
    with pytest.raises(ValueError, match=message):
        ds.gather(torch.tensor([4]))
    with pytest.raises(ValueError, match=message):
        MetaDatasetRecords(tmp_path / "src", image_size=8, store="decoded", cache=tmp_path / "c")


def proto_field(number, payload):  # a length-delimited protobuf field (payloads under 128 bytes)
    return bytes([number << 3 | 2, len(payload)]) + payload


@pytest.mark.parametrize("feature, what", [
    (proto_field(2, b"\x0d\x00\x00"), "field 1 is a 4-byte value cut off by the end of its message"),  # FloatList, short
    (b"\x08\x01", "a Feature's field 1 is not a list"),  # a varint where BytesList belongs
], ids=["short_float", "feature_not_a_list"])
def test_a_record_whose_example_is_malformed_is_named_with_its_offset(tmp_path, feature, what):
    small_source(tmp_path / "src")
    path = tmp_path / "src" / "2.tfrecords"
    # Example{Features{entry{"image": feature}}}
    bad = proto_field(1, proto_field(1, proto_field(1, b"image") + proto_field(2, feature)))
    write_tfrecord(path, [encode_example({"image": [solid_jpeg(2, 0)], "label": [2]}), bad,
                          encode_example({"image": [solid_jpeg(2, 2)], "label": [2]})])
    starts, _, _ = frames(path)
    ds = MetaDatasetRecords(tmp_path / "src", image_size=8, store="encoded", cache=tmp_path / "c")
    with pytest.raises(ValueError, match=re.escape(f"{path} is damaged at the record whose frame starts at byte "
                                                   f"{starts[1]}: its data is not a tf.train.Example ({what}")):
        ds.gather(torch.tensor([7]))


def test_a_pure_python_crc32c_is_named_with_its_fix_when_the_reader_loads(monkeypatch):
    import importlib

    import google_crc32c

    import lightning_meta.data.datasets.tfrecord as reader

    monkeypatch.setattr(google_crc32c, "implementation", "python")  # as on a platform without a built wheel
    try:
        with pytest.warns(RuntimeWarning, match=r"pure-Python fallback.*~300x slower.*pip install --force-reinstall"):
            importlib.reload(reader)
    finally:
        monkeypatch.undo()
        importlib.reload(reader)


def test_a_malformed_spec_and_a_folder_without_one_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"holds no dataset_spec.json: pass the folder of one Meta-Dataset source"):
        MetaDatasetRecords(tmp_path, image_size=8, cache=tmp_path / "c")
    spec_file = tmp_path / "dataset_spec.json"
    bad = {"__class__": "ImageNetSpecification"}
    spec_file.write_text(json.dumps(flat_spec("tiny", [2, 2]) | bad))
    with pytest.raises(ValueError, match=re.escape(f"{spec_file} is not a Meta-Dataset dataset_spec.json") +
                       r".*`__class__` is 'ImageNetSpecification', not one of DatasetSpecification"):
        MetaDatasetRecords(tmp_path, image_size=8, cache=tmp_path / "c")
    spec = flat_spec("tiny", [2, 2])
    del spec["class_names"]
    spec_file.write_text(json.dumps(spec))
    with pytest.raises(ValueError, match=re.escape(f"{spec_file} is not a Meta-Dataset") +
                       r".*it has no `class_names` field \(DatasetSpecification has it\)"):
        MetaDatasetRecords(tmp_path, image_size=8, cache=tmp_path / "c")
    spec_file.write_text("{not json")
    with pytest.raises(ValueError, match=r"it is not JSON"):
        MetaDatasetRecords(tmp_path, image_size=8, cache=tmp_path / "c")
    spec_file.write_text(json.dumps(flat_spec("tiny", [2, 2], pattern="{}_{}.tfrecords")))  # shards without pools
    with pytest.raises(ValueError, match=r"tiny: its file_pattern '\{\}_\{\}.tfrecords' splits each class into shards"):
        MetaDatasetRecords(tmp_path, image_size=8, cache=tmp_path / "c")


# ---------------------------------------------------------------- 6. few open files


def test_the_encoded_store_keeps_few_files_open_however_many_classes(tmp_path):
    write_source(tmp_path / "src", flat_spec("many", [2] * 210), lambda c, i: solid_jpeg(c, i, 8))
    proc = os.path.isdir("/proc/self/fd")
    before = len(os.listdir("/proc/self/fd")) if proc else 0
    ds = MetaDatasetRecords(tmp_path / "src", image_size=8, store="encoded", cache=tmp_path / "c", max_open_files=8)
    assert ds.open_files == 0
    for start in range(2):  # every class, twice round: the least recently used file is closed first
        assert ds.gather(torch.arange(start, len(ds), 2)).shape == (210, 3, 8, 8)
    assert ds.open_files == 8
    assert_hold_their_records(ds)
    if proc:
        # +1: the index file's mapping (Python's mmap keeps a duplicate of the descriptor it maps)
        assert len(os.listdir("/proc/self/fd")) - before <= 8 + 1
    if proc:  # a forked DataLoader worker closes its copies of the parent's 8 and opens at most 8 of its own
        worker = torch.utils.data.DataLoader(RecordFdsAfterGather(ds), batch_size=None, num_workers=1)
        assert [list(pair) for pair in worker] == [[8, 8]]
        assert record_fds() == 8  # the parent's own are untouched
        del worker
    del ds
    gc.collect()
    if proc:
        assert len(os.listdir("/proc/self/fd")) <= before  # closed with the dataset


def record_fds():
    """How many descriptors of this process are open on .tfrecords files."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").endswith(".tfrecords")
        except OSError:
            pass
    return count


class RecordFdsAfterGather(torch.utils.data.Dataset):
    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return 1

    def __getitem__(self, i):
        self.ds.gather(torch.arange(len(self.ds)))
        return record_fds(), self.ds.open_files


# ---------------------------------------------------------------- 7. one cache, built once


def listing(folder):
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.iterdir()}


def test_the_index_and_decoded_cache_are_built_once_and_a_rewritten_class_file_gives_new_ones(tmp_path):
    src, cache = small_source(tmp_path / "src"), tmp_path / "c"
    first = MetaDatasetRecords(src, image_size=8, store="decoded", cache=cache)
    assert first.cache_file.built and first.index_file.built
    assert first.cache_file.path.suffix == ".lmcache" and first.index_file.path.suffix == ".lmindex"
    again = MetaDatasetRecords(src, image_size=8, store="decoded", cache=cache)
    assert not again.cache_file.built and not again.index_file.built
    assert (again.cache_file.path, again.index_file.path) == (first.cache_file.path, first.index_file.path)
    encoded = MetaDatasetRecords(src, image_size=8, store="encoded", cache=cache)  # the same index, another store
    assert not encoded.index_file.built and encoded.index_file.path == first.index_file.path
    assert torch.equal(encoded.gather(torch.arange(9)), first.gather(torch.arange(9)))

    path = src / "1.tfrecords"
    path.write_bytes(path.read_bytes())  # the same bytes, rewritten: other sizes or times, another key
    changed = MetaDatasetRecords(src, image_size=8, store="decoded", cache=cache)
    assert changed.cache_file.built and changed.index_file.built
    assert changed.cache_file.path != first.cache_file.path and changed.index_file.path != first.index_file.path
    old = {first.cache_file.path, first.index_file.path}
    del first, again, encoded
    gc.collect()  # nothing maps the old files now
    assert not any(p.name.endswith(".lock") or ".tmp" in p.name for p in cache.iterdir())
    # the decoded store no longer maps its index: only `keep` protects it
    assert set(prune_cache([changed], cache, dry_run=True)) == old
    assert set(prune_cache([changed], cache)) == old
    assert {p.name for p in cache.iterdir()} == {changed.cache_file.path.name, changed.index_file.path.name}
    assert prune_cache([changed], cache) == []
    assert MetaDatasetRecords(src, image_size=8, store="encoded", cache=cache).index_file.built is False


def test_without_a_cache_folder_one_process_keeps_its_indexes_in_one_temporary_folder_removed_at_exit(tmp_path):
    src = small_source(tmp_path / "src")
    script = (
        "import sys, torch\n"
        "from lightning_meta.data import MetaDatasetRecords\n"
        "sets = [MetaDatasetRecords(sys.argv[1], image_size=8, store='encoded', cache=False) for _ in range(3)]\n"
        "assert all(torch.equal(s.gather(torch.arange(9)), sets[0].gather(torch.arange(9))) for s in sets)\n"
        "print('\\n'.join(str(s.index_file.path) for s in sets))\n")
    out = subprocess.run([sys.executable, "-c", script, str(src)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "TMPDIR": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-2000:]
    paths = [Path(line) for line in out.stdout.split()]
    assert len(paths) == 3 and len({p.parent for p in paths}) == 1 and paths[0].parent.parent == tmp_path
    assert not paths[0].parent.exists(), "the process's temporary index folder outlived it"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_two_ddp_ranks_opening_a_source_at_once_build_each_cache_file_once_and_train_on_other_episodes(ddp_runs):
    """tests/ddp_metadataset.py on 2 forked DDP ranks (gloo): one index and one decoded cache for the machine, built
    by one rank while the other waited and mapped it; each rank's stores agree; the ranks draw their own episodes."""
    ranks = [torch.load(ddp_runs / "metadataset" / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert ranks[0]["paths"] == ranks[1]["paths"]
    assert ranks[0]["paths"]["index"] == ranks[0]["paths"]["decoded_index"]  # one index serves both stores
    index_builds = [r["built"]["encoded_index"] + r["built"]["decoded_index"] for r in ranks]
    assert sum(index_builds) == 1, f"the index was built {sum(index_builds)} times"
    assert sum(r["built"]["decoded_cache"] for r in ranks) == 1
    # the other rank started before the builder had finished decoding (about 1,100 images): it waited for the file
    # instead of building its own (the ranks pass a barrier first; the index takes milliseconds, too few to be sure)
    cache_builder = [r["built"]["decoded_cache"] for r in ranks].index(True)
    assert ranks[1 - cache_builder]["times"]["cache"][0] < ranks[cache_builder]["times"]["cache"][1]
    cache = ddp_runs / "md_cache"
    assert sorted(p.suffix for p in cache.iterdir()) == [".lmcache", ".lmindex"], sorted(cache.iterdir())
    assert all(r["same_pixels"] for r in ranks)
    steps = [r["batches"] for r in ranks]
    assert len(steps[0]) == len(steps[1]) == 2
    for (x0, _, _), (x1, _, _) in zip(*steps):
        assert x0.shape != x1.shape or not torch.equal(x0, x1), "both ranks drew the same episode"


def test_a_decoded_source_in_memory_pickles_whole_and_a_relative_root_survives_a_chdir(tmp_path, monkeypatch):
    src = small_source(tmp_path / "src")
    in_memory = MetaDatasetRecords(src, image_size=8, store="decoded", cache=False)
    copy = pickle.loads(pickle.dumps(in_memory))  # (spawned workers, ddp_spawn): the images travel, no file to map
    assert torch.equal(copy.gather(torch.arange(9)), in_memory.gather(torch.arange(9)))
    monkeypatch.chdir(tmp_path)
    relative = MetaDatasetRecords("src", image_size=8, store="encoded", cache=tmp_path / "c")
    absolute = MetaDatasetRecords(src, image_size=8, store="encoded", cache=tmp_path / "c")
    assert relative.index_file.path == absolute.index_file.path and not absolute.index_file.built
    moved = pickle.loads(pickle.dumps(relative))
    monkeypatch.chdir(tmp_path / "c")  # a later working folder (a notebook, Hydra, a worker started elsewhere)
    assert torch.equal(moved.gather(torch.arange(9)), in_memory.gather(torch.arange(9)))
    assert torch.equal(relative.gather(torch.arange(9)), in_memory.gather(torch.arange(9)))
    with pytest.raises(IndexError, match="index 9 is out of range for 9 images"):
        relative.images[9]
    assert torch.equal(relative.images[-1], in_memory.images[-1])


def test_dataloader_workers_and_a_pickled_copy_read_the_same_index_without_rebuilding(tmp_path):
    src, cache = small_source(tmp_path / "src", counts=(4, 3, 5)), tmp_path / "c"
    ds = MetaDatasetRecords(src, image_size=8, store="encoded", cache=cache)
    decoded = MetaDatasetRecords(src, image_size=8, store="decoded", cache=cache)
    files = listing(cache)
    everything = decoded.gather(torch.arange(len(ds)))
    loader = torch.utils.data.DataLoader(ds, batch_size=5, num_workers=2)
    x, y = (torch.cat(parts) for parts in zip(*loader))
    assert torch.equal(x, everything.float() / 255) and torch.equal(y, ds.labels)
    assert ds.open_files == 0  # the workers read the records, not this process
    for original in (ds, decoded):
        copy = pickle.loads(pickle.dumps(original))
        assert copy.store == original.store and copy.index_file.path == original.index_file.path
        assert torch.equal(copy.gather(torch.arange(len(copy))), everything)
        assert copy.class_names == original.class_names and torch.equal(copy.labels, original.labels)
    assert listing(cache) == files  # nothing rebuilt, nothing added


# ---------------------------------------------------------------- 8. resumable


class MidEpochTrainer(FakeTrainer):
    """A trainer stand-in that has taken ``ready`` batches of the current epoch (what a checkpoint records)."""

    def __init__(self, ready, current_epoch):
        super().__init__(current_epoch=current_epoch)
        self.fit_loop = SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=SimpleNamespace(
            current=SimpleNamespace(ready=ready))))


def same(a, b):
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("support_x", "support_y", "query_x", "query_y")) \
        and (a.support_sizes, a.query_sizes, a.ways) == (b.support_sizes, b.query_sizes, b.ways)


@needs_specs
def test_variable_episodes_from_the_encoded_store_resume_mid_epoch_as_the_uninterrupted_run(trees):
    train = MetaDatasetRecords(trees / "aircraft", "train", image_size=8, store="encoded", cache=trees / "cache")

    def module(**kw):
        return EpisodicDataModule(train=train, n_way=None, n_shot=None, n_query=None, seed=7,
                                  variable_episodes=VariableEpisodes(max_way=12), meta_batch_size=2, train_episodes=12,
                                  **kw)

    full = module()
    full.trainer = FakeTrainer(current_epoch=1)
    uninterrupted = list(full.train_dataloader())
    assert len(uninterrupted) == 6 and all(isinstance(b, RaggedEpisode) for b in uninterrupted)
    assert len({b.ways for b in uninterrupted}) > 1  # variable: not one shape throughout

    stopped = module()
    stopped.trainer = MidEpochTrainer(ready=2, current_epoch=1)
    state = stopped.state_dict()
    assert (state["epoch"], state["episodes_done"]) == (1, 4)
    resumed = module(num_workers=2)
    resumed.load_state_dict(state)
    resumed.trainer = FakeTrainer(current_epoch=1)
    rest = list(resumed.train_dataloader())
    assert len(rest) == 4 and all(map(same, rest, uninterrupted[2:]))


# ---------------------------------------------------------------- 9. store="auto"


def test_store_auto_decodes_under_the_limit_keeps_encoded_over_it_uses_a_decoded_cache_there_and_says_why(tmp_path,
                                                                                                      caplog):
    src, cache = small_source(tmp_path / "src"), tmp_path / "c"
    with caplog.at_level(logging.INFO, logger="lightning_meta"):
        tiny = MetaDatasetRecords(src, image_size=8, store="auto", decoded_limit=9 * 3 * 8 * 8 - 1, cache=cache)
        big = MetaDatasetRecords(src, image_size=8, store="auto", decoded_limit=10**9, cache=cache)
        # the decoded cache is there now: every later run (or a rank that decides while another builds it) uses it,
        # whatever the limit or the free space it left
        again = MetaDatasetRecords(src, image_size=8, store="auto", decoded_limit=9 * 3 * 8 * 8 - 1, cache=cache)
    assert (tiny.store, big.store, again.store) == ("encoded", "decoded", "decoded")
    assert big.cache_file.built and not again.cache_file.built and again.cache_file.path == big.cache_file.path
    said = [r.getMessage() for r in caplog.records if "store='auto'" in r.getMessage()]
    assert len(said) == 3
    assert re.search(r"chose the encoded store: .* over the limit .*\(`decoded_limit`=1,727 bytes\).*Pass `store=`",
                     said[0])
    assert re.search(r"MetaDatasetRecords-tiny-train: store='auto' chose the decoded store: decoded, its 9 images of "
                     r"3x8x8 take .* within the limit of .*\(`decoded_limit`=1,000,000,000 bytes\)", said[1])
    assert re.search(r"chose the decoded store: its cache file is already in .*c \(or being built there\)", said[2])
    assert torch.equal(big.gather(torch.arange(9)), tiny.gather(torch.arange(9)))
    assert torch.equal(again.gather(torch.arange(9)), tiny.gather(torch.arange(9)))
    # a build in progress elsewhere (its temporary file; here a killed one's) counts as there: decoded, built here
    name = big.cache_file.path.name
    (tmp_path / "c2").mkdir()
    (tmp_path / "c2" / f"{name}.12345.tmp").write_bytes(b"partial")
    during = MetaDatasetRecords(src, image_size=8, store="auto", decoded_limit=1, cache=tmp_path / "c2")
    assert during.store == "decoded" and during.cache_file.built and during.cache_file.path.name == name
    assert not (tmp_path / "c2" / f"{name}.12345.tmp").exists()
