"""Variable-way, variable-shot episodes and several training sources through EpisodicDataModule (issue #29, items 1-3,
the data side): the rules over thousands of episodes, hierarchies, one source per episode, seeding, resuming, ranks,
pretraining over several sources, and the errors."""

import dataclasses

import numpy as np
import pytest
import torch
from helpers import FakeTrainer

from conftest import OMNIGLOT, needs_omniglot
from lightning_meta import Episode, EpisodicDataModule, RaggedEpisode
from lightning_meta.data import Omniglot, RandomShift, Sinusoid, TensorClassDataset, VariableEpisodes

RULES = VariableEpisodes()  # the reference's constants
SMALL = VariableEpisodes(min_way=3, max_way=8, max_query=4, max_support=30, max_support_per_class=8)
SIZES = {  # the edge cases: classes of 6 images, an 8-class source, a 1,000-class source
    "six": np.full(40, 6),
    "eight": np.array([2, 3, 6, 20, 50, 100, 600, 1300]),
    "thousand": np.random.default_rng(0).integers(6, 1300, size=1000),
}


def source(sizes, tag=0, dtype=torch.float32, side=1, names=None):
    """A labelled dataset whose input ``x[i, 0, 0, 0]`` is ``tag * 10**6 + i``: every item says who it is."""
    sizes = torch.as_tensor(np.asarray(sizes))
    labels = torch.arange(len(sizes)).repeat_interleave(sizes)
    x = (torch.arange(len(labels), dtype=torch.float64) + tag * 10**6).to(dtype)
    ds = TensorClassDataset(x.view(-1, 1, 1, 1).expand(-1, 1, side, side).contiguous(), labels, names)
    return ds


def ids(x):
    return x.flatten(1)[:, 0].long()


def variable_dm(train, rules=SMALL, **kw):
    args = dict(train=train, n_way=None, n_shot=None, n_query=None, variable_episodes=rules, meta_batch_size=2,
                train_episodes=20, seed=3)
    args.update(kw)
    return EpisodicDataModule(**args)


def batches(dm, count, size=100, stream="train"):
    """``count`` episodes of ``stream``, as tasks, drawn by the sampler's batch API ``size`` at a time."""
    sampler = dm._sampler(stream)
    return [t for start in range(0, count, size) for t in tasks(sampler.batch(stream, 0, range(start, start + size)))]


def tasks(batch):
    return [batch.task(i) for i in range(batch.num_tasks)]


def chi_square(counts):
    counts = np.asarray(counts, dtype=float)
    expected = counts.sum() / len(counts)
    return float(((counts - expected) ** 2 / expected).sum())


def same(a, b):
    if isinstance(a, RaggedEpisode):
        return (isinstance(b, RaggedEpisode) and (a.support_sizes, a.query_sizes, a.ways) ==
                (b.support_sizes, b.query_sizes, b.ways) and all(torch.equal(x, y) for x, y in zip(a.tensors, b.tensors)))
    return all(torch.equal(x, y) for x, y in zip(a, b))


# ---------------------------------------------------------------- the rules, over thousands of episodes


@pytest.mark.parametrize("name", SIZES)
def test_variable_episodes_keep_meta_datasets_rules_over_thousands_of_episodes(name):
    sizes = SIZES[name]
    ds = source(sizes)
    tasks = batches(variable_dm(ds, RULES), 2000)
    ways, imbalanced = [], 0
    for t in tasks:
        s_items, q_items = ids(t.support_x).numpy(), ids(t.query_x).numpy()
        assert len(np.unique(np.concatenate([s_items, q_items]))) == len(s_items) + len(q_items)  # no item twice
        n = int(t.support_y.max()) + 1
        classes = ds.labels[s_items].numpy()
        owner = np.full(n, -1)
        owner[t.support_y.numpy()] = classes
        assert (owner[t.support_y.numpy()] == classes).all() and len(np.unique(owner)) == n  # one class per label
        assert (owner[t.query_y.numpy()] == ds.labels[q_items].numpy()).all()  # queries of the support's classes
        n_c = sizes[owner]
        shots, queries = np.bincount(t.support_y.numpy(), minlength=n), np.bincount(t.query_y.numpy(), minlength=n)
        q = min(RULES.max_query, int((n_c // 2).min()))
        assert (queries == q).all()
        assert (shots >= 1).all() and (shots <= n_c - q).all() and shots.sum() <= RULES.max_support
        ways.append(n)
        imbalanced += shots.max() >= 2 * shots.min()
    low, high = RULES.min_way, min(RULES.max_way, len(sizes))
    assert min(ways) == low and max(ways) == high
    counts = np.bincount(ways, minlength=high + 1)[low:]
    assert chi_square(counts) < 2 * len(counts) + 40, counts  # seeded: U{min_way .. min(max_way, C)}
    assert imbalanced > 0.3 * len(tasks)  # supports are not N x K


@pytest.mark.parametrize(("n_way", "n_shot", "n_query"), [
    (5, None, None), (None, 2, None), (None, None, 3), (6, (1, 4), None), (None, (2, 5), 2), (4, 2, None),
])
def test_a_number_fixes_its_quantity_and_the_rule_draws_the_others(n_way, n_shot, n_query):
    sizes = np.random.default_rng(1).integers(7, 30, size=40)
    ds = source(sizes)
    tasks = batches(variable_dm(ds, n_way=n_way, n_shot=n_shot, n_query=n_query), 400)
    ways, shot_counts = set(), set()
    for t in tasks:
        n = int(t.support_y.max()) + 1
        shots, queries = np.bincount(t.support_y.numpy(), minlength=n), np.bincount(t.query_y.numpy(), minlength=n)
        n_c = sizes[ds.labels[ids(t.support_x)].unique().numpy()]
        ways.add(n)
        shot_counts.add(tuple(shots))
        assert n == n_way if n_way else SMALL.min_way <= n <= SMALL.max_way
        if isinstance(n_shot, tuple):
            assert len(set(shots)) == 1 and n_shot[0] <= shots[0] <= n_shot[1]  # one drawn number per episode
        elif n_shot:
            assert (shots == n_shot).all()
        if n_query:
            q = n_query
        elif n_shot is None:
            q = min(SMALL.max_query, int((n_c // 2).min()))
        else:  # the shots come first: the queries are what the smallest class has left
            q = min(SMALL.max_query, int(n_c.min()) - (n_shot[1] if isinstance(n_shot, tuple) else n_shot))
        assert (queries == q).all()
    assert (len(ways) == 1) == bool(n_way)
    assert len(shot_counts) > 1 or (n_way and isinstance(n_shot, int))


def test_all_numbers_give_fixed_episodes_and_a_warning_that_the_rules_do_nothing():
    ds = source(np.full(12, 8))
    with pytest.warns(UserWarning, match=r"`variable_episodes` has no effect: `n_way`, `n_shot` and `n_query`"):
        dm = variable_dm(ds, n_way=4, n_shot=(2, 2), n_query=3)
    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch, Episode) and batch.support_x.shape == (2, 8, 1, 1, 1) and batch.query_y.shape == (2, 12)
    fixed = EpisodicDataModule(train=ds, n_way=4, n_shot=2, n_query=3, meta_batch_size=2, train_episodes=20, seed=3)
    assert same(batch, next(iter(fixed.train_dataloader())))  # the same episodes as without the rules


def test_training_overrides_fix_training_while_evaluation_stays_variable():
    dm = variable_dm(source(np.full(20, 10)), val=source(np.full(20, 10), tag=1), train_way=5, train_shot=1,
                     train_query=2, val_episodes=6)
    train, val = next(iter(dm.train_dataloader())), next(iter(dm.val_dataloader()))
    assert isinstance(train, Episode) and train.support_x.shape[:2] == (2, 5) and train.query_y.shape == (2, 10)
    assert isinstance(val, RaggedEpisode) and val.num_tasks == 2


# ---------------------------------------------------------------- hierarchies


def test_a_source_with_class_groups_draws_each_episode_within_one_group():
    ds = source(np.full(60, 8))
    ds.class_groups = [f"alphabet{c % 6}" for c in range(60)]  # 6 groups of 10 classes, interleaved
    group_of = np.array([c % 6 for c in range(60)])
    tasks = batches(variable_dm(ds), 1200)
    groups = [set(group_of[ds.labels[ids(t.support_x)].numpy()]) for t in tasks]
    assert all(len(g) == 1 for g in groups)
    assert chi_square(np.bincount([g.pop() for g in groups], minlength=6)) < 25
    flat = batches(variable_dm(ds, hierarchy=False), 200)
    fixed_way = batches(variable_dm(ds, n_way=5), 200)
    for drawn in (flat, fixed_way):  # hierarchy=False, and a fixed n_way, draw flat
        assert np.mean([len(set(group_of[ds.labels[ids(t.support_x)].numpy()])) > 1 for t in drawn]) > 0.5


def test_a_source_with_a_class_dag_draws_the_leaves_of_one_node():
    ds = source(np.full(30, 8), names=[f"leaf{i}" for i in range(30)])
    ds.class_dag = {"root": ["A", "B"], "A": [f"leaf{i}" for i in range(10)], "B": [f"leaf{i}" for i in range(10, 30)]}
    spans = {"root": set(range(30)), "A": set(range(10)), "B": set(range(10, 30))}
    seen = set()
    for t in batches(variable_dm(ds, VariableEpisodes(min_way=5, max_way=12)), 300):
        classes = set(ds.labels[ids(t.support_x)].tolist())
        node = next(k for k in ("A", "B", "root") if classes <= spans[k])
        assert len(classes) == min(12, len(spans[node])) or node == "root"  # a node gives all its leaves, 12 at most
        seen.add(node)
    assert seen == {"A", "B", "root"}


@needs_omniglot
def test_real_omniglot_exposes_its_alphabets_and_its_episodes_draw_one_each():
    omniglot = Omniglot(OMNIGLOT, ["images_background_small1"], rotations=(0, 90))
    alphabets = sorted({name.split("/")[0] for name in omniglot.class_names})
    assert omniglot.class_groups == [name.split("/")[0] for name in omniglot.class_names] and len(alphabets) >= 5
    rules = VariableEpisodes(min_way=5, max_way=20, max_support=100)
    batch = variable_dm(omniglot, rules)._sampler("train").batch("train", 0, range(3))
    assert isinstance(batch, RaggedEpisode) and batch.support_x.dtype == torch.uint8
    assert batch.query_x.shape[1:] == (1, 28, 28)
    # its classes and alphabets with each image replaced by its index, to tell which items an episode holds
    indexed = source(np.bincount(omniglot.labels.numpy()))
    indexed.class_groups = omniglot.class_groups
    drawn = [{omniglot.class_groups[c] for c in indexed.labels[ids(t.support_x)].tolist()}
             for t in batches(variable_dm(indexed, rules), 500)]
    assert all(len(a) == 1 for a in drawn) and set.union(*drawn) == set(alphabets)


# ---------------------------------------------------------------- several sources


@pytest.mark.parametrize("variable", [True, False])
def test_several_sources_give_one_source_per_episode_in_near_equal_shares(variable):
    sources = {"a": source(np.full(10, 8), tag=1), "b": source(np.full(25, 9), tag=2), "c": source(np.full(8, 12), tag=3)}
    kw = {} if variable else dict(n_way=4, n_shot=1, n_query=3, variable_episodes=None)
    dm = variable_dm(sources, **kw)
    tasks = batches(dm, 3000)
    assert isinstance(dm._sampler("train").batch("train", 0, range(4)), RaggedEpisode if variable else Episode)
    tags = [set((torch.cat([ids(t.support_x), ids(t.query_x)]) // 10**6).tolist()) for t in tasks]
    assert all(len(t) == 1 for t in tags)  # never a class from two sources in one episode
    shares = np.bincount([t.pop() for t in tags], minlength=4)[1:]
    assert chi_square(shares) < 15, shares  # 1/3 each (seeded)
    alone = [dm._sampler("train").batch("train", 0, [i]).task(0) for i in range(40)]  # one source each: no merging
    assert all(same(a, b) for a, b in zip(tasks[:40], alone))  # a merged meta-batch keeps each episode as it is
    listed = variable_dm(list(sources.values()), **kw)  # a list draws as the dict does
    assert all(same(a, b) for a, b in zip(tasks[:50], batches(listed, 50, size=50)))


def test_one_source_in_a_list_draws_as_that_source_alone():
    ds = source(np.full(12, 8))
    assert same(variable_dm([ds])._sampler("train").batch("train", 1, range(4)),
                variable_dm(ds)._sampler("train").batch("train", 1, range(4)))


def test_the_disjointness_check_reads_every_training_source():
    a = source(np.full(10, 8), names=[f"a{i}" for i in range(10)])
    b = source(np.full(10, 8), names=[f"b{i}" for i in range(10)])
    val = source(np.full(10, 8), names=[f"b{i}" for i in range(10)])
    with pytest.raises(ValueError, match=r"The train/glyphs and val datasets share 10 classes \(e.g. b0, b1"):
        variable_dm({"omniglot": a, "glyphs": b}, val=val).setup("fit")
    with pytest.raises(ValueError, match=r"`train\[1\]` and `val` are the same dataset"):
        variable_dm([a, val], val=val).setup("fit")


def test_sources_whose_inputs_differ_are_named_with_the_fix():
    a, b = source(np.full(10, 8), side=28, dtype=torch.uint8), source(np.full(10, 8), side=32, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"The training sources 'omniglot' \(TensorClassDataset\) and 'glyphs' "
                                         r"\(TensorClassDataset\) give inputs of different shapes or dtypes: \[1, 28, "
                                         r"28\] uint8 and \[1, 32, 32\] uint8.*resize them to one size"):
        variable_dm({"omniglot": a, "glyphs": b}).setup("fit")
    with pytest.raises(ValueError, match=r"'train\[0\]' .* \[1, 1, 1\] float32 and \[1, 1, 1\] uint8"):
        EpisodicDataModule(train=[source(np.full(10, 8)), source(np.full(10, 8), dtype=torch.uint8)],
                           pretrain_batch_size=4).setup("fit")


def test_pretraining_over_two_sources_numbers_classes_one_source_after_another():
    a = source(np.full(5, 4), tag=1)
    b = TensorClassDataset(torch.arange(12.0).view(-1, 1, 1, 1) + 2 * 10**6, torch.tensor([30, 10, 20]).repeat(4))
    dm = EpisodicDataModule(train=[a, b], pretrain_batch_size=8, n_way=3, n_shot=1, n_query=1, seed=1)
    dm.setup("fit")
    assert dm.pretrain_classes == 5 + 3
    got = [(int(x.flatten()[0]), int(y)) for batch in dm.train_dataloader() for x, y in zip(batch.x, batch.y)]
    assert len(got) == 32 and sorted({y for _, y in got}) == list(range(8))
    for x, y in got:
        tag, index = divmod(x, 10**6)
        expected = int(a.labels[index]) if tag == 1 else 5 + {10: 0, 20: 1, 30: 2}[int(b.labels[index])]
        assert y == expected, (tag, index, y)


# ---------------------------------------------------------------- seeded, resumable, rank-distinct


def epoch(dm, **trainer):
    dm.trainer = FakeTrainer(**trainer)
    return list(dm.train_dataloader())


def test_variable_episodes_are_seeded_and_the_same_for_any_worker_count():
    sources = [source(np.full(12, 9), tag=1), source(np.full(20, 7), tag=2)]
    a, b = epoch(variable_dm(sources)), epoch(variable_dm(sources))
    assert len(a) == 10 and all(isinstance(x, RaggedEpisode) for x in a) and all(map(same, a, b))
    assert not any(map(same, a, epoch(variable_dm(sources, seed=4))))
    assert not same(a[0], epoch(variable_dm(sources), current_epoch=1)[0])
    workers = epoch(variable_dm(sources, num_workers=2))
    assert all(map(same, a, workers))  # two worker processes, shared memory, the same batches


def test_evaluation_streams_draw_fixed_variable_episodes():
    def val(current_epoch=0, **kw):
        dm = variable_dm(source(np.full(20, 10), tag=1), val=source(np.full(15, 12), tag=2), val_episodes=9, **kw)
        dm.trainer = FakeTrainer(current_epoch=current_epoch)
        return list(dm.val_dataloader())

    first = val()
    assert [b.num_tasks for b in first] == [2, 2, 2, 2, 1] and all(isinstance(b, RaggedEpisode) for b in first)
    assert all(map(same, first, val(current_epoch=4)))  # the same in every epoch
    assert all(map(same, first, val(num_workers=2)))  # and for any worker count
    assert not any(map(same, first, val(seed=4)))


def test_a_variable_run_resumes_mid_epoch_at_the_next_unseen_episode():
    sources = {"a": source(np.full(12, 9), tag=1), "b": source(np.full(20, 7), tag=2)}
    full = epoch(variable_dm(sources), current_epoch=2)
    resumed = variable_dm(sources)
    resumed.load_state_dict({"seed": 3, "epoch": 2, "episodes_done": 6})  # 3 steps of 2 episodes
    rest = epoch(resumed, current_epoch=2)
    assert len(rest) == len(full) - 3 and all(map(same, rest, full[3:]))


def test_ranks_draw_distinct_variable_episodes_whose_union_is_the_single_process_meta_batch():
    sources = [source(np.full(12, 9), tag=1), source(np.full(20, 7), tag=2)]
    ranks = [epoch(variable_dm(sources, meta_batch_size=2, train_episodes=40), world_size=2, global_rank=r)
             for r in range(2)]
    single = epoch(variable_dm(sources, meta_batch_size=4, train_episodes=40))
    assert len(ranks[0]) == len(ranks[1]) == len(single) == 10
    seen = set()
    for step, whole in enumerate(single):
        union = [*tasks(ranks[0][step]), *tasks(ranks[1][step])]
        assert len(union) == 4 and all(same(a, b) for a, b in zip(union, tasks(whole)))
        for task in union:
            key = tuple(ids(task.support_x).tolist())
            assert key not in seen
            seen.add(key)


def test_the_image_transform_augments_ragged_batches_reproducibly_and_keeps_uint8():
    images = source(np.full(12, 9), side=8, dtype=torch.uint8)
    images.x = torch.randint(0, 256, images.x.shape, generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    plain = epoch(variable_dm(images))
    shifted, again = (epoch(variable_dm(images, train_transform=RandomShift(2))) for _ in range(2))
    assert all(map(same, shifted, again)) and shifted[0].support_x.dtype == torch.uint8
    for a, b in zip(plain, shifted):
        assert (a.support_sizes, a.ways) == (b.support_sizes, b.ways) and torch.equal(a.support_y, b.support_y)
    assert not all(torch.equal(a.support_x, b.support_x) for a, b in zip(plain, shifted))


# ---------------------------------------------------------------- the rest of the data module


def test_example_input_and_repr_of_a_variable_multi_source_module():
    ds = source(np.full(12, 9), side=4)
    dm = variable_dm({"omniglot": ds, "glyphs": source(np.full(10, 8), tag=1, side=4)}, n_shot=(1, 3))
    first = dm._sampler("train").batch("train", 0, [0])
    assert torch.equal(dm.example_input(), first.support_x[0]) and dm.example_input().shape == (1, 4, 4)
    text = repr(dm)
    assert "variable-way 1..3-shot variable-query" in text and "variable episodes VariableEpisodes(min_way=3" in text
    assert "train sources ['omniglot', 'glyphs']" in text


def test_a_trainer_checkpoint_of_a_variable_multi_source_run_loads_with_weights_only(tmp_path):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_meta import ProtoNet

    sources = {"a": source(np.full(12, 9), tag=1, side=2), "b": source(np.full(10, 8), tag=2, side=2)}
    dm = variable_dm(sources, n_shot=[1, 3], train_episodes=4)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)])
    trainer.fit(ProtoNet(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 4)), normalize=None), dm)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)["datamodule_hyper_parameters"]
    assert saved["variable_episodes"] == dataclasses.asdict(SMALL) and saved["n_shot"] == [1, 3]
    again = EpisodicDataModule.load_from_checkpoint(tmp_path / "last.ckpt", train=sources)
    assert again.variable_episodes == SMALL and all(map(same, epoch(dm), epoch(again)))


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"train": [source(np.full(10, 1))]}, ValueError,
     r"Class index 0 of the training source 'train\[0\]' \(TensorClassDataset\) has 1 image, but an episode needs 2 per class"),
    ({"variable_episodes": {"min_way": 5, "max_way": 3}}, ValueError, r"Expected `max_way` to be >= `min_way` \(5\)"),
    ({"variable_episodes": {"max_ways": 3}}, TypeError, r"`variable_episodes` has the key\(s\) \['max_ways'\]"),
    ({"train": []}, ValueError, r"`train` is an empty list: give a labelled dataset, several"),
    ({"train": [source(np.full(10, 8)), "omniglot"]}, TypeError,
     r"`train\[1\]` must be a labelled map-style dataset of \(x, label\) items, but got str"),
    ({"train": {"sines": Sinusoid(), "b": source(np.full(10, 8))}}, TypeError,
     r"`train/sines` is a task distribution \(Sinusoid\): several training sources must be labelled datasets"),
    ({"variable_episodes": None}, ValueError,
     r"`n_way=None` draws the ways of each episode by Meta-Dataset's rule, which needs `variable_episodes`: pass "
     r"`variable_episodes=VariableEpisodes\(\)`"),
    ({"n_way": 5, "n_query": 3, "variable_episodes": None, "n_shot": (1, 4)}, ValueError,
     r"`n_shot=\(1, 4\)` draws the shots of each episode from a range, which needs `variable_episodes`"),
    ({"train": Sinusoid()}, ValueError,
     r"Variable episodes .* draw classes from labelled datasets, but `train` is a task distribution \(Sinusoid\): "
     r"give `train_way`, `train_shot` and `train_query` numbers"),
    ({"val": [source(np.full(10, 8))]}, TypeError, r"`val` is a list: several val sets are a dict of named sets"),
])
def test_bad_variable_or_multi_source_settings_are_named_before_training(kwargs, error, match):
    with pytest.raises(error, match=match):
        variable_dm(**{"train": source(np.full(10, 8)), **kwargs}).setup("fit")


def test_a_hierarchy_that_cannot_give_episodes_is_named_with_the_fixes():
    ds = source(np.full(12, 8))
    ds.class_groups = ["x"] * 10 + ["y"] * 2
    with pytest.raises(ValueError, match=r"`class_groups` has 1 group\(s\) with fewer classes than `min_way`=3 \(e.g. "
                                         r"'y' with 2\).*`EpisodicDataModule\(hierarchy=False\)`"):
        variable_dm(ds).setup("fit")
    variable_dm(ds, hierarchy=False).setup("fit")  # flat draws need no groups
    ds.class_groups = ["x"] * 11
    with pytest.raises(ValueError, match=r"`class_groups` of the train dataset \(TensorClassDataset\) has 11 entries "
                                         r"but the dataset has 12 classes"):
        variable_dm(ds).setup("fit")
