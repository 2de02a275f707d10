"""EpisodeGrid: a picture of a few validation episodes with the learner's predictions."""

from __future__ import annotations

from typing import Any, Union, cast

import lightning as L
import torch
from typing_extensions import override

from lightning_meta._checks import check_int
from lightning_meta.callbacks._images import figure_dir, new_figure, save_and_log
from lightning_meta.callbacks._tasks import ValidationTasks, example_shape, task_outputs
from lightning_meta.data.episode import Episode
from lightning_meta.data.ragged import RaggedEpisode


class EpisodeGrid(ValidationTasks):
    """After validation, draw the first ``num_episodes`` validation episodes: the support images with their labels,
    then up to ``max_queries`` queries titled ``predicted/true`` (green when right, red when wrong). Saved as
    ``episodes/epochNNN.png`` next to the logs and logged as the image ``val/episodes`` where the logger takes
    images. Image episodes only (inputs ``[C, H, W]`` with 1 or 3 channels). Variable-way, variable-shot episodes
    (:class:`~lightning_meta.data.RaggedEpisode` meta-batches) are drawn task by task, each row as long as its own
    support set. The list of saved files is the callback's state, so it survives a resume.

    Example:
        >>> EpisodeGrid(num_episodes=1).state_dict()
        {'saved': []}
    """

    def __init__(self, num_episodes: int = 2, max_queries: int = 10, every_n_epochs: int = 1) -> None:
        for name, value in (("num_episodes", num_episodes), ("max_queries", max_queries),
                            ("every_n_epochs", every_n_epochs)):
            check_int(name, value, 1)
        super().__init__()
        self.num_episodes, self.max_queries, self.every_n_epochs = num_episodes, max_queries, every_n_epochs
        self.saved: list[str] = []

    def keeps(self, batch: Union[Episode, RaggedEpisode]) -> bool:
        shape = example_shape(batch)
        return not batch.is_regression and len(shape) == 3 and shape[0] in (1, 3)

    @override
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        batch = self.collected(trainer)
        if batch is None:
            return
        was_training = pl_module.training
        pl_module.eval()
        outputs = cast(Any, pl_module).forward_episode(batch)  # a MetaLearner
        pl_module.train(was_training)
        predictions = [o.argmax(-1).cpu() for o in task_outputs(batch, outputs)]  # [M_i] per task
        tasks = [batch.task(e) for e in range(batch.num_tasks)]
        norm = getattr(pl_module, "input_normalization", None)  # images are drawn as they were before normalising
        mean, std = (torch.tensor(v).view(-1, 1, 1) for v in norm) if norm is not None else (0.0, 1.0)
        cols = max(max(len(t.support_y), min(len(t.query_y), self.max_queries)) for t in tasks)
        fig = new_figure((1.2 * cols, 2.6 * batch.num_tasks))
        axes = fig.subplots(2 * batch.num_tasks, cols, squeeze=False)
        for e, task in enumerate(tasks):
            s, q = len(task.support_y), min(len(task.query_y), self.max_queries)
            for j in range(cols):
                for row, images in enumerate((task.support_x, task.query_x)):
                    ax = axes[2 * e + row, j]
                    ax.axis("off")
                    if j >= (s if row == 0 else q):
                        continue
                    img = (images[j].float().cpu() * std + mean).clamp(0, 1)
                    ax.imshow(img[0] if img.shape[0] == 1 else img.permute(1, 2, 0), cmap="gray")
                    if row == 0:
                        ax.set_title(f"{int(task.support_y[j])}", fontsize=8)
                    else:
                        pred, true = int(predictions[e][j]), int(task.query_y[j])
                        ax.set_title(f"{pred}/{true}", fontsize=8, color="green" if pred == true else "red")
        path = figure_dir(trainer, "episodes") / f"epoch{trainer.current_epoch:03d}.png"
        self.saved.append(str(save_and_log(trainer, fig, path, "val/episodes")))

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"saved": self.saved}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.saved = list(state_dict.get("saved", []))
