"""EpisodeGrid draws the images a user gave, whatever normalisation the learner applies on the device."""

import lightning as L
import torch
from matplotlib.axes import Axes

from lightning_meta import EpisodicDataModule, ProtoNet
from lightning_meta.callbacks import EpisodeGrid
from lightning_meta.data import SyntheticGlyphs
from lightning_meta.models import Conv4


def test_the_episode_grid_draws_the_images_as_they_were_before_the_learners_normalisation(tmp_path, monkeypatch):
    small = dict(samples_per_class=6, image_size=28)
    data = EpisodicDataModule(SyntheticGlyphs("train", num_classes=8, **small), SyntheticGlyphs("val", num_classes=6, **small),
                              n_way=3, n_shot=2, n_query=2, meta_batch_size=1, train_episodes=2, val_episodes=1)
    drawn = []
    monkeypatch.setattr(Axes, "imshow", lambda self, img, **kw: drawn.append(torch.as_tensor(img).clone()))
    model = ProtoNet(Conv4(hidden=8), normalize=((0.5,), (0.25,)))  # the learner sees (x / 255 - 0.5) / 0.25
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path,
                        callbacks=[EpisodeGrid(num_episodes=1, max_queries=2)])
    trainer.fit(model, data)
    data.setup("validate")
    batch = next(iter(data.val_dataloader()))  # uint8 images [1, M, 1, 28, 28], as the user's data holds them
    support, query = batch.support_x[0], batch.query_x[0][:2]
    # the grid draws column by column: support j, then query j while there are queries
    expected = [x for j in range(len(support)) for x in ([support[j]] + ([query[j]] if j < len(query) else []))]
    assert len(drawn) == len(expected) == 8
    for shown, raw in zip(drawn, expected):
        torch.testing.assert_close(shown, raw[0].float() / 255, atol=1e-6, rtol=0)
