"""Small shared builders for learner tests."""

import lightning as L
import torch

from lightning_meta import Episode, EpisodicDataModule
from lightning_meta.data import Sinusoid, TensorClassDataset


def blobs(num_classes=16, per_class=12, dim=8, seed=0, spread=0.5, prefix="c"):
    """Gaussian blobs: an easy classification source."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(num_classes, dim, generator=g) * 2
    x = centers.repeat_interleave(per_class, 0) + spread * torch.randn(num_classes * per_class, dim, generator=g)
    y = torch.arange(num_classes).repeat_interleave(per_class)
    return TensorClassDataset(x, y, [f"{prefix}{seed}-{i}" for i in range(num_classes)])


def blob_data(n_way=3, meta_batch_size=2, train_episodes=16, **kw):
    args = dict(train=blobs(seed=0), val=blobs(seed=1), test=blobs(seed=2), n_way=n_way, n_shot=2, n_query=3,
                meta_batch_size=meta_batch_size, train_episodes=train_episodes, val_episodes=6, test_episodes=8)
    args.update(kw)
    return EpisodicDataModule(**args)


def sine_data(meta_batch_size=4, train_episodes=40, **kw):
    args = dict(train=Sinusoid(), val=Sinusoid(), test=Sinusoid(), n_way=1, n_shot=10, n_query=10,
                meta_batch_size=meta_batch_size, train_episodes=train_episodes, val_episodes=8, test_episodes=8)
    args.update(kw)
    return EpisodicDataModule(**args)


class FakeTrainer:
    """Stands in for the rank facts of a trainer (the real 2-process DDP run is in test_ddp.py)."""

    def __init__(self, world_size=1, global_rank=0, current_epoch=0):
        self.world_size, self.global_rank, self.current_epoch = world_size, global_rank, current_epoch


def trainer(**kw):
    args = dict(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False)
    args.update(kw)
    return L.Trainer(**args)


def episode(b=2, n=3, k=2, q=3, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Episode(torch.randn(b, n * k, dim, generator=g), torch.arange(n).repeat_interleave(k).repeat(b, 1),
                   torch.randn(b, n * q, dim, generator=g), torch.arange(n).repeat_interleave(q).repeat(b, 1))


def top2_gap(logits):
    """How far each query's top logit leads its runner-up: logits ``[..., N]`` -> ``[...]``."""
    top = logits.topk(2, dim=-1).values
    return top[..., 0] - top[..., 1]


def assert_same_predictions(actual, expected, atol, rtol=0.0):
    """Assert that two float paths' logits ``[..., M, N]`` make the same predictions: close within ``atol + rtol *
    |expected|``, and the same class on every *decided* query, one whose top-2 gap exceeds twice that tolerance in
    either path (a difference of the tolerance cannot flip it). A near-tie flips with the CPU's rounding: accuracies of
    the two paths are only comparable over the decided queries, the mask ``[..., M]`` this returns."""
    actual, expected = actual.detach(), expected.detach()
    if actual.shape != expected.shape:
        raise AssertionError(f"logits of shape {tuple(actual.shape)} and {tuple(expected.shape)}")
    tol = atol + rtol * expected.abs().amax(-1)  # [..., M]
    decided = torch.maximum(top2_gap(actual), top2_gap(expected)) > 2 * tol
    differ = decided & (actual.argmax(-1) != expected.argmax(-1))
    if differ.any():
        where = tuple(differ.nonzero()[0].tolist())
        raise AssertionError(
            f"{int(differ.sum())} decided queries predict different classes, first query {where}: class "
            f"{int(actual[where].argmax())} on one path, {int(expected[where].argmax())} on the other, with top-2 gaps "
            f"{float(top2_gap(actual[where])):.3g} and {float(top2_gap(expected[where])):.3g} > 2 x tolerance")
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)
    return decided
