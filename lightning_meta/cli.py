"""The ``lightning-meta`` command: LightningCLI over every learner and the episodic data module.

    lightning-meta fit --config examples/configs/protonet_glyphs.yaml
    lightning-meta test --config examples/configs/protonet_glyphs.yaml \
        --ckpt_path runs/protonet_glyphs/version_0/checkpoints/last.ckpt
    lightning-meta predict --config examples/configs/protonet_glyphs.yaml \
        --ckpt_path runs/protonet_glyphs/version_0/checkpoints/last.ckpt

``fit`` prints where its checkpoint went: every example config keeps the last one as ``checkpoints/last.ckpt`` in the
run's log folder (``runs/<config name>/version_<n>/``, the first run's above).

``predict`` writes the query outputs of every test episode to ``predictions.pt`` in the run's log folder (or
``--trainer.default_root_dir`` without a logger) and prints where.

Learners (``--model``), backbones and datasets are chosen by class path; ``--print_config`` shows every option.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Optional

import torch
from jsonargparse import Namespace
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lightning_meta import trainer_view
from lightning_meta.checkpoint import read_checkpoint
from lightning_meta.data.checks import as_targets
from lightning_meta.data.datamodule import EpisodicDataModule
from lightning_meta.data.ragged import RaggedEpisode
from lightning_meta.learners.base import MetaLearner


class PredictionWriter(BasePredictionWriter):
    """Writes a predict run's outputs to ``<log dir>/predictions.pt`` (``predictions_rank<R>.pt`` per process under
    DDP), to read back with ``torch.load(path, weights_only=True)``: three lists with an entry per meta-batch, in the
    order run,

    - ``"predictions"``: its query logits ``[B, M, N]`` (for regression, predictions shaped like ``query_y``);
    - ``"query_y"``: its query labels ``[B, M]`` (int64; regression targets as they are), to score them against;
    - ``"batch_indices"``: the indices of its B episodes among the stage's (``0 .. test_episodes - 1``, fixed by the
      data module's seed: the ranks of a DDP run write distinct ones), or Lightning's for other loaders.

    With named test sets (``data.test`` a dict) each is a dict of such lists by set name (a list of them per loader
    for a list of loaders). Scoring a set::

        saved = torch.load("predictions.pt", weights_only=True)
        logits, labels = torch.cat(saved["predictions"]), torch.cat(saved["query_y"])  # [E, M, N], [E, M]
        per_episode = (logits.argmax(-1) == labels).float().mean(1)  # [E]: its mean is `test/acc`

    A ragged meta-batch (:class:`~lightning_meta.data.RaggedEpisode`: variable-way, variable-shot episodes) is saved
    task by task: its ``"predictions"`` entry is a list of its B tasks' own logits ``[M_i, N_i]`` and its ``"query_y"``
    entry a list of their labels ``[M_i]`` (``batch_indices`` as above)::

        tasks = [(l, y) for ls, ys in zip(saved["predictions"], saved["query_y"]) for l, y in zip(ls, ys)]
        per_episode = torch.stack([(l.argmax(-1) == y).float().mean() for l, y in tasks])  # [E]
    """

    def __init__(self) -> None:
        super().__init__(write_interval="epoch")
        self.path: Optional[Path] = None
        self._labels: dict[int, list[Any]] = {}  # per loader, per meta-batch: query_y [B, M] (ragged: [M_i] each)
        self._tasks: dict[int, list[Optional[list[Tensor]]]] = {}  # per loader, per ragged meta-batch: [M_i, N_i] each
        self._indices: dict[int, list[Optional[list[int]]]] = {}  # per loader, per meta-batch: its episodes

    def on_predict_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._labels, self._indices, self._tasks = {}, {}, {}
        trainer_view.known_batch_indices(trainer, [loader for loader in trainer_view.predict_loaders(trainer)
                                                   if callable(_step_indices(loader))])

    def on_predict_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int,
                             dataloader_idx: int = 0) -> None:
        super().on_predict_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        ragged = isinstance(batch, RaggedEpisode)
        labels = as_targets(batch.query_y if ragged else batch[3], "query_y").detach().cpu()
        self._labels.setdefault(dataloader_idx, []).append(list(labels.split(batch.query_sizes)) if ragged else labels)
        tasks = [t.detach().cpu() for t in batch.unpad_outputs(outputs)] if ragged else None  # each task's own cells
        self._tasks.setdefault(dataloader_idx, []).append(tasks)
        # an episode stream knows the episodes of its step (Lightning tracks indices of batch samplers only)
        step_indices = _step_indices(trainer_view.predict_loaders(trainer)[dataloader_idx])
        self._indices.setdefault(dataloader_idx, []).append(step_indices(batch_idx) if callable(step_indices) else None)

    def write_on_epoch_end(self, trainer: Any, pl_module: Any, predictions: Any, batch_indices: Any) -> None:
        root = Path(trainer.log_dir or trainer.default_root_dir)
        root.mkdir(parents=True, exist_ok=True)
        name = f"predictions_rank{trainer.global_rank}.pt" if trainer.world_size > 1 else "predictions.pt"
        self.path = root / name
        n = len(batch_indices)  # Lightning's: a list per loader, empty where it could not tell
        outputs = [[_ragged_or(self._tasks.get(i, []), j, theirs) for j, theirs in enumerate(batches)]
                   for i, batches in enumerate(list(predictions) if n > 1 else [predictions])]
        labels = [self._labels.get(i, []) for i in range(n)]
        indices = [[ours if ours is not None else (theirs[j] if j < len(theirs) else None)
                    for j, ours in enumerate(self._indices.get(i, []))] for i, theirs in enumerate(batch_indices)]
        saved: dict[str, Any] = {"predictions": outputs, "query_y": labels, "batch_indices": indices}
        loaders = trainer.predict_dataloaders
        if isinstance(loaders, dict):  # named sets: by name, in the dict's order (Lightning's dataloader_idx)
            saved = {key: dict(zip(loaders, lists)) for key, lists in saved.items()}
        elif n == 1:
            saved = {key: lists[0] for key, lists in saved.items()}
        torch.save(saved, self.path)


def _ragged_or(tasks: list[Optional[list[Tensor]]], j: int, outputs: Any) -> Any:
    """Meta-batch ``j``'s per-task logits where it was ragged, else its outputs as Lightning kept them."""
    ours = tasks[j] if j < len(tasks) else None
    return outputs if ours is None else ours


def _step_indices(loader: Any) -> Any:
    """An episode stream's ``step -> [its episodes' indices]`` (``EpisodicDataModule``'s loaders), else ``None``."""
    return getattr(getattr(loader, "dataset", None), "step_indices", None)


class MetaCLI(LightningCLI):
    """LightningCLI with learners chosen by class path and the episodic data module's shot/way linked to nothing else:
    every option stays explicit in the config."""

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads `--ckpt_path` itself (for its hyperparameters) before any learner code runs: read it
        # first through read_checkpoint, so a broken file or a refused type is named as the learners name it
        subcommand = self.config.get("subcommand")
        path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if path and Path(path).is_file():
            read_checkpoint(path, map_location="cpu", weights_only=True)
        super()._parse_ckpt_path()

    def instantiate_classes(self) -> None:
        # a dataset that fails to build is one of several lines of jsonargparse's "Does not validate against any of
        # the Union subtypes" (a source is a Dataset or a TaskDistribution): build the sources again, so that the
        # dataset's own error is what the command ends with
        try:
            super().instantiate_classes()
            return
        except ValueError as err:
            failed = err
        subcommand = self.config.get("subcommand")
        data = (self.config.get(subcommand) if subcommand else self.config).get("data")
        module = data if data is not None and "class_path" in data else None  # the data module as a class path
        data = module.get("init_args") if module is not None else data
        cause = _source_error(data) if data is not None else None
        if cause is None and module is not None:  # a subclass that builds its own sources (MetaDatasetDataModule)
            cause = _built_error(module, "data")
        raise failed if cause is None else cause

    def after_fit(self) -> None:
        checkpoint = self.trainer.checkpoint_callback
        last, best = (getattr(checkpoint, name, "") for name in ("last_model_path", "best_model_path"))
        if last or best:
            monitor = getattr(checkpoint, "monitor", None)
            also = f" (best by {monitor}: {Path(best).resolve()})" if monitor and best and best != last else ""
            rank_zero_info(f"Checkpoint written to {Path(last or best).resolve()}{also}")

    def before_predict(self) -> None:
        self.prediction_writer = PredictionWriter()
        self.trainer.callbacks.append(self.prediction_writer)  # type: ignore[attr-defined]

    def after_predict(self) -> None:
        if self.prediction_writer.path is not None:
            rank_zero_info(f"Predictions written to {self.prediction_writer.path}")


def _source_error(data: Namespace) -> Optional[Exception]:
    """The error of the first source of ``data`` (the config's ``data`` section) whose class fails to build, or
    ``None``; the error notes which source it is."""
    for stage in ("train", "val", "test"):
        value = data.get(stage)
        named = value.items() if isinstance(value, dict) else [(stage, value)]
        for name, source in named:
            cause = _built_error(source, f"data.{stage}{'' if name == stage else '.' + name}")
            if cause is not None:
                return cause
    return None


def _built_error(value: Any, key: str) -> Optional[Exception]:
    """The error ``value`` (a ``class_path``/``init_args`` namespace) raises when built, noting the configuration key
    it was built from; ``None`` when it builds."""
    try:
        _build(value)
    except Exception as err:  # whatever the class raises is the user's answer
        note = getattr(err, "add_note", None)
        if callable(note):
            note(f"(building `{key}` of the configuration)")
        return err
    return None


def _build(value: Any) -> Any:
    """Instantiate the ``class_path``/``init_args`` namespaces in ``value``, as jsonargparse would."""
    if isinstance(value, Namespace) and "class_path" in value:
        module, _, name = value["class_path"].rpartition(".")
        init = value.get("init_args")
        return getattr(importlib.import_module(module), name)(**{k: _build(v) for k, v in (vars(init) if init else {}).items()})
    if isinstance(value, Namespace):  # a dataclass's fields (e.g. `variable_episodes`), which take their dict
        return {k: _build(v) for k, v in vars(value).items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_build(v) for v in value)
    return {k: _build(v) for k, v in value.items()} if isinstance(value, dict) else value


def run(args=None) -> MetaCLI:
    """Run the command line ``args`` (default: ``sys.argv``) and return the CLI, whose ``trainer`` and ``model``
    hold the run's results."""
    return MetaCLI(
        MetaLearner,
        EpisodicDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,  # `data:` is EpisodicDataModule's arguments, or a subclass's `class_path`/`init_args`
        args=args,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )


def main(args=None) -> int:
    """The ``lightning-meta`` console script: exit status 0 after a successful run (an error exits non-zero)."""
    run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
