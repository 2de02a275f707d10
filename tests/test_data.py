import http.server
import shutil
import socketserver
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import FakeTrainer
from PIL import Image

from conftest import OMNIGLOT, UNSEEN_ALPHABETS, episode_key, needs_omniglot, toy_dataset
from lightning_meta import Episode, EpisodicDataModule
from lightning_meta.data import ClassFolder, MiniImageNet, Omniglot, Sinusoid, SyntheticGlyphs, TensorClassDataset
from lightning_meta.data.sampler import ClassEpisodeSampler


def make_dm(**kw):
    args = dict(train=toy_dataset(names_prefix="tr"), val=toy_dataset(seed=1, names_prefix="va"), n_way=4, n_shot=2,
                n_query=3, meta_batch_size=2, train_episodes=20, val_episodes=10, seed=7)
    args.update(kw)
    dm = EpisodicDataModule(**args)
    dm.setup("fit")
    return dm


def all_batches(loader):
    return [Episode(*b) for b in loader]


def test_episode_has_disjoint_support_and_query_and_relabelled_classes():
    ds = TensorClassDataset(torch.arange(120).float()[:, None], torch.arange(12).repeat_interleave(10))
    sampler = ClassEpisodeSampler(ds, n_way=5, n_shot=3, n_query=4, seed=0)
    for i in range(50):
        ep = sampler.episode("train", 0, i)
        s_items, q_items = set(ep.support_x[:, 0].long().tolist()), set(ep.query_x[:, 0].long().tolist())
        assert len(s_items) == 15 and len(q_items) == 20 and not s_items & q_items
        assert ep.support_y.tolist() == [c for c in range(5) for _ in range(3)]
        original = ds.labels[ep.support_x[:, 0].long()].view(5, 3)
        assert (original == original[:, :1]).all()  # one original class per label
        assert len(set(original[:, 0].tolist())) == 5  # five distinct classes
        q_original = ds.labels[ep.query_x[:, 0].long()].view(5, 4)
        assert (q_original == original[:, :1]).all()  # queries have their support class's label


def test_class_order_within_episodes_is_random():
    ds = TensorClassDataset(torch.arange(120).float()[:, None], torch.arange(12).repeat_interleave(10))
    sampler = ClassEpisodeSampler(ds, n_way=5, n_shot=1, n_query=1, seed=0)
    firsts = {int(ds.labels[int(sampler.episode("train", 0, i).support_x[0, 0])]) for i in range(40)}
    assert len(firsts) > 5


def test_validation_episodes_are_fixed_across_runs_epochs_and_workers():
    a = all_batches(make_dm().val_dataloader())
    b = all_batches(make_dm(num_workers=2).val_dataloader())
    dm = make_dm()
    dm.trainer = FakeTrainer(current_epoch=3)
    c = all_batches(dm.val_dataloader())
    assert len(a) == 5
    for x, y, z in zip(a, b, c):
        assert torch.equal(x.support_x, y.support_x) and torch.equal(x.query_x, z.query_x)


def test_training_episodes_are_a_pure_function_of_seed_epoch_and_position():
    dm = make_dm()
    dm.trainer = FakeTrainer(current_epoch=0)
    e0 = all_batches(dm.train_dataloader())
    e0_workers = all_batches(make_dm(num_workers=2).train_dataloader())
    dm.trainer = FakeTrainer(current_epoch=1)
    e1 = all_batches(dm.train_dataloader())
    assert len(e0) == 10
    assert all(torch.equal(a.support_x, b.support_x) for a, b in zip(e0, e0_workers))
    assert not torch.equal(e0[0].support_x, e1[0].support_x)
    direct = dm.samplers["train"].batch("train", 1, [6, 7])  # step 3 of epoch 1 is episodes 6 and 7
    assert torch.equal(direct.query_x, e1[3].query_x)
    assert make_dm(seed=8).samplers["train"].batch("train", 1, [6]).support_x.ne(direct.support_x[:1]).any()


def test_ranks_draw_distinct_episodes_whose_union_is_the_single_process_meta_batch():
    ranks = []
    for rank in range(2):
        dm = make_dm(meta_batch_size=2, train_episodes=40)
        dm.trainer = FakeTrainer(world_size=2, global_rank=rank)
        ranks.append(all_batches(dm.train_dataloader()))
    single = all_batches(make_dm(meta_batch_size=4, train_episodes=40).train_dataloader())
    assert len(ranks[0]) == len(ranks[1]) == len(single) == 10
    seen = set()
    for step, whole in enumerate(single):
        union = torch.cat([ranks[0][step].support_x, ranks[1][step].support_x])
        assert torch.equal(union, whole.support_x)
        for task in union:
            key = episode_key(task)
            assert key not in seen
            seen.add(key)


def test_validation_episodes_split_across_ranks_without_overlap_or_loss():
    parts = []
    for rank in range(2):
        dm = make_dm(val_episodes=9, meta_batch_size=2)
        dm.trainer = FakeTrainer(world_size=2, global_rank=rank)
        parts += [t for b in all_batches(dm.val_dataloader()) for t in b.support_x]
    single = [t for b in all_batches(make_dm(val_episodes=9, meta_batch_size=2).val_dataloader()) for t in b.support_x]
    assert len(parts) == len(single) == 9
    assert sorted(map(episode_key, parts)) == sorted(map(episode_key, single))


def test_state_dict_resumes_mid_epoch_at_the_next_unseen_episode():
    dm = make_dm()
    dm.trainer = FakeTrainer(current_epoch=2)
    full = all_batches(dm.train_dataloader())
    resumed = make_dm()
    resumed.load_state_dict({"seed": 7, "epoch": 2, "episodes_done": 6})  # 3 steps of 2 episodes
    resumed.trainer = FakeTrainer(current_epoch=2)
    rest = all_batches(resumed.train_dataloader())
    assert len(rest) == len(full) - 3
    assert all(torch.equal(a.support_x, b.support_x) for a, b in zip(rest, full[3:]))
    again = all_batches(resumed.train_dataloader())  # the next iteration of the same epoch starts from 0 again
    assert len(again) == len(full)


def test_resuming_with_a_different_seed_is_refused():
    dm = make_dm()
    with pytest.raises(ValueError, match=r"trained with EpisodicDataModule\(seed=1\) but this data module has seed=7"):
        dm.load_state_dict({"seed": 1, "epoch": 0, "episodes_done": 0})


def test_training_way_and_shot_override_the_evaluation_values():
    dm = make_dm(train_way=6, train_shot=1, train_query=2)
    train, val = next(iter(dm.train_dataloader())), next(iter(dm.val_dataloader()))
    assert train.support_x.shape == (2, 6, 6) and train.query_x.shape == (2, 12, 6)
    assert val.support_x.shape == (2, 8, 6) and val.query_x.shape == (2, 12, 6)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_way": 1}, r"Expected `n_way` to be an integer >= 2 .* got 1"),
        ({"n_shot": 0}, r"Expected `n_shot` to be an integer >= 1, but got 0"),
        ({"meta_batch_size": 2.5}, r"Expected `meta_batch_size` to be an integer >= 1, but got 2.5"),
        ({"n_way": 13}, r"has 12 classes, fewer than `n_way`=13"),
        ({"n_shot": 5, "n_query": 5}, r"12 classes with fewer than n_shot \+ n_query = 5 \+ 5 = 10 items: 'tr0' \(8 items\)"),
        ({"train_episodes": 1}, r"`train_episodes`=1 is smaller than one global meta-batch"),
    ],
)
def test_bad_data_module_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_dm(**kwargs)


def test_overlapping_splits_are_refused_with_the_shared_classes():
    with pytest.raises(ValueError, match=r"train and val datasets share 12 classes \(e.g. c0, c1"):
        make_dm(train=toy_dataset(names_prefix="c"), val=toy_dataset(seed=3, names_prefix="c"))
    ds = toy_dataset()
    with pytest.raises(ValueError, match="are the same dataset"):
        make_dm(train=ds, val=ds)


def test_dataset_without_labels_gets_an_actionable_error():
    class NoLabels(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.zeros(2), 0

    with pytest.raises(TypeError, match="does not expose its labels.*`labels` attribute"):
        make_dm(train=NoLabels(), val=None)


def test_fit_without_train_data_is_refused():
    dm = EpisodicDataModule(val=toy_dataset(), n_way=3, n_shot=1, n_query=1)
    with pytest.raises(ValueError, match=r"`trainer.fit` needs training episodes"):
        dm.setup("fit")


# ------------------------------------------------------------------ datasets
def test_sinusoid_episodes_follow_the_maml_paper_ranges():
    dm = EpisodicDataModule(train=Sinusoid(), n_way=1, n_shot=10, n_query=5, meta_batch_size=25, train_episodes=50)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch.support_x.shape == (25, 10, 1) and batch.support_y.dtype == torch.float32
    assert batch.is_regression and batch.query_y.shape == (25, 5)
    assert batch.support_x.abs().max() <= 5 and batch.support_y.abs().max() <= 5
    amp = torch.cat([batch.support_y, batch.query_y], 1).abs().max(1).values
    assert amp.max() > 2.0  # amplitudes spread over [0.1, 5]
    with pytest.raises(ValueError, match="low <= high"):
        Sinusoid(amplitude=(5.0, 0.1))


def test_synthetic_glyphs_are_deterministic_and_splits_disjoint():
    a, b = SyntheticGlyphs("val", num_classes=6, samples_per_class=5), SyntheticGlyphs("val", num_classes=6,
                                                                                      samples_per_class=5)
    assert torch.equal(a.images, b.images) and a.images.dtype == torch.uint8
    assert not torch.equal(a.images, SyntheticGlyphs("val", num_classes=6, samples_per_class=5, seed=1).images)
    test = SyntheticGlyphs("test", num_classes=6, samples_per_class=5)
    assert not set(a.class_names) & set(test.class_names)
    # drawings of one glyph are closer to each other than to other glyphs
    # drawings of one glyph resemble each other: leave-one-out 1-NN on raw pixels is far above chance (1/6)
    x = a.images.float().flatten(1)
    d = torch.cdist(x, x) + torch.eye(30) * 1e9
    assert (a.labels[d.argmin(1)] == a.labels).float().mean() > 0.6


def test_tensor_dataset_rejects_mismatched_or_nan_inputs():
    with pytest.raises(ValueError, match="has 3 items but `y` has 2 labels"):
        TensorClassDataset(torch.zeros(3, 2), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="NaN or infinite values \\(first at item 1\\)"):
        TensorClassDataset(torch.tensor([[0.0], [float("nan")]]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="1-D tensor of integer labels"):
        TensorClassDataset(torch.zeros(2, 1), torch.tensor([0.5, 1.0]))


def _write_tree(root: Path, classes: int, per_class: int, size=(10, 12), mode="RGB"):
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
            Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(root / f"class{c}" / f"{i}.png")


def test_class_folder_reads_one_class_per_folder(tmp_path):
    _write_tree(tmp_path / "train", 3, 4)
    ds = ClassFolder(tmp_path / "train")
    assert ds.images.shape == (12, 3, 12, 10) and ds.class_names == ["class0", "class1", "class2"]
    assert ds.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    resized = ClassFolder(tmp_path / "train", image_size=8, mode="L")
    assert resized.images.shape == (12, 1, 8, 8)


def test_class_folder_names_a_corrupt_image_and_a_missing_root(tmp_path):
    _write_tree(tmp_path / "train", 2, 2)
    (tmp_path / "train" / "class1" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"Cannot read the image file .*class1/broken.png"):
        ClassFolder(tmp_path / "train")
    with pytest.raises(ValueError, match=r"ClassFolder root .*nowhere does not exist"):
        ClassFolder(tmp_path / "nowhere")


def test_class_folder_with_mixed_sizes_asks_for_image_size(tmp_path):
    _write_tree(tmp_path / "a", 1, 1, size=(8, 8))
    Image.new("RGB", (9, 9)).save(tmp_path / "a" / "class0" / "big.png")
    with pytest.raises(ValueError, match="pass `image_size`"):
        ClassFolder(tmp_path / "a")


def test_miniimagenet_reads_the_ravi_larochelle_csv_layout(tmp_path):
    (tmp_path / "images").mkdir()
    rows = ["filename,label"]
    for c, wnid in enumerate(["n01", "n02", "n03"]):
        for i in range(3):
            name = f"{wnid}{i:04d}.jpg"
            Image.new("RGB", (30, 20), (c * 80, i * 60, 0)).save(tmp_path / "images" / name)
            rows.append(f"{name},{wnid}")
    (tmp_path / "test.csv").write_text("\n".join(rows) + "\n")
    ds = MiniImageNet(tmp_path, "test", image_size=16)
    assert ds.images.shape == (9, 3, 16, 16) and ds.class_names == ["n01", "n02", "n03"]
    with pytest.raises(ValueError, match=r"split file .*train.csv not found"):
        MiniImageNet(tmp_path, "train")
    (tmp_path / "val.csv").write_text("filename,label\nmissing.jpg,n09\n")
    with pytest.raises(ValueError, match=r"missing.jpg \(listed in .*val.csv\) does not exist"):
        MiniImageNet(tmp_path, "val")


def test_omniglot_missing_root_says_what_was_looked_for_and_how_to_download(tmp_path):
    with pytest.raises(ValueError, match=r"images_background.zip.*download=True"):
        Omniglot(tmp_path)


def _small_omniglot(tmp_path: Path, alphabets=2, chars=3, drawers=20) -> Path:
    """A tiny Omniglot tree in the authors' layout, zipped like the authors' archives."""
    src = tmp_path / "images_background"
    rng = np.random.default_rng(0)
    for a in range(alphabets):
        for c in range(chars):
            d = src / f"Alpha{a}" / f"character{c + 1:02d}"
            d.mkdir(parents=True)
            for k in range(drawers):
                Image.fromarray((rng.random((105, 105)) > 0.5).astype(np.uint8) * 255).convert("1").save(
                    d / f"{a}{c}_{k + 1:02d}.png")
    with zipfile.ZipFile(tmp_path / "images_background.zip", "w") as zf:
        for p in sorted(src.rglob("*")):
            zf.write(p, p.relative_to(tmp_path))
    shutil.rmtree(src)
    return tmp_path


def test_omniglot_rotations_alphabets_and_character_splits(tmp_path):
    root = _small_omniglot(tmp_path, alphabets=2, chars=5)
    ds = Omniglot(root, rotations=(0, 90, 180, 270))
    assert ds.images.shape == (2 * 5 * 20 * 4, 1, 28, 28) and ds.num_classes == 40
    first, rotated = ds.images[ds.labels == 0][0], ds.images[ds.labels == 1][0]
    assert torch.equal(torch.rot90(first, 1, (1, 2)), rotated)
    assert Omniglot(root, alphabets=["Alpha1"]).num_classes == 5
    with pytest.raises(ValueError, match=r"alphabet 'Greek' is not in .* available: \['Alpha0', 'Alpha1'\]"):
        Omniglot(root, alphabets=["Greek"])
    parts = [set(Omniglot(root, split=s, rotations=(0, 90)).class_names) for s in ("train", "val", "test")]
    chars = [{n.rsplit("/", 1)[0] for n in p} for p in parts]
    assert sum(len(c) for c in chars) == 10 and not (chars[0] & chars[1] or chars[0] & chars[2] or chars[1] & chars[2])


def test_omniglot_names_a_corrupt_image_inside_the_zip(tmp_path):
    root = _small_omniglot(tmp_path, alphabets=1, chars=1, drawers=2)
    with zipfile.ZipFile(root / "images_background.zip", "a") as zf:
        zf.writestr("images_background/Alpha0/character01/bad_03.png", b"garbage")
    with pytest.raises(ValueError, match=r"Cannot read the image file .*images_background.zip:.*bad_03.png"):
        Omniglot(root)


class _Quiet(http.server.SimpleHTTPRequestHandler):
    served = 0

    def __init__(self, *a, **kw):
        super().__init__(*a, directory=str(OMNIGLOT), **kw)

    def do_GET(self):
        type(self).served += 1
        if "truncated" in self.path:  # a connection that dies mid-transfer
            self.send_response(200)
            self.send_header("Content-Length", "1000000")
            self.end_headers()
            self.wfile.write(b"PK" * 1000)
            return
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture
def omniglot_server():
    with socketserver.TCPServer(("127.0.0.1", 0), _Quiet) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}/"
        finally:
            server.shutdown()


@needs_omniglot
def test_omniglot_download_happens_in_prepare_data_and_reads_the_verified_zip(tmp_path, omniglot_server):
    root = tmp_path / "data"
    _Quiet.served = 0
    ds = Omniglot(root, subsets=["images_background_small1"], alphabets=["Greek"], download=True, url=omniglot_server)
    assert _Quiet.served == 0 and not root.exists()  # construction (on every DDP rank) fetches nothing
    dm = EpisodicDataModule(train=ds, n_way=5, n_shot=1, n_query=1, meta_batch_size=2)
    dm.prepare_data()  # Lightning: once, on one process
    assert _Quiet.served == 1 and sorted(p.name for p in root.iterdir()) == ["images_background_small1.zip"]
    dm.setup("fit")  # every process reads
    assert ds.num_classes == 24 and len(ds) == 480
    again = Omniglot(root, subsets=["images_background_small1"], alphabets=["Greek"], download=True, url=omniglot_server)
    assert len(again) == 480 and _Quiet.served == 1  # a dataset used on its own loads on first use; no refetch


@needs_omniglot
def test_omniglot_failed_downloads_leave_no_partial_file(tmp_path, omniglot_server):
    for subset, error in (("images_evaluation", "Could not download Omniglot"),
                          ("images_background", "Could not download Omniglot|is corrupt")):
        root = tmp_path / subset
        url = omniglot_server + ("truncated/" if subset == "images_background" else "")
        with pytest.raises(RuntimeError, match=error):
            len(Omniglot(root, subsets=[subset], download=True, url=url))
        assert list(root.iterdir()) == []  # no .part file, no zip under the real name


@needs_omniglot
def test_omniglot_reads_the_whole_zip_even_beside_a_partly_extracted_folder(tmp_path):
    shutil.copy(OMNIGLOT / "images_background_small1.zip", tmp_path)
    partial = tmp_path / "images_background_small1" / "Greek" / "character01"
    partial.mkdir(parents=True)  # what an extraction killed early leaves behind
    with zipfile.ZipFile(tmp_path / "images_background_small1.zip") as zf:
        member = next(n for n in zf.namelist() if "/Greek/character01/" in n and n.endswith(".png"))
        (partial / Path(member).name).write_bytes(zf.read(member))
    ds = Omniglot(tmp_path, subsets=["images_background_small1"])
    assert ds.num_classes == 136 and len(ds) == 2720


@needs_omniglot
def test_real_omniglot_small_splits_load_with_disjoint_alphabets():
    train = Omniglot(OMNIGLOT, subsets=["images_background_small1"], rotations=(0, 90, 180, 270))
    # small1 and small2 share the Greek and Latin alphabets: the data module refuses the overlap
    with pytest.raises(ValueError, match=r"share 50 classes \(e.g. Greek/character01/rot0"):
        EpisodicDataModule(train=train, test=Omniglot(OMNIGLOT, subsets=["images_background_small2"]),
                           test_episodes=4).setup("test")
    test = Omniglot(OMNIGLOT, subsets=["images_background_small2"], alphabets=UNSEEN_ALPHABETS)
    assert train.num_classes == 136 * 4 and len(train) == 2720 * 4
    assert test.num_classes == 47 + 42 + 17 and len(test) == 20 * test.num_classes
    assert train.images.dtype == torch.uint8 and train.images.shape[1:] == (1, 28, 28)
    assert train.images.float().mean() < 60  # strokes bright on a dark background
    dm = EpisodicDataModule(train=train, test=test, n_way=20, n_shot=1, n_query=15, test_episodes=4)
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()))
    assert batch.support_x.shape == (1, 20, 1, 28, 28) and batch.query_y.shape == (1, 300)


def test_random_shift_translates_each_image_by_at_most_the_bound_and_is_seeded():
    from lightning_meta.data import RandomShift

    x = torch.zeros(2, 50, 1, 11, 11)
    x[..., 5, 5] = 1.0  # one lit pixel in the middle of every image
    out = RandomShift(2)(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and torch.equal(out.sum((-1, -2)), x.sum((-1, -2)))  # moved, never lost
    where = out.flatten(0, 2).flatten(1).argmax(1)
    dy, dx = where // 11 - 5, where % 11 - 5
    assert dy.abs().max() == 2 and dx.abs().max() == 2 and len(set(zip(dy.tolist(), dx.tolist()))) > 15
    assert torch.equal(out, RandomShift(2)(x, torch.Generator().manual_seed(0)))
    assert not torch.equal(out, RandomShift(2)(x, torch.Generator().manual_seed(1)))
    assert torch.equal(RandomShift(0)(x, torch.Generator()), x)
    with pytest.raises(ValueError, match=r"RandomShift needs images \[..., C, H, W\], but the episode inputs have "
                                         r"shape \(4, 10\)"):
        RandomShift(2)(torch.zeros(4, 10), torch.Generator())
    with pytest.raises(ValueError, match="Expected `max_shift` to be an integer >= 0, but got -1"):
        RandomShift(-1)


def test_random_affine_distorts_each_image_within_its_bounds_and_is_seeded():
    from lightning_meta.data import RandomAffine

    x = torch.zeros(2, 40, 1, 28, 28)
    x[..., 10:18, 12:16] = 1.0  # a bar in the middle of every image
    out = RandomAffine(degrees=15, translate=0.1, scale=0.1, shear=10)(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and 0 <= out.min() and out.max() <= 1 + 1e-6
    flat = out.flatten(0, 2)
    assert len({tuple(img.flatten().round(decimals=3).tolist()) for img in flat}) == 80  # each image its own draw
    mass = flat.sum((1, 2))
    assert ((mass / 32 - 1).abs() < 0.35).all()  # scale within 0.9..1.1: the bar's area changes by at most ~21%
    cy = (flat.sum(2) * torch.arange(28.0)).sum(1) / mass  # the bar's centre moves by at most ~3 px (+ rotation)
    assert ((cy - 13.5).abs() < 5).all() and (cy - 13.5).abs().max() > 0.5
    assert torch.equal(out, RandomAffine(degrees=15, translate=0.1, scale=0.1, shear=10)(
        x, torch.Generator().manual_seed(0)))
    identity = RandomAffine(degrees=0, translate=0, scale=0, shear=0)(x, torch.Generator().manual_seed(0))
    torch.testing.assert_close(identity, x, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"RandomAffine needs images \[..., C, H, W\]"):
        RandomAffine()(torch.zeros(4, 10), torch.Generator())
    with pytest.raises(ValueError, match=r"Expected `degrees` to be a number >= 0, but got -5"):
        RandomAffine(degrees=-5)
    with pytest.raises(ValueError, match=r"Expected `scale` to be below 1"):
        RandomAffine(scale=1.5)


@pytest.mark.parametrize("transform", ["shift", "affine"])
def test_train_transform_augments_training_episodes_reproducibly_and_never_evaluation(transform):
    from lightning_meta.data import RandomAffine, RandomShift

    make = (lambda: RandomShift(3)) if transform == "shift" else (lambda: RandomAffine())  # noqa: E731

    def data(transform, workers=0):
        dm = EpisodicDataModule(train=SyntheticGlyphs("train", num_classes=10, samples_per_class=4),
                                val=SyntheticGlyphs("val", num_classes=6, samples_per_class=4), n_way=3, n_shot=1,
                                n_query=2, meta_batch_size=2, train_episodes=8, val_episodes=4, seed=3,
                                num_workers=workers, train_transform=transform)
        dm.setup("fit")
        return [b for b in dm.train_dataloader()], [b for b in dm.val_dataloader()]

    plain_train, plain_val = data(None)
    train, val = data(make())
    again, _ = data(make(), workers=2)
    for p, a, b in zip(plain_train, train, again):
        assert torch.equal(p.support_y, a.support_y) and not torch.equal(p.support_x, a.support_x)  # same episodes, shifted
        assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_x, b.query_x)  # pure function of position
    for p, a in zip(plain_val, val):
        assert torch.equal(p.support_x, a.support_x) and torch.equal(p.query_x, a.query_x)
    with pytest.raises(TypeError, match=r"`train_transform` must be a callable \(x, generator\) -> x such as "
                                        r"RandomShift\(3\), but got int"):
        EpisodicDataModule(train=SyntheticGlyphs("train"), train_transform=3)
