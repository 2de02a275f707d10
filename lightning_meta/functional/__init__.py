"""Pure tensor functions for meta-learning (no Lightning): prototypes, distances, losses, the MAML inner loop and
the engine that runs a meta-batch of them."""

from lightning_meta.functional.batched import batched_chain, batched_chain_grads
from lightning_meta.functional.distances import cosine_logits, squared_euclidean
from lightning_meta.functional.engine import Adapted, MetaBatchEngine, Streamed, norms_in_float32
from lightning_meta.functional.episode import episode_accuracy, like_targets, msl_weights, per_task_loss, target_ndim
from lightning_meta.functional.inner_loop import functional_forward, inner_adapt, inner_adapt_batched, scaled_grad
from lightning_meta.functional.prototypes import class_prototypes

__all__ = ["Adapted", "MetaBatchEngine", "Streamed", "batched_chain", "batched_chain_grads", "class_prototypes",
           "cosine_logits", "episode_accuracy", "functional_forward", "inner_adapt", "inner_adapt_batched",
           "like_targets", "msl_weights", "norms_in_float32", "per_task_loss", "scaled_grad", "squared_euclidean", "target_ndim"]
