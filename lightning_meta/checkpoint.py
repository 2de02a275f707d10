"""Checkpoint reading with errors that name the file, and the RNG states a resumed run needs."""

from __future__ import annotations

import os
import pickle
import random
import re
from pathlib import Path
from typing import Any, Optional, cast

import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _load as pl_load


def read_checkpoint(path, map_location: Any = None, weights_only: Optional[bool] = None) -> dict:
    """``torch.load`` a checkpoint; a missing, corrupt or truncated file gets an error naming it.

    Example:
        >>> import tempfile, os
        >>> bad = os.path.join(tempfile.mkdtemp(), "last.ckpt")
        >>> _ = open(bad, "wb").write(b"PK\\x03\\x04 truncated")
        >>> read_checkpoint(bad)
        Traceback (most recent call last):
        ...
        ValueError: Cannot load the checkpoint .../last.ckpt: the file is corrupt or truncated ...
    """
    if isinstance(path, (str, Path)) and not Path(path).is_file():
        raise FileNotFoundError(f"Checkpoint file not found: {path}")
    try:
        return pl_load(path, map_location=map_location, weights_only=weights_only)
    except pickle.UnpicklingError as err:
        refused = re.search(r"GLOBAL ([\w.]+)", str(err)) if "weights_only" in str(err).lower() else None
        if refused is None:
            raise _broken(path, err) from err
        name = refused.group(1)
        raise ValueError(
            f"Cannot load the checkpoint {path} with torch.load(weights_only=True): it holds an object of type {name}, "
            f"which weights-only loading refuses (the file is not corrupt). If you trust the file, load it with "
            f"weights_only=False, or allow the type first: torch.serialization.add_safe_globals([{name}])."
        ) from err
    except Exception as err:  # torch.load's errors for broken files: RuntimeError, EOFError...
        raise _broken(path, err) from err


def _broken(path, err: Exception) -> ValueError:
    return ValueError(
        f"Cannot load the checkpoint {path}: the file is corrupt or truncated ({type(err).__name__}: {err}). "
        "Resume from an earlier checkpoint (checkpoints are written atomically, so the previous one is whole)."
    )


class CheckedCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO, reading through :func:`read_checkpoint` so a broken file is named, and writing a
    local file atomically next to its target (a temporary file in the same folder, flushed to disk, then
    ``os.replace``; never a copy from the system's temporary directory, which may be another file system).
    MetaLearner installs it in place of the default."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        if hasattr(os, "O_DIRECTORY"):  # the rename itself survives a power loss
            fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def load_checkpoint(self, path, map_location=lambda storage, loc: storage, weights_only=None) -> dict:
        return read_checkpoint(path, map_location=map_location, weights_only=weights_only)


def base_class_error(checkpoint: dict, path: Any) -> TypeError:
    """The error for ``MetaLearner.load_from_checkpoint``: it names the learner class the checkpoint holds."""
    saved = checkpoint.get("lightning_meta_learner")
    name = saved.rsplit(".", 1)[-1] if saved else None
    return TypeError(
        "MetaLearner is the base class of the learners and cannot be loaded itself: "
        + (f"{path} holds a {name}, so load it with {name}.load_from_checkpoint(path) "
           f"(from {saved.rsplit('.', 1)[0]})." if saved else
           f"load {path} with the learner class that saved it, e.g. MAML.load_from_checkpoint(path) "
           "(MAML, ANIL, MetaSGD, ProtoNet, AttentionLearner or Pretrainer)."))


def saved_backbone_spec(checkpoint: dict, path: Any, learner: str) -> dict:
    """The backbone's recorded spec (see ``models.backbone_spec``), or an error saying to pass the backbone again."""
    spec = checkpoint.get("lightning_meta_backbone")
    if spec is None:
        raise TypeError(
            f"The checkpoint {path} was trained with a backbone that is not one of lightning_meta.models, so it cannot "
            f"be rebuilt from the file: pass it again, e.g. {learner}.load_from_checkpoint(path, backbone=MyNet(...)), "
            "built as for training."
        )
    return spec


def rng_states() -> dict:
    """The global random states a training step may draw from (dropout, user code)."""
    name, keys, pos, has_gauss, gauss = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state())
    # plain types and tensors only, so the checkpoint still loads with torch.load(weights_only=True)
    states = {"torch": torch.get_rng_state(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
              "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    name, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
