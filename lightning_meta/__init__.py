"""lightning-meta: meta-learning that trains like any other Lightning model."""

from lightning_meta.data import (
    Episode,
    EpisodicDataModule,
    LabelledBatch,
    MetaDatasetDataModule,
    RaggedEpisode,
    VariableEpisodes,
)
from lightning_meta.learners import ANIL, MAML, AttentionLearner, MetaLearner, MetaSGD, Pretrainer, ProtoNet
from lightning_meta.metrics import EpisodeAccuracy, EpisodeMean, EpisodeMSE

__version__ = "0.1.0"
__all__ = ["ANIL", "MAML", "AttentionLearner", "Episode", "EpisodeAccuracy", "EpisodeMSE", "EpisodeMean",
           "EpisodicDataModule", "LabelledBatch", "MetaDatasetDataModule", "MetaLearner", "MetaSGD", "Pretrainer",
           "ProtoNet", "RaggedEpisode", "VariableEpisodes"]
