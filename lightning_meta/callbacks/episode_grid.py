"""EpisodeGrid: a picture of a few validation episodes with the learner's predictions."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import lightning as L
import torch
from typing_extensions import override

from lightning_meta._checks import check_int
from lightning_meta.callbacks._images import figure_dir, new_figure, save_and_log
from lightning_meta.callbacks._tasks import ValidationTasks
from lightning_meta.data.episode import Episode

if TYPE_CHECKING:
    from lightning_meta.learners.base import MetaLearner


class EpisodeGrid(ValidationTasks):
    """After validation, draw the first ``num_episodes`` validation episodes: the support images with their labels,
    then up to ``max_queries`` queries titled ``predicted/true`` (green when right, red when wrong). Saved as
    ``episodes/epochNNN.png`` next to the logs and logged as the image ``val/episodes`` where the logger takes
    images. Image episodes only (inputs ``[C, H, W]`` with 1 or 3 channels). The list of saved files is the
    callback's state, so it survives a resume.

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

    def keeps(self, batch: Episode) -> bool:
        return not batch.is_regression and batch.support_x.dim() == 5 and batch.support_x.shape[2] in (1, 3)

    @override
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        batch = self.collected(trainer)
        if batch is None:
            return
        was_training = pl_module.training
        pl_module.eval()
        predictions = cast("MetaLearner", pl_module).forward_episode(batch).argmax(-1).cpu()
        pl_module.train(was_training)
        norm = getattr(pl_module, "input_normalization", None)  # images are drawn as they were before normalising
        mean, std = (torch.tensor(v).view(-1, 1, 1) for v in norm) if norm is not None else (0.0, 1.0)
        s, q = batch.support_x.shape[1], min(batch.query_x.shape[1], self.max_queries)
        cols = max(s, q)
        fig = new_figure((1.2 * cols, 2.6 * batch.num_tasks))
        axes = fig.subplots(2 * batch.num_tasks, cols, squeeze=False)
        for e in range(batch.num_tasks):
            for j in range(cols):
                for row, images in enumerate((batch.support_x[e], batch.query_x[e])):
                    ax = axes[2 * e + row, j]
                    ax.axis("off")
                    if j >= (s if row == 0 else q):
                        continue
                    img = (images[j].float().cpu() * std + mean).clamp(0, 1)
                    ax.imshow(img[0] if img.shape[0] == 1 else img.permute(1, 2, 0), cmap="gray")
                    if row == 0:
                        ax.set_title(f"{int(batch.support_y[e, j])}", fontsize=8)
                    else:
                        pred, true = int(predictions[e, j]), int(batch.query_y[e, j])
                        ax.set_title(f"{pred}/{true}", fontsize=8, color="green" if pred == true else "red")
        path = figure_dir(trainer, "episodes") / f"epoch{trainer.current_epoch:03d}.png"
        self.saved.append(str(save_and_log(trainer, fig, path, "val/episodes")))

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"saved": self.saved}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.saved = list(state_dict.get("saved", []))
