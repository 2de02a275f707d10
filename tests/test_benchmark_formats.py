"""The benchmark loaders in their published file layouts (issue #31, items 9 to 12): one channel order from every
tieredImageNet layout, class names read only with their own numbering, Ren et al.'s PNG pickle through the cache,
and the published recipes' normalisation constants."""

import io
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_meta.data import NORMALIZATION, TieredImageNet

NAMES = ["n01", "n02", "n03"]  # sorted, so the folder layout numbers its classes as the pickles do


def rgb_images(n, side=12, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, side, side, 3), dtype=np.uint8)


class Python2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 pickled its ``str`` (BINSTRING, raw), as in Ren et al.'s files; Python 3 at protocol 2
    writes them as latin-1 text instead."""

    def save_bytes(self, obj):
        short = len(obj) < 256
        self.write((pickle.SHORT_BINSTRING + bytes([len(obj)]) if short else pickle.BINSTRING + struct.pack("<i", len(obj)))
                   + obj)
        self.memoize(obj)

    dispatch = dict(pickle._Pickler.dispatch)
    dispatch[bytes] = save_bytes


def python2_pickle(obj):
    buffer = io.BytesIO()
    Python2Pickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


def png_bytes(image):
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def ren_labels(classes, continuing=None):
    """A labels pickle as Ren et al. wrote it (``label_specific`` 0..C-1 with ``label_specific_str`` naming it), with
    MetaOptNet/RFS's ``labels`` (numbering that continues across splits) where ``continuing`` gives its offset."""
    table = {"label_specific": np.asarray(classes, np.int32), "label_specific_str": NAMES[: max(classes) + 1],
             "label_general": np.zeros(len(classes), np.int32), "label_general_str": ["animal"]}
    if continuing is not None:
        table["labels"] = [continuing + c for c in classes]
    return pickle.dumps(table, protocol=2)


def write_ren_layouts(root, rgb, classes, side=12):
    """The same images in the three published layouts: ``.npz`` arrays as cv2 wrote them (BGR), Ren et al.'s pickle
    of PNGs (``cv2.imencode`` writes standard RGB PNGs from BGR arrays; each item a ``uint8 [n, 1]`` array), and a
    folder of RGB PNGs per class."""
    np.savez(root / "npz" / "test_images.npz", images=rgb[..., ::-1])
    (root / "npz" / "test_labels.pkl").write_bytes(ren_labels(classes, continuing=448))
    items = [np.frombuffer(png_bytes(image), np.uint8).reshape(-1, 1) for image in rgb]
    (root / "png" / "test_images_png.pkl").write_bytes(python2_pickle(items))
    (root / "png" / "test_labels.pkl").write_bytes(ren_labels(classes))
    for i, (image, c) in enumerate(zip(rgb, classes)):
        folder = root / "folders" / "test" / NAMES[c]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i:04d}.png")


@pytest.fixture
def layouts(tmp_path):
    for name in ("npz", "png"):
        (tmp_path / name).mkdir()
    rgb, classes = rgb_images(6), [2, 0, 1, 1, 0, 2]
    write_ren_layouts(tmp_path, rgb, classes)
    return tmp_path, rgb, np.asarray(classes)


def by_class(ds):
    return [ds.images[ds.labels == c] for c in range(ds.num_classes)]


# ------------------------------------------------------------------------------------------------ item 9
def test_tiered_imagenet_gives_rgb_from_every_layout_by_default_and_the_published_bgr_on_request(layouts):
    root, rgb, classes = layouts
    expected = [torch.from_numpy(rgb[classes == c]).permute(0, 3, 1, 2) for c in range(3)]
    cache = root / "cache"
    for layout in ("npz", "png", "folders"):
        ds = TieredImageNet(root / layout, "test", image_size=12, cache=cache)
        assert ds.class_names == NAMES, layout
        assert all(torch.equal(a, b) for a, b in zip(by_class(ds), expected)), f"{layout} is not RGB"
        bgr = TieredImageNet(root / layout, "test", image_size=12, cache=cache, channel_order="bgr")
        assert torch.equal(bgr.images, ds.images.flip(1)), layout  # the published loaders' order, reversed
        assert bgr.cache_file.path != ds.cache_file.path  # the channel order is part of the cache key
        again = TieredImageNet(root / layout, "test", image_size=12, cache=cache)
        assert not again.cache_file.built and again.cache_file.path == ds.cache_file.path
        assert torch.equal(TieredImageNet(root / layout, "test", image_size=12, cache=False).images, ds.images)
    # the npz in the published loaders' order is the file's own arrays, as MetaOptNet and RFS read them
    npz = TieredImageNet(root / "npz", "test", image_size=12, cache=False, channel_order="bgr")
    assert torch.equal(npz.images, torch.from_numpy(rgb[..., ::-1].copy()).permute(0, 3, 1, 2))
    with pytest.raises(ValueError, match=r"Expected `channel_order` to be one of \('rgb', 'bgr'\), but got 'RGB'"):
        TieredImageNet(root / "npz", "test", channel_order="RGB")


def test_tiered_imagenet_names_a_missing_split_with_the_layouts_it_looked_for(tmp_path):
    with pytest.raises(ValueError, match=r"tieredImageNet train split not found in .*: expected the folder .*train of "
                                         r"class folders, or train_labels.pkl with train_images.npz or "
                                         r"train_images_png.pkl"):
        TieredImageNet(tmp_path, "train")


# ------------------------------------------------------------------------------------------------ item 10
def write_npz(root, labels_table, n=6):
    np.savez(root / "test_images.npz", images=rgb_images(n))
    (root / "test_labels.pkl").write_bytes(pickle.dumps(labels_table, protocol=2))


def test_class_names_come_from_label_specific_str_only_with_the_label_specific_numbering(tmp_path):
    # MetaOptNet/RFS's `labels` continue across splits (test: 448..607); the names belong to `label_specific`
    write_npz(tmp_path, {"labels": [449, 449, 448, 448, 450, 450], "label_specific": [1, 1, 0, 0, 2, 2],
                         "label_specific_str": ["hen", "tabby", "crane"]})
    ds = TieredImageNet(tmp_path, "test", image_size=12, cache=False)
    assert ds.class_names == ["hen", "tabby", "crane"] and ds.labels.tolist() == [1, 1, 0, 0, 2, 2]


def test_labels_without_their_own_names_are_renumbered_within_the_split_and_named_by_their_original_label(tmp_path):
    # names for another numbering are not applied to `labels` (the old code raised IndexError here)
    write_npz(tmp_path, {"labels": [449, 449, 448, 448, 450, 450], "label_specific_str": ["hen", "tabby", "crane"]})
    ds = TieredImageNet(tmp_path, "test", image_size=12, cache=False)
    assert ds.class_names == ["test/448", "test/449", "test/450"] and ds.labels.tolist() == [1, 1, 0, 0, 2, 2]
    write_npz(tmp_path, {"labels": np.array([3, 3, 1, 1, 9, 9])})  # RFS/MetaOptNet pickles: `labels` only
    ds = TieredImageNet(tmp_path, "test", image_size=12, cache=False)
    assert ds.class_names == ["test/1", "test/3", "test/9"] and ds.labels.tolist() == [1, 1, 0, 0, 2, 2]
    write_npz(tmp_path, {"label_specific": [7, 7, 3, 3, 9, 9], "label_specific_str": {3: "n03", 7: "n07", 9: "n09"}})
    ds = TieredImageNet(tmp_path, "test", image_size=12, cache=False)  # names keyed by label
    assert ds.class_names == ["n03", "n07", "n09"] and ds.labels.tolist() == [1, 1, 0, 0, 2, 2]


def test_labels_files_whose_numberings_disagree_are_refused_with_the_reason(tmp_path):
    write_npz(tmp_path, {"label_specific": [0, 0, 1, 1, 5, 5], "label_specific_str": ["a", "b"]})
    with pytest.raises(ValueError, match=r"`label_specific` has class 5, but `label_specific_str` names 2 classes "
                                         r"\(0\.\.1\)"):
        TieredImageNet(tmp_path, "test", cache=False)
    write_npz(tmp_path, {"labels": [448, 448, 449, 449, 449, 450], "label_specific": [0, 0, 1, 1, 2, 2]})
    with pytest.raises(ValueError, match=r"`labels` and `label_specific` group the images differently"):
        TieredImageNet(tmp_path, "test", cache=False)
    write_npz(tmp_path, {"label_general": [0, 0, 0, 0, 0, 0]})
    with pytest.raises(ValueError, match=r"holds no `labels` or `label_specific` entry \(it has \['label_general'\]\)"):
        TieredImageNet(tmp_path, "test", cache=False)


# ------------------------------------------------------------------------------------------------ item 11
@pytest.mark.parametrize("written_by", ["python2", "python3"])
def test_ren_et_al_png_pickle_is_decoded_in_parallel_once_through_the_cache_without_unpickling_it(
        tmp_path, monkeypatch, written_by):
    n = 256  # enough images for the cache's parallel build (two decode processes)
    rgb, classes = rgb_images(n, side=8, seed=1), np.arange(n) % 4
    if written_by == "python2":  # Ren et al.'s file: cv2.imencode's uint8 [n, 1] arrays, pickled by Python 2
        data = python2_pickle([np.frombuffer(png_bytes(image), np.uint8).reshape(-1, 1) for image in rgb])
    else:
        data = pickle.dumps([png_bytes(image) for image in rgb], protocol=5)
    (tmp_path / "val_images_png.pkl").write_bytes(data)
    (tmp_path / "val_labels.pkl").write_bytes(pickle.dumps({"label_specific": classes,
                                                             "label_specific_str": ["a", "b", "c", "d"]}))
    load = pickle.load

    def refuse_the_images(f, **kwargs):  # the images are read from the mapped file, never unpickled whole
        assert not str(getattr(f, "name", "")).endswith("_png.pkl"), "the PNG pickle was unpickled"
        return load(f, **kwargs)

    monkeypatch.setattr(pickle, "load", refuse_the_images)
    ds = TieredImageNet(tmp_path, "val", image_size=8, cache=tmp_path / "cache", decode_workers=2)
    assert ds.cache_file.built and ds.class_names == ["a", "b", "c", "d"] and ds.labels.tolist() == classes.tolist()
    assert torch.equal(ds.images, torch.from_numpy(rgb).permute(0, 3, 1, 2))
    again = TieredImageNet(tmp_path, "val", image_size=8, cache=tmp_path / "cache", decode_workers=2)
    assert not again.cache_file.built and torch.equal(again.images, ds.images)


def test_a_png_pickle_the_index_cannot_read_is_unpickled_and_a_short_one_is_named(tmp_path):
    rgb = rgb_images(4, side=8)
    # Python 3 at protocol 2 has no bytes opcode: the PNGs are stored as latin-1 text, not as raw bytes
    (tmp_path / "test_images_png.pkl").write_bytes(pickle.dumps([png_bytes(i) for i in rgb], protocol=2))
    (tmp_path / "test_labels.pkl").write_bytes(pickle.dumps({"label_specific": [0, 0, 1, 1]}))
    ds = TieredImageNet(tmp_path, "test", image_size=8, cache=False, channel_order="bgr")
    assert torch.equal(ds.images, torch.from_numpy(rgb[..., ::-1].copy()).permute(0, 3, 1, 2))
    (tmp_path / "test_labels.pkl").write_bytes(pickle.dumps({"label_specific": [0, 0, 1, 1, 1]}))
    with pytest.raises(ValueError, match=r"test_images_png.pkl holds 4 images but .*test_labels.pkl has 5 labels"):
        TieredImageNet(tmp_path, "test", image_size=8, cache=tmp_path / "cache")


# ------------------------------------------------------------------------------------------------ item 12
def test_normalization_constants_are_the_published_recipes_and_reproduce_their_input_tensors(layouts):
    mini = ([120.39586422, 115.59361427, 104.54012653], [70.68188272, 68.27635443, 72.54505529])
    cifar = ([129.37731888, 124.10583864, 112.47758569], [68.20947949, 65.43124043, 70.45866994])
    published = {  # the numbers as their sources write them
        "miniimagenet_metaoptnet": [[x / 255.0 for x in v] for v in mini],
        "tieredimagenet_metaoptnet": [[x / 255.0 for x in v] for v in mini],
        "cifarfs_metaoptnet": [[x / 255.0 for x in v] for v in cifar],
        "fc100_metaoptnet": [[x / 255.0 for x in v] for v in cifar],
        "miniimagenet_rfs": [[x / 255.0 for x in v] for v in mini],
        "tieredimagenet_rfs": [[x / 255.0 for x in v] for v in mini],
        "cifarfs_rfs": [[0.5071, 0.4867, 0.4408], [0.2675, 0.2565, 0.2761]],
        "fc100_rfs": [[0.5071, 0.4867, 0.4408], [0.2675, 0.2565, 0.2761]],
        "miniimagenet_closerlook": [[0.485, 0.456, 0.406], [0.229, 0.224, 0.225]],
        "cub_closerlook": [[0.485, 0.456, 0.406], [0.229, 0.224, 0.225]],
        "tieredimagenet_metabaseline": [[0.485, 0.456, 0.406], [0.229, 0.224, 0.225]],
    }
    assert set(NORMALIZATION) == set(published)
    for key, (mean, std) in published.items():
        assert isinstance(NORMALIZATION[key], tuple) and [list(v) for v in NORMALIZATION[key]] == [mean, std], key
    # RFS's tieredImageNet input: the npz's own (BGR) arrays, ToTensor, Normalize with its constants
    from torchvision import transforms

    root, rgb, _ = layouts
    mean, std = NORMALIZATION["tieredimagenet_rfs"]
    rfs = transforms.Compose([lambda x: Image.fromarray(x), transforms.ToTensor(), transforms.Normalize(mean, std)])
    published_input = torch.stack([rfs(np.ascontiguousarray(image[..., ::-1])) for image in rgb])
    ds = TieredImageNet(root / "npz", "test", image_size=12, cache=False, channel_order="bgr")
    ours = (ds.images.float() / 255 - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    torch.testing.assert_close(ours, published_input, rtol=0, atol=1e-6)
