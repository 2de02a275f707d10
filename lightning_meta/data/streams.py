"""Stream names and the episode random generator: the leaf every episode source draws from."""

from __future__ import annotations

import numpy as np

STREAMS = {"train": 0, "val": 1, "test": 2}


def episode_rng(seed: int, stream: str, epoch: int, index: int) -> np.random.Generator:
    """The random generator of one episode: a pure function of its coordinates.

    A counter-based Philox generator keyed by the seed, whose counter starts at ``(0, epoch, stream, index)``: drawing
    only advances the lowest counter word, so two episodes' streams never overlap, and creating one is cheap.
    """
    seed = int(seed)
    key = [seed & 0xFFFFFFFFFFFFFFFF, (seed >> 64) & 0xFFFFFFFFFFFFFFFF]
    return np.random.Generator(np.random.Philox(key=key, counter=[0, int(epoch), STREAMS[stream], int(index)]))
