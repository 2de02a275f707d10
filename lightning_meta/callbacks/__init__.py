from lightning_meta.callbacks.adaptation_curve import AdaptationCurve
from lightning_meta.callbacks.episode_grid import EpisodeGrid

__all__ = ["AdaptationCurve", "EpisodeGrid"]
