from lightning_meta.data.datasets.base import CachedImageDataset
from lightning_meta.data.datasets.benchmarks import CIFARFS, CUB, FC100, NORMALIZATION, TieredImageNet
from lightning_meta.data.datasets.folder import ClassFolder
from lightning_meta.data.datasets.glyphs import SyntheticGlyphs
from lightning_meta.data.datasets.huggingface import HuggingFaceImages
from lightning_meta.data.datasets.metadataset import MetaDatasetRecords, MetaDatasetSpec
from lightning_meta.data.datasets.miniimagenet import MiniImageNet
from lightning_meta.data.datasets.omniglot import Omniglot
from lightning_meta.data.datasets.sinusoid import Sinusoid
from lightning_meta.data.datasets.tensor import TensorClassDataset

__all__ = ["CIFARFS", "CUB", "FC100", "NORMALIZATION", "CachedImageDataset", "ClassFolder", "HuggingFaceImages",
           "MetaDatasetRecords", "MetaDatasetSpec", "MiniImageNet", "Omniglot", "Sinusoid", "SyntheticGlyphs",
           "TensorClassDataset", "TieredImageNet"]
