"""Meta-Dataset's variable-way, variable-shot episodes (Triantafillou et al., ICLR 2020) as pure numpy.

The rules of the reference's ``EpisodeDescriptionSampler`` (google-research/meta-dataset, ``meta_dataset/data/
sampling.py``) with the defaults of ``learn/gin/setups/data_config_common.gin``, drawn from a ``np.random.Generator``
the caller passes (one per episode, e.g. :func:`~lightning_meta.data.streams.episode_rng`), so an episode is a pure
function of that generator's state. A plan says which classes an episode has, how many support items each class gives
(``k_c``), how many query items every class gives (``q``), and which items (positions within each class).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Optional, Union

import numpy as np

# the reference's MAX_SPANNING_LEAVES_ELIGIBLE: the fewest leaves a DAG node may span to be drawn such that every leaf
# of ImageNet's training graph is still reachable; wider nodes would mostly sub-sample at random
MAX_SPANNING_LEAVES = 392


def _int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"Expected `{name}` to be an integer >= {minimum}, but got {value!r}.")


def _real(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not math.isfinite(value):
        raise ValueError(f"Expected `{name}` to be a finite number, but got {value!r}.")


@dataclass(frozen=True)
class VariableEpisodes:
    """The constants of Meta-Dataset's variable episodes (the reference's ``EpisodeDescriptionConfig``).

    - ways ``N ~ U{min_way .. min(max_way, classes available)}``, classes uniform without replacement (or within one
      group / DAG node of a hierarchy, which ``ignore_hierarchy_probability`` of the episodes ignore);
    - queries per class ``q = min(max_query, min_c floor(n_c / 2))``, the same for every class;
    - support size ``|S| = min(max_support, sum_c floor(beta * min(max_support_per_class, n_c - q) + 1))`` with one
      ``beta ~ U[0, 1)`` per episode, split as ``k_c = min(floor(R_c (|S| - N)) + 1, n_c - q)``, ``R_c`` proportional
      to ``n_c exp(alpha_c)``, ``alpha_c ~ U[min_log_weight, max_log_weight)`` per class.

    Example:
        >>> VariableEpisodes()
        VariableEpisodes(min_way=5, max_way=50, max_query=10, max_support=500, max_support_per_class=100, \
min_log_weight=-0.6931471805599453, max_log_weight=0.6931471805599453, ignore_hierarchy_probability=0.0)
        >>> VariableEpisodes(min_way=5, max_way=3)
        Traceback (most recent call last):
        ...
        ValueError: Expected `max_way` to be >= `min_way` (5), but got 3.
    """

    min_way: int = 5
    max_way: int = 50
    max_query: int = 10
    max_support: int = 500
    max_support_per_class: int = 100
    min_log_weight: float = math.log(0.5)
    max_log_weight: float = math.log(2.0)
    ignore_hierarchy_probability: float = 0.0

    def __post_init__(self) -> None:
        _int("min_way", self.min_way, 2)
        _int("max_way", self.max_way, 2)
        if self.max_way < self.min_way:
            raise ValueError(f"Expected `max_way` to be >= `min_way` ({self.min_way}), but got {self.max_way}.")
        _int("max_query", self.max_query, 1)
        _int("max_support_per_class", self.max_support_per_class, 1)
        _int("max_support", self.max_support, 1)
        if self.max_support < self.max_way:
            raise ValueError(f"Expected `max_support` to be >= `max_way` ({self.max_way}) so that every class of an "
                             f"episode gets a support item, but got {self.max_support}.")
        _real("min_log_weight", self.min_log_weight)
        _real("max_log_weight", self.max_log_weight)
        if self.max_log_weight < self.min_log_weight:
            raise ValueError(f"Expected `max_log_weight` to be >= `min_log_weight` ({self.min_log_weight}), but got "
                             f"{self.max_log_weight}.")
        p = self.ignore_hierarchy_probability
        if isinstance(p, bool) or not isinstance(p, (int, float, np.floating)) or not 0 <= p <= 1:
            raise ValueError(f"Expected `ignore_hierarchy_probability` to be a number in [0, 1], but got {p!r}.")


class EpisodePlan(NamedTuple):
    """One episode's composition. Support and query items are positions within their class (``0..n_c-1``), class by
    class in the order of ``classes`` (class ``i`` is the episode's label ``i``); no item appears twice.

    - ``classes``: ``[N]`` class indices into the source's ``class_sizes``
    - ``shots``: ``[N]`` support items per class ``k_c >= 1``
    - ``n_query``: query items per class ``q``, the same for every class
    - ``group``: the hierarchy group or DAG node drawn (index into ``groups`` / ``planner.nodes``), -1 for a flat draw
    - ``support``: ``[sum k_c]`` item positions (``None`` when items were not drawn)
    - ``query``: ``[N * q]`` item positions (``None`` when items were not drawn)
    """

    classes: np.ndarray
    shots: np.ndarray
    n_query: int
    group: int
    support: Optional[np.ndarray] = None
    query: Optional[np.ndarray] = None

    @property
    def n_way(self) -> int:
        return len(self.classes)

    @property
    def support_size(self) -> int:
        return int(self.shots.sum())


Shot = Union[int, tuple[int, int], list[int], None]


class VariableEpisodePlanner:
    """Draws :class:`EpisodePlan`\\ s from one source, given its classes' sizes ``n_c`` and optionally a hierarchy.

    Args:
        class_sizes: ``[C]`` images per class.
        rules: the constants (:class:`VariableEpisodes`, its defaults when ``None``).
        n_way: a number fixes the ways; ``None`` draws them by the rule. A hierarchy draws its own ways.
        n_shot: a number fixes the shots of every class, a pair ``(lo, hi)`` draws one uniformly per episode; ``None``
            draws the imbalanced support of the rule.
        n_query: a number fixes the queries per class; ``None`` takes ``q`` of the rule.
        groups: a two-level hierarchy (Omniglot's alphabets): class indices per group, as a sequence or a mapping from
            group names. An episode draws one group uniformly, then ``N ~ U{min_way .. min(max_way, group size)}``.
        dag: a class graph (ImageNet's WordNet): children per node; its leaves are the classes, named by
            ``class_names`` (or class indices without it). An episode draws one internal node spanning
            ``min_way .. 392`` leaves uniformly and takes its leaves, ``max_way`` of them at random if more.
        class_names: a name per class, for the DAG's leaves and for error messages.
        name: what to call the source in error messages.

    Example:
        >>> planner = VariableEpisodePlanner([20] * 30 + [6] * 10, VariableEpisodes(min_way=5, max_way=10))
        >>> plan = planner.plan(np.random.default_rng(0))
        >>> plan.classes.tolist(), plan.shots.tolist(), plan.n_query  # class 31 has 6 images: q = 6 // 2
        ([19, 2, 16, 8, 10, 6, 0, 31, 1, 25], [7, 17, 7, 17, 9, 17, 14, 3, 12, 7], 3)
        >>> plan.support.shape, plan.query.shape  # item positions within their classes
        ((110,), (30,))
    """

    def __init__(self, class_sizes: Sequence[int] | np.ndarray, rules: Optional[VariableEpisodes] = None, *,
                 n_way: Optional[int] = None, n_shot: Shot = None, n_query: Optional[int] = None,
                 groups: Union[Sequence[Sequence[int]], Mapping[Hashable, Sequence[int]], None] = None,
                 dag: Optional[Mapping[Hashable, Sequence[Hashable]]] = None,
                 class_names: Optional[Sequence[Hashable]] = None, name: str = "source") -> None:
        self.rules = rules = VariableEpisodes() if rules is None else rules
        if not isinstance(rules, VariableEpisodes):
            raise TypeError(f"Expected `rules` to be a VariableEpisodes, but got {type(rules).__name__}.")
        sizes = np.asarray(class_sizes)
        if sizes.ndim != 1 or len(sizes) == 0 or (sizes.dtype.kind not in "iu") or (sizes < 0).any():
            raise ValueError(f"Expected `class_sizes` to be a non-empty 1-D sequence of image counts (integers >= 0), "
                             f"but got {sizes.tolist() if sizes.size <= 8 else f'shape {sizes.shape}'} of dtype "
                             f"{sizes.dtype}.")
        self.class_sizes = sizes.astype(np.int64)
        if class_names is not None and len(class_names) != len(sizes):
            raise ValueError(f"`class_names` has {len(class_names)} names but `class_sizes` has {len(sizes)} classes: "
                             "give one name per class.")
        self.class_names, self.name = class_names, name
        if n_way is not None:
            _int("n_way", n_way, 2)
        if n_query is not None:
            _int("n_query", n_query, 1)
        self.n_shot_range: Optional[tuple[int, int]] = None
        if isinstance(n_shot, (tuple, list)):  # a list from a YAML config
            if len(n_shot) != 2:
                raise ValueError(f"Expected `n_shot` to be an integer, a pair (lo, hi) or None, but got {n_shot!r}.")
            _int("n_shot[0]", n_shot[0], 1)
            _int("n_shot[1]", n_shot[1], n_shot[0])
            self.n_shot_range = (int(n_shot[0]), int(n_shot[1]))
        elif n_shot is not None:
            _int("n_shot", n_shot, 1)
            self.n_shot_range = (int(n_shot), int(n_shot))
        self.n_way, self.n_shot, self.n_query = n_way, n_shot, n_query
        if groups is not None and dag is not None:
            raise ValueError("Pass either `groups` (a two-level hierarchy) or `dag` (a class graph), not both.")
        if (groups is not None or dag is not None) and n_way is not None:
            raise ValueError(f"A class hierarchy draws each episode's ways itself, so it cannot be combined with a fixed "
                             f"`n_way` ({n_way}): pass `n_way=None`, or leave out `groups`/`dag` for flat draws.")
        self._check_sizes()
        count = len(sizes)
        self.nodes: list[Hashable] = []  # the hierarchy's groups or eligible DAG nodes, in the order `plan.group` counts
        self.node_classes: list[np.ndarray] = []  # the classes each of them may give
        self.is_dag = dag is not None
        if groups is not None:
            self._set_groups(groups)
        elif dag is not None:
            self._set_dag(dag)
        else:
            least = rules.min_way if n_way is None else n_way
            if count < least:
                what = "`min_way`" if n_way is None else "`n_way`"
                raise ValueError(f"The {name} has {count} classes, fewer than {what}={least}: no episode can be drawn. "
                                 f"Lower {what} or add classes.")
        if n_shot is None and n_way is not None and n_way > rules.max_support:  # drawn ways are <= max_support already
            raise ValueError(f"Expected `max_support` to be >= the ways of an episode ({n_way}) so that every class gets "
                             f"a support item, but got {rules.max_support}.")

    def _label(self, c: int) -> str:
        return f"{self.class_names[c]!r} (index {c})" if self.class_names is not None else f"index {c}"

    def _check_sizes(self) -> None:
        """Every class must fill an episode: 2 images by the rule, more with a fixed shot or query."""
        hi = None if self.n_shot_range is None else self.n_shot_range[1]
        need = (2 if self.n_query is None else self.n_query + 1) if hi is None else hi + (self.n_query or 1)
        small = np.flatnonzero(self.class_sizes < need)
        if len(small):
            c = int(small[0])
            why = ("one support and one query item" if need == 2 else
                   f"n_shot={hi} support and {self.n_query or 1} query items" if hi is not None else
                   f"n_query={self.n_query} query items and a support item")
            more = f" ({len(small) - 1} more classes too)" if len(small) > 1 else ""
            have = int(self.class_sizes[c])
            raise ValueError(f"Class {self._label(c)} of the {self.name} has {have} image{'s' * (have != 1)}, but an episode "
                             f"needs {need} per class ({why}){more}. Remove such classes or add images.")

    def _set_groups(self, groups) -> None:
        named = groups.items() if isinstance(groups, Mapping) else enumerate(groups)
        for key, members in named:
            members = np.asarray(members, dtype=np.int64).reshape(-1)
            if members.size and (members.min() < 0 or members.max() >= len(self.class_sizes)):
                raise ValueError(f"Group {key!r} of the {self.name} lists class {members.max()}, but class indices run "
                                 f"from 0 to {len(self.class_sizes) - 1}.")
            if len(np.unique(members)) != len(members):
                raise ValueError(f"Group {key!r} of the {self.name} lists a class twice: give each class once.")
            if len(members) < self.rules.min_way:  # the reference refuses such a superclass too
                raise ValueError(f"Group {key!r} of the {self.name} has {len(members)} classes, fewer than `min_way`="
                                 f"{self.rules.min_way}: no episode can be drawn from it. Lower `min_way` or merge the "
                                 "group with another.")
            self.nodes.append(key)
            self.node_classes.append(members)
        if not self.nodes:
            raise ValueError(f"`groups` of the {self.name} is empty: give at least one group of classes, or None.")

    def _set_dag(self, dag: Mapping[Hashable, Sequence[Hashable]]) -> None:
        index = {n: i for i, n in enumerate(self.class_names)} if self.class_names is not None else None
        spans: dict[Hashable, frozenset[int]] = {}
        done = object()
        for root in dag:  # the leaves each node spans, depth first without recursion, refusing cycles
            path, stack = {root}, [(root, iter(dag[root]))]
            while stack:
                node, children = stack[-1]
                child = next(children, done)
                if child is done:  # every child is spanned: so is the node
                    stack.pop()
                    path.discard(node)
                    if dag.get(node):
                        spans[node] = frozenset().union(*(spans[ch] for ch in dag[node]))
                        continue
                    c = index.get(node) if index is not None else node
                    if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or not 0 <= c < len(self.class_sizes):
                        raise ValueError(f"Leaf {node!r} of the {self.name}'s `dag` is not a class: name every leaf in "
                                         "`class_names` (or use class indices as leaves).")
                    spans[node] = frozenset([int(c)])
                elif child in path:
                    raise ValueError(f"The {self.name}'s `dag` has a cycle through {child!r}: give a graph without "
                                     "cycles (children per node).")
                elif child not in spans:
                    path.add(child)
                    stack.append((child, iter(dag.get(child, ()))))
        internal = [n for n in dag if dag[n]]
        try:  # the reference visits nodes sorted by WordNet id
            internal = sorted(internal)  # type: ignore[type-var]
        except TypeError:
            internal = sorted(internal, key=str)
        for node in internal:
            if self.rules.min_way <= len(spans[node]) <= MAX_SPANNING_LEAVES:
                self.nodes.append(node)
                self.node_classes.append(np.array(sorted(spans[node]), dtype=np.int64))
        if not self.nodes:
            raise ValueError(f"No node of the {self.name}'s `dag` spans between `min_way`={self.rules.min_way} and "
                             f"{MAX_SPANNING_LEAVES} leaves: no episode can be drawn. Lower `min_way` or give a graph "
                             "whose internal nodes group its classes.")

    def plan(self, rng: np.random.Generator, items: bool = True) -> EpisodePlan:
        """One episode's plan, drawn from ``rng`` alone (in the reference's order: hierarchy coin, ways, classes,
        shot range, ``beta``, ``alpha_c``, then the items); with ``items=False`` the items are not drawn."""
        r, sizes = self.rules, self.class_sizes
        group = -1
        hierarchy = bool(self.nodes)
        if hierarchy and r.ignore_hierarchy_probability > 0 and rng.random() < r.ignore_hierarchy_probability:
            hierarchy = False
        if hierarchy:
            group = int(rng.integers(len(self.nodes)))
            members = self.node_classes[group]
            if self.is_dag:  # a DAG node gives all its leaves, max_way of them when it has more
                classes = rng.choice(members, r.max_way, replace=False) if len(members) > r.max_way else members
            else:
                way = int(rng.integers(r.min_way, min(r.max_way, len(members)) + 1))
                classes = rng.choice(members, way, replace=False)
        else:
            way = self.n_way if self.n_way is not None else int(rng.integers(r.min_way, min(r.max_way, len(sizes)) + 1))
            classes = rng.choice(len(sizes), way, replace=False)
        classes = np.asarray(classes, dtype=np.int64)
        n = sizes[classes]  # [N] images per class
        if self.n_query is not None:
            q = self.n_query
        elif self.n_shot_range is None:
            q = min(r.max_query, int((n // 2).min()))
        else:
            q = min(r.max_query, int(n.min()) - self.n_shot_range[1])
        if self.n_shot_range is not None:
            lo, hi = self.n_shot_range
            shots = np.full(len(classes), lo if lo == hi else int(rng.integers(lo, hi + 1)), dtype=np.int64)
        else:
            remaining = n - q  # [N] >= 1
            beta = rng.random()
            size = min(int(np.floor(beta * np.minimum(r.max_support_per_class, remaining) + 1).sum()), r.max_support)
            weights = n * np.exp(rng.uniform(r.min_log_weight, r.max_log_weight, size=len(n)))
            shots = np.minimum(np.floor(weights / weights.sum() * (size - len(n))).astype(np.int64) + 1, remaining)
        if not items:
            return EpisodePlan(classes, shots, q, group)
        need = shots + q  # [N]
        picks = draw_items(rng, n, need)  # [sum k_c + q], class by class
        within = np.arange(len(picks)) - np.repeat(np.cumsum(need) - need, need)  # position within its class
        in_support = within < np.repeat(shots, need)
        return EpisodePlan(classes, shots, q, group, picks[in_support], picks[~in_support])


def draw_items(rng: np.random.Generator, sizes: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``counts[c]`` distinct positions in ``0..sizes[c]-1`` per class, uniformly and in a uniformly random order,
    concatenated class by class: ``[sum counts]``. Vectorised over classes: a class that gives more than a quarter of
    its items sorts random keys over all of them (a few thousand at most); a larger class draws with replacement and
    redraws repeats until none is left (exact: the procedure commutes with any relabelling of a class's items, so
    every ordered choice of distinct items is equally likely)."""
    out = np.empty(int(counts.sum()), dtype=np.int64)
    dense = sizes <= 4 * counts
    owner = np.repeat(np.arange(len(sizes)), counts)  # [M] class of each output slot
    slot_dense = dense[owner]
    if slot_dense.any():
        n, m = sizes[dense], counts[dense]
        starts = np.cumsum(n) - n
        cls = np.repeat(np.arange(len(n)), n)  # [sum n]
        order = np.lexsort((rng.random(len(cls)), cls))  # class by class, random within each class
        first = np.repeat(starts, m) + np.arange(int(m.sum())) - np.repeat(np.cumsum(m) - m, m)
        out[slot_dense] = order[first] - np.repeat(starts, m)
    if not slot_dense.all():
        own = owner[~slot_dense]
        high = sizes[own]
        values = rng.integers(0, high)
        while True:
            keys = own * int(sizes.max()) + values
            order = np.argsort(keys, kind="stable")  # equal keys keep their slot order
            later = order[1:][keys[order[1:]] == keys[order[:-1]]]  # every repeat after a value's first slot
            if not len(later):
                break
            values[later] = rng.integers(0, high[later])
        out[~slot_dense] = values
    return out
