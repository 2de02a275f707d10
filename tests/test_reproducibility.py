"""Same seed, same config: identical results across runs and worker counts (1 vs 2 DDP processes: test_ddp.py)."""

import lightning as L
import pytest
import torch
from helpers import blob_data

from lightning_meta import MAML, AttentionLearner, ProtoNet
from lightning_meta.models import MLP

BUILDERS = {
    "protonet": lambda: ProtoNet(MLP(8, (16,)), lr=3e-3),
    "maml": lambda: MAML(MLP(8, (16,), 3), inner_lr=0.3, inner_steps=2),
    "attention": lambda: AttentionLearner(MLP(8, (16,)), max_way=5, dim=16, heads=2, dropout=0.1),
}


def run(learner, num_workers=0):
    L.seed_everything(0, verbose=False)
    model = BUILDERS[learner]()
    trainer = L.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    data = blob_data(meta_batch_size=2, train_episodes=16, val_episodes=6, num_workers=num_workers)
    trainer.fit(model, data)
    metrics = dict(trainer.callback_metrics)
    metrics.update(trainer.test(model, data, verbose=False)[0])
    return [p.detach().clone() for p in model.parameters()], {k: float(v) for k, v in metrics.items()}


@pytest.mark.parametrize("learner", sorted(BUILDERS))
def test_two_runs_with_the_same_seed_give_identical_weights_and_metrics(learner):
    (w1, m1), (w2, m2) = run(learner), run(learner)
    assert all(torch.equal(a, b) for a, b in zip(w1, w2))
    assert m1 == m2 and {"val/acc", "test/acc", "test/acc_ci95"} <= set(m1)


def test_the_number_of_dataloader_workers_does_not_change_the_result():
    (w0, m0), (w2, m2) = run("protonet", num_workers=0), run("protonet", num_workers=2)
    assert all(torch.equal(a, b) for a, b in zip(w0, w2)) and m0 == m2
