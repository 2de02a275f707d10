"""The bad-input catalogue: each row is one distinct mistake a user can make, the error type it must raise, and the
sentence that must name it. Every error is raised at construction, in `setup()` or at the first step: before any
training work is lost."""

from pathlib import Path

import pytest
import torch
from helpers import blob_data, blobs, episode
from PIL import Image

from lightning_meta import ANIL, MAML, AttentionLearner, Episode, EpisodicDataModule, ProtoNet
from lightning_meta.data import ClassFolder, MiniImageNet, Omniglot, Sinusoid, SyntheticGlyphs, TensorClassDataset
from lightning_meta.models import MLP


def folder(tmp: Path, sizes=((8, 8),), bad: bytes | None = None, empty=False) -> Path:
    for c in range(2):
        (tmp / f"c{c}").mkdir(parents=True, exist_ok=True)
        if empty and c == 1:
            continue
        for i, size in enumerate(sizes):
            Image.new("RGB", size).save(tmp / f"c{c}" / f"{i}.png")
    if bad is not None:
        (tmp / "c0" / "broken.png").write_bytes(bad)
    return tmp


def setup_fit(**kw):
    args = dict(train=blobs(seed=0), val=blobs(seed=1), n_way=3, n_shot=2, n_query=3)
    args.update(kw)
    dm = EpisodicDataModule(**args)
    dm.setup("fit")


def step(model, ep):
    model.training_step(ep, 0)


def labelled(x):
    return TensorClassDataset(x, torch.arange(len(x)) % 2)


class NoLabels(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        return torch.zeros(2), 0


def _ep(**changes):
    e = episode()._asdict()
    e.update(changes)
    return Episode(**e)


CATALOGUE = [
    # ---- datasets
    ("omniglot root missing", lambda t: Omniglot(t / "none"), ValueError, r"not found: looked for the folder .*download=True"),
    ("omniglot subset misspelled", lambda t: Omniglot(t, subsets=["images_backgrnd"]), ValueError, "Unknown Omniglot subset 'images_backgrnd'"),
    ("omniglot rotation not a multiple of 90", lambda t: Omniglot(t, rotations=(45,)), ValueError, r"subset of \(0, 90, 180, 270\)"),
    ("omniglot split misspelled", lambda t: Omniglot(t, split="training"), ValueError, r"`split` to be one of \('train', 'val', 'test'\)"),
    ("omniglot split fractions not summing to 1", lambda t: Omniglot(t, split="train", split_fractions=(0.5, 0.1, 0.1)), ValueError, "summing to 1"),
    ("class folder root missing", lambda t: ClassFolder(t / "none"), ValueError, r"ClassFolder root .*none does not exist"),
    ("unreadable image file", lambda t: ClassFolder(folder(t, bad=b"\x89PNG broken")), ValueError, r"Cannot read the image file .*c0/broken.png"),
    ("empty class folder", lambda t: ClassFolder(folder(t, empty=True)), ValueError, r"class folder .*c1 holds no image files"),
    ("images of different sizes", lambda t: ClassFolder(folder(t, sizes=((8, 8), (9, 9)))), ValueError, "pass `image_size`"),
    ("miniimagenet csv missing", lambda t: MiniImageNet(t, "train"), ValueError, r"split file .*train.csv not found"),
    ("tensor dataset length mismatch", lambda t: TensorClassDataset(torch.zeros(3, 2), torch.zeros(2).long()), ValueError, "has 3 items but `y` has 2 labels"),
    ("NaN in a tensor dataset", lambda t: labelled(torch.tensor([[0.0], [float("nan")]])), ValueError, r"NaN or infinite values \(first at item 1\)"),
    ("float labels", lambda t: TensorClassDataset(torch.zeros(2, 1), torch.tensor([0.0, 1.0])), ValueError, "1-D tensor of integer labels"),
    ("class names that do not match the labels", lambda t: TensorClassDataset(torch.zeros(2, 1), torch.tensor([0, 1]), ["a"]), ValueError, "`class_names` has 1 names but `y` has 2 distinct labels"),
    ("glyph split misspelled", lambda t: SyntheticGlyphs("valid"), ValueError, r"`split` to be one of \('train', 'val', 'test'\)"),
    ("zero glyph classes", lambda t: SyntheticGlyphs(num_classes=0), ValueError, "Expected `num_classes` to be an integer >= 1, but got 0"),
    ("inverted sinusoid range", lambda t: Sinusoid(phase=(3.0, 0.0)), ValueError, "Expected `phase` to be a \\(low, high\\) range"),
    # ---- data module
    ("one-way classification", lambda t: setup_fit(n_way=1), ValueError, "Expected `n_way` to be an integer >= 2"),
    ("zero shots", lambda t: setup_fit(n_shot=0), ValueError, "Expected `n_shot` to be an integer >= 1, but got 0"),
    ("fractional meta-batch", lambda t: setup_fit(meta_batch_size=2.5), ValueError, "Expected `meta_batch_size` to be an integer >= 1, but got 2.5"),
    ("classes too small for shot + query", lambda t: setup_fit(n_shot=6, n_query=7), ValueError, r"fewer than n_shot \+ n_query = 6 \+ 7 = 13 items: 'c0-0' \(12 items\)"),
    ("fewer classes than ways", lambda t: setup_fit(n_way=17), ValueError, "has 16 classes, fewer than `n_way`=17"),
    ("train and validation share classes", lambda t: setup_fit(val=blobs(seed=0)), ValueError, r"train and val datasets share 16 classes"),
    ("a dataset without labels", lambda t: setup_fit(train=NoLabels()), TypeError, "does not expose its labels"),
    ("no data at all", lambda t: EpisodicDataModule(), ValueError, "needs at least one of `train`, `val` or `test`"),
    ("fitting without training data", lambda t: setup_fit(train=None), ValueError, r"`trainer.fit` needs training episodes"),
    ("fewer training episodes than one meta-batch", lambda t: setup_fit(meta_batch_size=4, train_episodes=3), ValueError, "smaller than one global meta-batch"),
    ("resuming with another seed", lambda t: blob_data().load_state_dict({"seed": 9, "epoch": 0, "episodes_done": 0}), ValueError, r"seed=9\) but this data module has seed=0"),
    # ---- learners
    ("zero learning rate", lambda t: ProtoNet(MLP(8, (4,)), lr=0), ValueError, "Expected `lr` to be a positive number, but got 0"),
    ("unknown optimizer", lambda t: ProtoNet(MLP(8, (4,)), optimizer="adagrad"), ValueError, "Expected `optimizer` to be one of"),
    ("unknown distance", lambda t: ProtoNet(MLP(8, (4,)), distance="manhattan"), ValueError, "Expected `distance` to be one of"),
    ("negative inner learning rate", lambda t: MAML(MLP(8, (4,), 3), inner_lr=-0.1), ValueError, "Expected `inner_lr` to be a positive number, but got -0.1"),
    ("zero inner steps", lambda t: MAML(MLP(8, (4,), 3), inner_steps=0), ValueError, "Expected `inner_steps` to be an integer >= 1, but got 0"),
    ("ANIL on a backbone without a head", lambda t: ANIL(torch.nn.Linear(8, 3)), ValueError, "ANIL adapts only the head"),
    ("attention width not divisible by heads", lambda t: AttentionLearner(MLP(8, (4,)), dim=30, heads=4), ValueError, r"`dim` \(30\) to be divisible by `heads` \(4\)"),
    ("not a module as backbone", lambda t: ProtoNet("conv4"), TypeError, "Expected `backbone` to be an nn.Module, but got str"),
    # ---- episodes
    ("query label outside the support labels", lambda t: step(ProtoNet(MLP(8, (4,))), _ep(query_y=episode().query_y + 3)), ValueError, "query label .* is outside the support labels"),
    ("empty support set", lambda t: step(ProtoNet(MLP(8, (4,))), _ep(support_x=torch.zeros(2, 0, 8), support_y=torch.zeros(2, 0).long())), ValueError, "support set is empty"),
    ("episode without a meta-batch dimension", lambda t: step(ProtoNet(MLP(8, (4,))), episode().task(0)), ValueError, "with a meta-batch dimension"),
    ("10-way episode into a 5-way head", lambda t: step(MAML(MLP(8, (4,), 5)), episode(n=10)), ValueError, "10-way episode but the model's head has 5 outputs"),
    ("more ways than the attention model's maximum", lambda t: step(AttentionLearner(MLP(8, (4,)), max_way=5, dim=8, heads=2), episode(n=6)), ValueError, "6 classes .* at most max_way=5"),
    ("NaN inputs in an episode", lambda t: step(ProtoNet(MLP(8, (4,))), _ep(support_x=torch.full((2, 6, 8), float("nan")))), ValueError, "support_x contains NaN"),
    ("regression targets into ProtoNet", lambda t: step(ProtoNet(MLP(8, (4,))), _ep(support_y=episode().support_y.float(), query_y=episode().query_y.float())), ValueError, "ProtoNet classifies"),
    ("labels with a gap", lambda t: step(ProtoNet(MLP(8, (4,))), _ep(support_y=episode().support_y * 2, query_y=episode().query_y * 0)), ValueError, "class 1 has no support example"),
    # ---- checkpoints
    ("missing checkpoint", lambda t: ProtoNet.load_from_checkpoint(t / "none.ckpt", backbone=MLP(8, (4,))), FileNotFoundError, r"Checkpoint file not found: .*none.ckpt"),
    ("corrupt checkpoint", lambda t: (t / "x.ckpt").write_bytes(b"junk") and ProtoNet.load_from_checkpoint(t / "x.ckpt", backbone=MLP(8, (4,))), ValueError, r"Cannot load the checkpoint .*x.ckpt: the file is corrupt"),
]


@pytest.mark.parametrize(("what", "make", "error", "message"), CATALOGUE, ids=[row[0] for row in CATALOGUE])
def test_bad_input_gets_a_clear_error(what, make, error, message, tmp_path):
    with pytest.raises(error, match=message):
        make(tmp_path)


def test_the_catalogue_covers_at_least_25_distinct_mistakes():
    assert len({row[0] for row in CATALOGUE}) == len(CATALOGUE) >= 25


def test_a_misspelled_cli_config_key_is_named_in_the_catalogue_too(capsys):
    from test_cli import CONFIGS

    from lightning_meta.cli import main

    with pytest.raises(SystemExit):
        main(["fit", f"--config={CONFIGS / 'protonet_glyphs.yaml'}", "--model.init_args.learning_rate=0.1"])
    assert "learning_rate" in capsys.readouterr().err
