from lightning_meta.data.datamodule import EpisodicDataModule
from lightning_meta.data.datasets import (
    CIFARFS,
    CUB,
    FC100,
    NORMALIZATION,
    CachedImageDataset,
    ClassFolder,
    HuggingFaceImages,
    MetaDatasetRecords,
    MetaDatasetSpec,
    MiniImageNet,
    Omniglot,
    Sinusoid,
    SyntheticGlyphs,
    TensorClassDataset,
    TieredImageNet,
)
from lightning_meta.data.datasets.cache import prune_cache
from lightning_meta.data.episode import Episode, LabelledBatch
from lightning_meta.data.interop import learn2learn_tasksets
from lightning_meta.data.metadataset_module import MetaDatasetDataModule
from lightning_meta.data.ragged import RaggedEpisode
from lightning_meta.data.tasks import TaskDistribution
from lightning_meta.data.transforms import RandomAffine, RandomShift
from lightning_meta.data.variable import EpisodePlan, VariableEpisodePlanner, VariableEpisodes

__all__ = ["CIFARFS", "CUB", "FC100", "NORMALIZATION", "CachedImageDataset", "ClassFolder", "Episode",
           "EpisodicDataModule", "HuggingFaceImages", "LabelledBatch", "MetaDatasetDataModule", "MetaDatasetRecords",
           "MetaDatasetSpec", "MiniImageNet", "Omniglot", "RaggedEpisode", "RandomAffine", "RandomShift", "Sinusoid",
           "SyntheticGlyphs", "TaskDistribution", "TensorClassDataset", "TieredImageNet", "EpisodePlan",
           "VariableEpisodePlanner", "VariableEpisodes", "learn2learn_tasksets", "prune_cache"]
