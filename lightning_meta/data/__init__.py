from lightning_meta.data.datamodule import EpisodicDataModule
from lightning_meta.data.datasets import (
    CachedImageDataset,
    ClassFolder,
    MiniImageNet,
    Omniglot,
    Sinusoid,
    SyntheticGlyphs,
    TensorClassDataset,
)
from lightning_meta.data.episode import Episode, LabelledBatch
from lightning_meta.data.interop import learn2learn_tasksets
from lightning_meta.data.tasks import TaskDistribution
from lightning_meta.data.transforms import RandomAffine, RandomShift

__all__ = ["CachedImageDataset", "ClassFolder", "Episode", "EpisodicDataModule", "LabelledBatch", "MiniImageNet", "Omniglot",
           "RandomAffine", "RandomShift", "Sinusoid", "SyntheticGlyphs", "TaskDistribution", "TensorClassDataset",
           "learn2learn_tasksets"]
