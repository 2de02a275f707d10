"""Pure tensor functions for meta-learning (no Lightning): prototypes, distances, losses, the MAML inner loop."""

from lightning_meta.functional.batched import batched_chain, batched_chain_grads
from lightning_meta.functional.distances import cosine_logits, squared_euclidean
from lightning_meta.functional.episode import episode_accuracy, per_task_loss, target_ndim
from lightning_meta.functional.inner_loop import functional_forward, inner_adapt, inner_adapt_batched, scaled_grad
from lightning_meta.functional.prototypes import class_prototypes

__all__ = ["batched_chain", "batched_chain_grads", "class_prototypes", "cosine_logits", "episode_accuracy",
           "functional_forward", "inner_adapt", "inner_adapt_batched", "per_task_loss", "scaled_grad",
           "squared_euclidean", "target_ndim"]
