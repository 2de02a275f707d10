"""Variable episodes end to end: every learner fits and tests on variable-way, variable-shot episodes from two sources
in a plain Trainer, with named validation sets and their mean, and under real 2-process DDP (tests/ddp_variable.py, on
the ranks of the suite's one DDP launch)."""

import pytest
import torch
from helpers import blobs, trainer

from lightning_meta import ANIL, MAML, AttentionLearner, EpisodicDataModule, MetaSGD, Pretrainer, ProtoNet, RaggedEpisode
from lightning_meta.data import VariableEpisodes
from lightning_meta.models import MLP

RULES = VariableEpisodes(min_way=3, max_way=6, max_query=3, max_support=20, max_support_per_class=5)
LEARNERS = {
    "protonet": lambda: ProtoNet(MLP(8, (16,)), lr=3e-3),
    "attention": lambda: AttentionLearner(MLP(8, (16,)), max_way=RULES.max_way, dim=16, heads=2, lr=3e-3),
    "maml": lambda: MAML(MLP(8, (16,), RULES.max_way), inner_lr=0.3, lr=3e-3),
    "maml-vmap-first-order": lambda: MAML(MLP(8, (16,), RULES.max_way), inner_lr=0.3, first_order=True,
                                          task_parallel="vmap", lr=3e-3),
    "anil": lambda: ANIL(MLP(8, (16,), RULES.max_way), inner_lr=0.3, lr=3e-3),
    "metasgd": lambda: MetaSGD(MLP(8, (16,), RULES.max_way), inner_lr=0.3, lr=3e-3),
    "proto-maml": lambda: MAML(MLP(8, (16,), RULES.max_way), inner_lr=0.3, head_init="prototypes", lr=3e-3),
}


def two_sources(**kw):
    args = dict(train={"a": blobs(num_classes=12, per_class=10, seed=0, prefix="a"),
                       "b": blobs(num_classes=10, per_class=8, seed=1, prefix="b")},
                val={"x": blobs(num_classes=8, per_class=8, seed=2, prefix="x"),
                     "y": blobs(num_classes=8, seed=3, prefix="y")},
                test=blobs(num_classes=10, seed=4, prefix="t", spread=3.0),  # hard: accuracies vary
                n_way=None, n_shot=None, n_query=None, variable_episodes=RULES, meta_batch_size=3,
                train_episodes=12, val_episodes=6, test_episodes=9, seed=1)
    args.update(kw)
    return EpisodicDataModule(**args)


class Seen:
    def __init__(self):
        self.kinds = set()


@pytest.mark.parametrize("name", sorted(LEARNERS))
def test_every_learner_fits_and_tests_on_variable_episodes_with_named_sets_and_their_mean(name):
    torch.manual_seed(0)
    learner = LEARNERS[name]()
    before = [p.detach().clone() for p in learner.parameters()]
    dm = two_sources()
    t = trainer(max_epochs=2)
    t.fit(learner, dm)
    assert isinstance(next(iter(dm.train_dataloader())), RaggedEpisode)
    assert any(not torch.equal(a, b) for a, b in zip(before, learner.parameters())), "training changed nothing"
    logged = t.logged_metrics
    sets = [float(logged[f"val/{s}/acc"]) for s in ("x", "y")]
    assert float(logged["val/acc"]) == pytest.approx(sum(sets) / 2, abs=1e-6)
    assert all(0 <= v <= 1 for v in sets)
    result = t.test(learner, dm, verbose=False)[0]
    assert 0 < result["test/acc"] <= 1 and result["test/acc_ci95"] > 0
    assert torch.isfinite(torch.tensor(result["test/loss"]))


def test_the_pretrainer_numbers_classes_across_two_sources_and_validates_on_variable_episodes():
    torch.manual_seed(0)
    dm = two_sources(pretrain_batch_size=22)
    learner = Pretrainer(MLP(8, (16,)), lr=3e-3)
    t = trainer(max_epochs=2)
    t.fit(learner, dm)
    assert learner.num_classes == 22 == dm.pretrain_classes  # 12 + 10 classes, one classifier over both sources
    logged = t.logged_metrics
    assert float(logged["val/acc"]) == pytest.approx((float(logged["val/x/acc"]) + float(logged["val/y/acc"])) / 2,
                                                     abs=1e-6)


@pytest.fixture(scope="module")
def runs(ddp_runs):
    """tests/ddp_variable.py on 2 DDP ranks (meta-batches of 2 each) and on one process (4), from the suite's one DDP
    launch (conftest `ddp_runs`)."""
    return {name: [torch.load(ddp_runs / f"variable_{name}" / f"rank{r}.pt", weights_only=False) for r in range(n)]
            for name, n in (("ddp", 2), ("single", 1))}


@pytest.mark.parametrize("learner", ["protonet", "protomaml"])
def test_ddp_ranks_draw_distinct_variable_episodes_whose_union_and_meta_gradient_are_the_single_process_ones(runs,
                                                                                                             learner):
    r0, r1 = (r[learner] for r in runs["ddp"])
    (single,) = (r[learner] for r in runs["single"])
    assert len(r0["batches"]) == len(single["batches"]) == 2
    for step in range(2):
        (x0, s0, q0, w0), (x1, s1, q1, w1) = r0["batches"][step], r1["batches"][step]
        xs, ss, qs, ws = single["batches"][step]
        assert torch.equal(torch.cat([x0, x1]), xs) and s0 + s1 == ss and q0 + q1 == qs and w0 + w1 == ws
        assert len(set(ws)) > 1 or len(set(ss)) > 1, "the episodes should vary in shape"
    for a, b, c in zip(r0["grads"], r1["grads"], single["grads"]):
        torch.testing.assert_close(a, b, atol=0, rtol=0)  # all-reduced: identical on both ranks
        torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("learner", ["protonet", "protomaml"])
def test_ddp_validation_on_named_variable_sets_equals_the_single_process_figures(runs, learner):
    key = f"{learner}_val"
    r0, r1 = (r[key] for r in runs["ddp"])
    (single,) = (r[key] for r in runs["single"])
    for metric in ("val/x/acc", "val/y/acc", "val/acc", "val/acc_ci95"):
        ddp = [d[metric] for d in r0 if metric in d]
        one = [d[metric] for d in single if metric in d]
        assert ddp and ddp == pytest.approx(one, abs=1e-6), metric
        assert ddp == [d[metric] for d in r1 if metric in d]


def test_a_learner_written_for_fixed_shapes_refuses_a_ragged_meta_batch_naming_the_fix():
    from lightning_meta import Episode, MetaLearner

    class Nearest(MetaLearner):  # the MetaLearner docstring's example: [B, n, ...] tensors
        def __init__(self):
            super().__init__()
            self.dummy = torch.nn.Parameter(torch.zeros(()))

        def forward_episode(self, batch):
            return -torch.cdist(batch.query_x, batch.support_x) + self.dummy

    tasks = [Episode(torch.randn(3, 2), torch.tensor([0, 1, 1]), torch.randn(2, 2), torch.tensor([1, 0])),
             Episode(torch.randn(4, 2), torch.tensor([0, 1, 2, 0]), torch.randn(3, 2), torch.tensor([2, 1, 0]))]
    with pytest.raises(TypeError, match=r"Nearest computes on fixed-shape Episodes.*RaggedEpisode.*numbers for n_way, "
                                        r"n_shot and n_query.*accepts_ragged = True"):
        Nearest()(RaggedEpisode.from_tasks(tasks))
    with pytest.raises(TypeError, match="'RaggedEpisode' object is not iterable"):
        sx, sy, qx, qy = RaggedEpisode.from_tasks(tasks)  # noqa: F841 -- code that unpacks four [B, n, ...] tensors


def test_lightning_reads_a_ragged_batch_when_a_step_logs_without_a_batch_size():
    from lightning.pytorch.utilities.data import extract_batch_size

    batch = next(iter(two_sources().train_dataloader()))
    assert extract_batch_size(batch) == len(batch.support_x)  # Lightning's guess; our learners pass num_tasks


def test_variable_training_with_fixed_evaluation_episodes():
    dm = two_sources(n_way=3, n_shot=1, n_query=2, train_way="variable", train_shot="variable",
                     train_query="variable")
    train, val = next(iter(dm.train_dataloader())), next(iter(dm.val_dataloader()["x"]))
    assert isinstance(train, RaggedEpisode) and val.support_y.shape == (dm.eval_meta_batch_size, 3)
    with pytest.raises(ValueError, match=r"Expected `train_way` to be a number, None .* or \"variable\""):
        two_sources(train_way="varied")
    with pytest.raises(ValueError, match="needs `variable_episodes`"):
        two_sources(n_way=3, n_shot=1, n_query=2, variable_episodes=None, train_way="variable")


def test_resuming_with_other_variable_rules_or_training_sources_is_refused():
    state = two_sources().state_dict()
    two_sources().load_state_dict(state)  # the same: fine
    with pytest.raises(ValueError, match=r"drawn with variable_episodes=.*resuming would draw other episodes"):
        two_sources(variable_episodes=VariableEpisodes(min_way=3, max_way=7)).load_state_dict(state)
    with pytest.raises(ValueError, match=r"drawn with train_sources=\['train/a', 'train/b'\]"):
        two_sources(train={"a": blobs(seed=0, prefix="a")}).load_state_dict(state)


def test_heads_too_narrow_for_the_variable_ways_are_refused_at_setup_and_fixed_ways_keep_the_head_check():
    with pytest.raises(ValueError, match=r"up to max_way=6 ways.*built for at most max_way=4.*max_way=6"):
        trainer(max_steps=1).fit(AttentionLearner(MLP(8, (16,)), max_way=4, dim=16, heads=2), two_sources())
    with pytest.raises(ValueError, match=r"up to 6 ways \(max_way=6\).*head has 5 outputs.*out_features=6"):
        trainer(max_steps=1).fit(MAML(MLP(8, (16,), 5), inner_lr=0.3), two_sources())
    maml = MAML(MLP(8, (16,), RULES.max_way), inner_lr=0.3)  # fixed 3-way episodes, only shots vary: no wider head
    with pytest.raises(ValueError, match="3-way episode but the model's head has 6 outputs"):
        trainer(max_steps=1).fit(maml, two_sources(n_way=3, n_query=2))
    assert not maml.hparams.variable_ways


def test_validation_callbacks_never_stack_tasks_of_one_size_but_different_ways():
    from types import SimpleNamespace

    from lightning_meta import Episode
    from lightning_meta.callbacks._tasks import ValidationTasks

    class Keep(ValidationTasks):
        num_episodes, every_n_epochs = 2, 1

    three = Episode(torch.randn(6, 2), torch.tensor([0, 0, 1, 1, 2, 2]), torch.randn(6, 2), torch.arange(3).repeat(2))
    two = Episode(torch.randn(6, 2), torch.tensor([0, 0, 0, 1, 1, 1]), torch.randn(6, 2), torch.arange(2).repeat(3))
    keep = Keep()
    fake = SimpleNamespace(sanity_checking=False, current_epoch=0, is_global_zero=True)
    keep.on_validation_batch_end(fake, ProtoNet(MLP(2, (4,))), None, RaggedEpisode.from_tasks([three, two]), 0)
    collected = keep.collected(fake)
    assert isinstance(collected, RaggedEpisode) and collected.ways == (3, 2)
