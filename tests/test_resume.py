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
