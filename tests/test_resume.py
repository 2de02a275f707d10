"""A run stopped mid-epoch and resumed from its checkpoint sees the same episodes and ends with the same weights."""

import lightning as L
import torch
from helpers import blob_data
from lightning.pytorch.callbacks import ModelCheckpoint

from conftest import episode_key
from lightning_meta import ProtoNet
from lightning_meta.models import MLP


class EpisodeLog(L.Callback):
    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.seen.append((trainer.current_epoch, batch_idx, [episode_key(t) for t in batch.support_x]))


def fit(tmp_path, ckpt_path=None, max_steps=-1, max_epochs=3):
    L.seed_everything(0, verbose=False)
    model = ProtoNet(MLP(8, (16,)), lr=1e-2)
    log = EpisodeLog()
    saver = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_last=True, save_top_k=0)
    trainer = L.Trainer(max_epochs=max_epochs, max_steps=max_steps, callbacks=[log, saver], logger=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(model, blob_data(meta_batch_size=2, train_episodes=16), ckpt_path=ckpt_path)
    return model, log.seen


def test_resumed_run_sees_the_remaining_episodes_and_matches_an_uninterrupted_run(tmp_path):
    full_model, full = fit(tmp_path / "full")
    assert len(full) == 24  # 3 epochs x 8 steps
    _, first = fit(tmp_path / "cut", max_steps=11)  # stops after step 3 of epoch 1
    assert first == full[:11]
    resumed_model, rest = fit(tmp_path / "resumed", ckpt_path=tmp_path / "cut" / "last.ckpt")
    assert rest == full[11:]
    for a, b in zip(full_model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)


def test_a_run_resumed_from_an_end_of_epoch_checkpoint_continues_with_the_next_epoch(tmp_path):
    full_model, full = fit(tmp_path / "full")
    _, first = fit(tmp_path / "cut", max_epochs=1)  # last.ckpt written at the end of epoch 0
    resumed_model, rest = fit(tmp_path / "resumed", ckpt_path=tmp_path / "cut" / "last.ckpt")
    assert first + rest == full
    assert all(torch.equal(a, b) for a, b in zip(full_model.parameters(), resumed_model.parameters()))


def test_a_resumed_run_with_image_augmentation_matches_an_uninterrupted_run(tmp_path):
    # the augmentation of each training episode is a pure function of (seed, epoch, position): resuming mid-epoch
    # draws the same distortions as the uninterrupted run, so the weights end bit-identical
    from lightning_meta.data import RandomAffine, TensorClassDataset
    from lightning_meta.models import Conv4

    g = torch.Generator().manual_seed(0)
    images = TensorClassDataset(torch.rand(72, 1, 16, 16, generator=g), torch.arange(12).repeat_interleave(6))

    def run(directory, ckpt_path=None, max_steps=-1):
        L.seed_everything(0, verbose=False)
        model = ProtoNet(Conv4(hidden=8, image_size=16), lr=1e-2)
        saver = ModelCheckpoint(dirpath=directory, every_n_train_steps=1, save_last=True, save_top_k=0)
        trainer = L.Trainer(max_epochs=2, max_steps=max_steps, callbacks=[saver], logger=False, enable_progress_bar=False,
                            enable_model_summary=False, limit_val_batches=0)
        dm = blob_data(train=images, val=None, test=None, meta_batch_size=2, train_episodes=8,
                       train_transform=RandomAffine(degrees=20, translate=0.1))
        trainer.fit(model, dm, ckpt_path=ckpt_path)
        return model

    full = run(tmp_path / "full")
    run(tmp_path / "cut", max_steps=5)  # stops after step 1 of epoch 1
    resumed = run(tmp_path / "resumed", ckpt_path=tmp_path / "cut" / "last.ckpt")
    assert all(torch.equal(a, b) for a, b in zip(full.parameters(), resumed.parameters()))
