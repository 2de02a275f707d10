"""Meta-Dataset's variable episodes (issue #29, items 1 and 2): the rules, checked over thousands of plans of fabricated
sources and of the real Omniglot and ImageNet specifications, and against a plain transcription of the reference."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from lightning_meta.data.streams import episode_rng
from lightning_meta.data.variable import MAX_SPANNING_LEAVES, VariableEpisodePlanner, VariableEpisodes

SPECS = Path(__file__).resolve().parents[2] / "shared" / "data" / "metadataset_specs"
needs_specs = pytest.mark.skipif(not (SPECS / "omniglot_dataset_spec.json").is_file(),
                                 reason=f"Meta-Dataset's specs not found in {SPECS}")

SOURCES = {  # the edge cases: classes of 6 images, an 8-class source, a 1,000-class source of ImageNet-like sizes
    "six": np.full(40, 6),
    "eight": np.array([2, 3, 6, 20, 50, 100, 600, 1300]),
    "thousand": np.random.default_rng(0).integers(6, 1300, size=1000),
}


def plans(planner, count, seed=0, items=True):
    return [planner.plan(episode_rng(seed, "train", 0, i), items=items) for i in range(count)]


def chi_square(counts):
    counts = np.asarray(counts, dtype=float)
    expected = counts.sum() / len(counts)
    return float(((counts - expected) ** 2 / expected).sum())


def reference_plan(rng, sizes, r, groups=None, nodes=None):
    """meta_dataset/data/sampling.py, written out plainly (EpisodeDescriptionSampler.sample_episode_description with
    variable ways and shots), drawing from ``rng`` in the reference's order."""
    if nodes is not None:  # use_dag_hierarchy: one eligible node, its leaves, max_ways_upper_bound of them if more
        class_ids = nodes[rng.integers(len(nodes))]
        if len(class_ids) > r.max_way:
            class_ids = rng.choice(class_ids, size=r.max_way, replace=False)
    elif groups is not None:  # use_bilevel_hierarchy: one superclass, then the ways within it
        members = groups[rng.integers(len(groups))]
        num_ways = rng.integers(r.min_way, min(r.max_way, len(members)) + 1)
        class_ids = members[rng.choice(len(members), num_ways, replace=False)]
    else:
        num_ways = rng.integers(low=r.min_way, high=min(r.max_way, len(sizes)) + 1)
        class_ids = rng.choice(len(sizes), num_ways, replace=False)
    images_per_class = sizes[class_ids]
    num_query = np.minimum(r.max_query, (images_per_class // 2).min())  # compute_num_query
    num_remaining_per_class = images_per_class - num_query
    beta = rng.uniform()  # sample_support_set_size
    support_size_contributions = np.minimum(r.max_support_per_class, num_remaining_per_class)
    support_set_size = np.minimum(np.floor(beta * support_size_contributions + 1).sum(), r.max_support)
    remaining_support_set_size = support_set_size - len(num_remaining_per_class)  # sample_num_support_per_class
    unnormalized_proportions = images_per_class * np.exp(
        rng.uniform(r.min_log_weight, r.max_log_weight, size=images_per_class.shape))
    support_set_proportions = unnormalized_proportions / unnormalized_proportions.sum()
    num_desired_per_class = np.floor(support_set_proportions * remaining_support_set_size).astype("int32") + 1
    return class_ids, np.minimum(num_desired_per_class, num_remaining_per_class), num_query


def omniglot_train():
    """Omniglot's training alphabets (a BiLevelDatasetSpecification): class sizes and the classes of each alphabet."""
    spec = json.loads((SPECS / "omniglot_dataset_spec.json").read_text())
    per_group = [spec["classes_per_superclass"][str(g)] for g in range(spec["superclasses_per_split"]["TRAIN"])]
    sizes = np.array([spec["images_per_class"][str(c)] for c in range(sum(per_group))])
    starts = np.cumsum(per_group) - per_group
    return sizes, [np.arange(s, s + n) for s, n in zip(starts, per_group)]


def imagenet_train():
    """ImageNet's training graph (a HierarchicalDatasetSpecification): leaf sizes, leaf names and children lists."""
    spec = json.loads((SPECS / "ilsvrc_2012_dataset_spec.json").read_text())
    graph = spec["split_subgraphs"]["TRAIN"]
    leaves = sorted(n["wn_id"] for n in graph if not n["children_ids"])
    sizes = np.array([spec["images_per_class"]["TRAIN"][leaf] for leaf in leaves])
    return sizes, leaves, {n["wn_id"]: n["children_ids"] for n in graph}


def spanned_leaves(dag, node):
    children = dag.get(node, [])
    return {node} if not children else set().union(*(spanned_leaves(dag, c) for c in children))


# ---------------------------------------------------------------- the rules, over thousands of plans


@pytest.mark.parametrize("source", SOURCES)
def test_every_plan_keeps_the_rules_of_the_reference(source):
    sizes = SOURCES[source]
    rules = VariableEpisodes()
    planner = VariableEpisodePlanner(sizes, rules)
    drawn = plans(planner, 2000)
    for p in drawn:
        n = sizes[p.classes]
        assert rules.min_way <= p.n_way <= min(rules.max_way, len(sizes))
        assert len(np.unique(p.classes)) == p.n_way
        assert p.n_query == min(rules.max_query, int((n // 2).min()))
        assert (p.shots >= 1).all() and (p.shots <= n - p.n_query).all()
        assert p.support_size <= rules.max_support
        assert len(p.support) == p.support_size and len(p.query) == p.n_way * p.n_query
        owner = np.concatenate([np.repeat(np.arange(p.n_way), p.shots), np.repeat(np.arange(p.n_way), p.n_query)])
        items = np.concatenate([p.support, p.query])  # no item twice in one episode, every item inside its class
        assert len(np.unique(owner * 10_000 + items)) == len(items) and (0 <= items).all() and (items < n[owner]).all()
    imbalanced = np.mean([p.shots.max() >= 2 * p.shots.min() for p in drawn])
    assert imbalanced > 0.3, imbalanced  # supports are not N x K


def test_ways_are_uniform_over_their_range():
    # 46 ways (5..50) over 4,600 plans of the 1,000-class source, and 4 ways (5..8) over 2,000 of the 8-class source:
    # chi-square statistics with 45 and 3 degrees of freedom, bounds at p = 3e-4 and 1e-4 (the fixed seeds give 32.3, 1.6)
    for source, count, low, high, bound in (("thousand", 4600, 5, 50, 85.0), ("eight", 2000, 5, 8, 21.0)):
        ways = [p.n_way for p in plans(VariableEpisodePlanner(SOURCES[source]), count, items=False)]
        counts = np.bincount(ways, minlength=high + 1)[low:]
        assert min(ways) == low and max(ways) == high and len(counts) == high - low + 1
        assert chi_square(counts) < bound, (source, chi_square(counts))


def test_the_support_follows_class_sizes_and_reaches_its_cap():
    sizes = SOURCES["thousand"]
    drawn = plans(VariableEpisodePlanner(sizes), 2000, items=False)
    shots = np.concatenate([p.shots for p in drawn])
    n = np.concatenate([sizes[p.classes] for p in drawn])
    assert shots[n > 1000].mean() > 2 * shots[n < 200].mean()  # R_c grows with n_c
    assert max(p.support_size for p in drawn) > 450  # |S| approaches max_support = 500 on large classes
    small = plans(VariableEpisodePlanner(SOURCES["six"]), 500, items=False)
    assert {p.n_query for p in small} == {3} and max(int(p.shots.max()) for p in small) == 3  # k_c <= n_c - q = 3


@pytest.mark.parametrize("source", SOURCES)
def test_plans_equal_a_plain_transcription_of_the_reference(source):
    sizes, rules = SOURCES[source], VariableEpisodes(max_way=30, max_support=200, max_support_per_class=40)
    planner = VariableEpisodePlanner(sizes, rules)
    for i in range(300):
        p = planner.plan(np.random.default_rng(i), items=False)
        classes, shots, q = reference_plan(np.random.default_rng(i), sizes, rules)
        np.testing.assert_array_equal(p.classes, classes)
        np.testing.assert_array_equal(p.shots, shots)
        assert p.n_query == q


# ---------------------------------------------------------------- fixed ways, shots, queries


@pytest.mark.parametrize("n_way,n_shot,n_query", [(5, None, None), (None, 3, None), (None, None, 4), (20, 1, 5),
                                                  (None, (1, 5), None)])
def test_a_number_fixes_its_quantity_and_the_rule_draws_the_others(n_way, n_shot, n_query):
    sizes, rules = SOURCES["thousand"], VariableEpisodes()
    drawn = plans(VariableEpisodePlanner(sizes, rules, n_way=n_way, n_shot=n_shot, n_query=n_query), 500)
    for p in drawn:
        n = sizes[p.classes]
        assert p.n_way == n_way if n_way else rules.min_way <= p.n_way <= rules.max_way
        if isinstance(n_shot, int):
            assert (p.shots == n_shot).all()
        elif n_shot is not None:
            assert len(set(p.shots.tolist())) == 1 and 1 <= p.shots[0] <= 5
        if n_query is not None:
            assert p.n_query == n_query
        elif n_shot is not None:  # compute_num_query with a support size: min(max_query, min_c n_c - max shots)
            assert p.n_query == min(rules.max_query, int(n.min()) - (n_shot if isinstance(n_shot, int) else 5))
        else:
            assert p.n_query == min(rules.max_query, int((n // 2).min()))
        assert (p.shots + p.n_query <= n).all() and len(p.query) == p.n_way * p.n_query
    if isinstance(n_shot, tuple):
        assert {int(p.shots[0]) for p in drawn} == {1, 2, 3, 4, 5}
    if n_way is None:
        assert len({p.n_way for p in drawn}) > 30


# ---------------------------------------------------------------- hierarchies


@needs_specs
def test_omniglot_episodes_draw_one_alphabet_each_and_every_alphabet_alike():
    sizes, alphabets = omniglot_train()
    assert len(alphabets) == 25 and len(sizes) == 883  # Meta-Dataset's training split of Omniglot
    planner = VariableEpisodePlanner(sizes, groups=alphabets)
    drawn = plans(planner, 2500)
    for p in drawn:
        members = alphabets[p.group]
        assert np.isin(p.classes, members).all()
        assert 5 <= p.n_way <= min(50, len(members)) and p.n_query == 10
    counts = np.bincount([p.group for p in drawn], minlength=25)
    assert chi_square(counts) < 60.0, chi_square(counts)  # 24 degrees of freedom, p = 6e-5 (the seed gives 20.6)
    for i in range(200):  # the same draws as the reference's bi-level sampler
        p = planner.plan(np.random.default_rng(i), items=False)
        classes, shots, q = reference_plan(np.random.default_rng(i), sizes, planner.rules, groups=alphabets)
        np.testing.assert_array_equal(p.classes, classes)
        np.testing.assert_array_equal(p.shots, shots)


@needs_specs
def test_ignore_hierarchy_probability_mixes_in_flat_draws():
    sizes, alphabets = omniglot_train()
    owner = np.repeat(np.arange(len(alphabets)), [len(a) for a in alphabets])
    planner = VariableEpisodePlanner(sizes, VariableEpisodes(ignore_hierarchy_probability=0.3), groups=alphabets)
    drawn = plans(planner, 2000, items=False)
    flat = [p for p in drawn if p.group == -1]
    assert abs(len(flat) / 2000 - 0.3) < 0.04  # 3.9 standard deviations (the seed gives 0.307)
    assert np.mean([len(np.unique(owner[p.classes])) > 1 for p in flat]) > 0.95
    assert all(len(np.unique(owner[p.classes])) == 1 for p in drawn if p.group >= 0)


@needs_specs
def test_imagenet_episodes_draw_the_leaves_of_one_eligible_node():
    sizes, leaves, dag = imagenet_train()
    assert len(leaves) == 712
    planner = VariableEpisodePlanner(sizes, dag=dag, class_names=leaves)
    index = {leaf: i for i, leaf in enumerate(leaves)}
    eligible = {}  # the reference's rule, computed independently: internal nodes spanning 5..392 leaves
    for node, children in dag.items():
        spanned = spanned_leaves(dag, node)
        if children and 5 <= len(spanned) <= MAX_SPANNING_LEAVES:
            eligible[node] = sorted(index[leaf] for leaf in spanned)
    assert planner.nodes == sorted(eligible)
    assert [c.tolist() for c in planner.node_classes] == [eligible[n] for n in sorted(eligible)]
    assert set().union(*map(set, eligible.values())) == set(range(712))  # 392 keeps every leaf reachable
    for p in plans(planner, 1500):
        spanned = eligible[planner.nodes[p.group]]
        if len(spanned) <= 50:
            assert sorted(p.classes.tolist()) == spanned
        else:
            assert p.n_way == 50 and set(p.classes.tolist()) <= set(spanned)
        assert p.n_way >= 5 and p.n_query == 10 and p.support_size <= 500
    for i in range(200):  # the same draws as the reference's DAG sampler
        p = planner.plan(np.random.default_rng(i), items=False)
        classes, shots, _ = reference_plan(np.random.default_rng(i), sizes, planner.rules,
                                           nodes=[np.array(eligible[n]) for n in sorted(eligible)])
        np.testing.assert_array_equal(p.classes, classes)
        np.testing.assert_array_equal(p.shots, shots)


def test_a_leaf_under_two_parents_counts_once_and_leaves_only_are_classes():
    # r spans {a..e} through x and y, and x and y share c: 5 distinct leaves, so r is eligible and x, y (3 each) are not
    dag = {"r": ["x", "y"], "x": ["a", "b", "c"], "y": ["c", "d", "e"]}
    planner = VariableEpisodePlanner([4] * 5, dag=dag, class_names=list("abcde"))
    assert planner.nodes == ["r"] and planner.node_classes[0].tolist() == [0, 1, 2, 3, 4]
    assert sorted(planner.plan(np.random.default_rng(0)).classes.tolist()) == [0, 1, 2, 3, 4]


# ---------------------------------------------------------------- determinism


def test_a_plan_is_a_pure_function_of_its_generator():
    planner = VariableEpisodePlanner(SOURCES["thousand"])
    forward = plans(planner, 50, seed=3)
    backward = [planner.plan(episode_rng(3, "train", 0, i)) for i in reversed(range(50))][::-1]
    for a, b in zip(forward, backward):  # no state between plans: resuming at any index draws the same episodes
        for field_a, field_b in zip(a, b):
            np.testing.assert_array_equal(field_a, field_b)
    other = plans(planner, 50, seed=4)
    assert sum(np.array_equal(a.classes, b.classes) for a, b in zip(forward, other)) == 0


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_way=3), r"Expected `max_way` to be >= `min_way` \(5\), but got 3\."),
    (dict(min_way=1), r"Expected `min_way` to be an integer >= 2, but got 1\."),
    (dict(max_query=2.5), r"Expected `max_query` to be an integer >= 1, but got 2\.5\."),
    (dict(max_support=20), r"Expected `max_support` to be >= `max_way` \(50\) so that every class"),
    (dict(min_log_weight=1.0, max_log_weight=0.0), r"Expected `max_log_weight` to be >= `min_log_weight` \(1\.0\)"),
    (dict(min_log_weight=math.nan), r"Expected `min_log_weight` to be a finite number, but got nan\."),
    (dict(ignore_hierarchy_probability=1.5), r"Expected `ignore_hierarchy_probability` to be a number in \[0, 1\]"),
])
def test_bad_constants_name_the_constant(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VariableEpisodes(**kwargs)


@pytest.mark.parametrize("sizes,kwargs,match", [
    ([20, 1, 20, 20, 20, 20], dict(class_names=list("abcdef")),
     r"Class 'b' \(index 1\) of the source has 1 image, but an episode needs 2 per class \(one support and one query"),
    ([1] * 8, {}, r"Class index 0 of the source has 1 image, .* \(7 more classes too\)\. Remove such classes or add"),
    ([6] * 8, dict(n_shot=5, n_query=2), r"has 6 images, but an episode needs 7 per class \(n_shot=5 support and 2 query"),
    ([20] * 3, {}, r"The source has 3 classes, fewer than `min_way`=5: no episode can be drawn\. Lower `min_way`"),
    ([20] * 8, dict(n_way=10), r"The source has 8 classes, fewer than `n_way`=10: no episode can be drawn"),
    ([20] * 8, dict(n_way=10, groups=[range(8)]), r"cannot be combined with a fixed `n_way` \(10\): pass `n_way=None`"),
    ([20] * 8, dict(groups={"Greek": [0, 1, 2], "Latin": [3, 4, 5, 6, 7]}),
     r"Group 'Greek' of the source has 3 classes, fewer than `min_way`=5: .* Lower `min_way` or merge"),
    ([20] * 8, dict(groups=[[0, 1, 2, 3, 9]]), r"Group 0 of the source lists class 9, but class indices run from 0 to 7"),
    ([20] * 8, dict(dag={"r": ["x"], "x": ["r"]}), r"`dag` has a cycle through 'r'"),
    ([20] * 8, dict(dag={"r": ["a", "zz"]}, class_names=list("abcdefgh")), r"Leaf 'zz' of the source's `dag` is not a"),
    ([20] * 8, dict(dag={"r": [0, 1, 2]}), r"No node of the source's `dag` spans between `min_way`=5 and 392 leaves"),
    ([20] * 8, dict(class_names=["a"]), r"`class_names` has 1 names but `class_sizes` has 8 classes"),
    ([[20, 20]], {}, r"Expected `class_sizes` to be a non-empty 1-D sequence of image counts"),
    ([20.0] * 8, {}, r"Expected `class_sizes` to be .* of dtype float64\."),
    ([20] * 8, dict(n_shot=(3, 1)), r"Expected `n_shot\[1\]` to be an integer >= 3, but got 1\."),
    ([20] * 8, dict(n_shot=[1, 2, 3]), r"Expected `n_shot` to be an integer, a pair \(lo, hi\) or None, but got \[1, 2, 3\]\."),
    ([20] * 8, dict(rules=dict(min_way=5)), r"Expected `rules` to be a VariableEpisodes, but got dict\."),
])
def test_a_source_that_cannot_give_episodes_is_refused_with_the_fix(sizes, kwargs, match):
    error = TypeError if "rules" in kwargs else ValueError
    with pytest.raises(error, match=match):
        VariableEpisodePlanner(sizes, **kwargs)


def test_a_fixed_way_wider_than_max_support_is_refused():
    rules = VariableEpisodes(max_way=10, max_support=10)
    with pytest.raises(ValueError, match=r"Expected `max_support` to be >= the ways of an episode \(20\)"):
        VariableEpisodePlanner([20] * 30, rules, n_way=20)


@pytest.mark.parametrize("size,n_shot,n_query,bound", [(6, 3, 2, 25.0), (100, 20, 4, 160.0)])
def test_items_are_uniform_within_their_class(size, n_shot, n_query, bound):
    # classes of 6 sort random keys over all their items, classes of 100 draw with replacement and redraw repeats: in
    # both, every item is as likely to be a support (or query) item; chi-square bounds at p ~ 1e-4 (5, 99 degrees of
    # freedom; the seeds give 2.8 and 3.6, 80.9 and 88.9)
    planner = VariableEpisodePlanner([size] * 5, n_way=5, n_shot=n_shot, n_query=n_query)
    drawn = plans(planner, 2000)
    support = np.bincount(np.concatenate([p.support for p in drawn]), minlength=size)
    query = np.bincount(np.concatenate([p.query for p in drawn]), minlength=size)
    assert chi_square(support) < bound and chi_square(query) < bound, (chi_square(support), chi_square(query))
