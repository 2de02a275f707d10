"""``torch.compile`` for the learners: what is compiled, how a failure or a numerical change falls back to eager, and
how compilations are counted.

A learner compiles its *cores*: the pure tensor functions its steps spend their time in (MAML: one task's, or a
vmapped chunk's, whole inner loop and query pass on ``torch.func``, so the second-order meta-gradient is the compiled
graph's ordinary backward; ProtoNet and the AttentionLearner: the meta-batch's forward from inputs to logits). The
steps around them (checks, metrics, logging, streamed meta-gradients) stay eager: they synchronise, branch on values
and call ``torch.autograd.grad``, which would break the graph in every step.

Three ways in, one mechanism (:meth:`~lightning_meta.MetaLearner.compiler`):

- ``MAML(..., compile=True)`` (or a dict of ``torch.compile`` arguments, e.g. ``{"mode": "reduce-overhead"}``);
- ``trainer.fit(torch.compile(learner))``: Lightning compiles ``forward`` and the step methods, which would trace the
  eager machinery and break the graph (and second-order MAML cannot differentiate twice through a compiled graph);
  the learner takes the compilation over when fit starts and compiles its cores with the same ``torch.compile``
  settings instead;
- ``MAML(torch.compile(backbone))``: the learner keeps the plain backbone (its checkpoint keys stay the plain ones)
  and compiles its cores with those settings.

Every core is compiled without graph breaks (``fullgraph=True`` where the options are the learner's own). Where
compilation fails, or the first compiled result for a new input signature differs from the eager one beyond
:data:`TOLERANCE` (its outputs, or their gradients where gradients flow: MAML's second-order backward), the core
runs eagerly from then on, after one warning that says why.
"""

from __future__ import annotations

import functools
import types
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from lightning_meta.checkpoint import rng_states, set_rng_states

# (rtol, atol) of the first-call check against eager, per output dtype, relative to the largest eager magnitude:
# compiled kernels reorder float sums (float32: relative differences ~1e-6 per op, ~1e-4 after a second-order inner
# loop through four conv layers); half types carry 8 to 11 bits. Under autocast the loosest of the output's dtype
# and autocast's applies (float32 logits computed in bfloat16 carry bfloat16's rounding)
TOLERANCE = {torch.float64: (1e-6, 1e-9), torch.float32: (1e-3, 1e-5), torch.bfloat16: (5e-2, 1e-3),
             torch.float16: (2e-2, 1e-3)}

Compiler = Callable[[Callable], Callable]


class CompileFallbackWarning(UserWarning):
    """A compiled core runs eagerly instead (compilation failed, or it changed the numbers)."""


def make_compiler(option: Union[bool, dict, None]) -> Optional[Compiler]:
    """The learner option ``compile``: ``False``/``None`` (eager), ``True`` (``torch.compile`` defaults) or a dict of
    ``torch.compile`` keyword arguments (``mode``, ``backend``, ``dynamic``, ``options``). Graph breaks are errors
    (``fullgraph=True``), so a core that cannot be captured whole falls back to eager with a warning; shapes are
    static (``dynamic=False``) unless the dict says otherwise."""
    if option is None or option is False:
        return None
    if option is True:
        option = {}
    if not isinstance(option, dict):
        raise TypeError(f"Expected `compile` to be a bool or a dict of torch.compile arguments (e.g. "
                        f"{{'mode': 'reduce-overhead'}}), but got {type(option).__name__}.")
    unknown = set(option) - {"mode", "backend", "dynamic", "options", "fullgraph"}
    if unknown:
        raise ValueError(f"Unknown torch.compile arguments in `compile`: {sorted(unknown)}; the accepted ones are "
                         "mode, backend, dynamic, options and fullgraph.")
    # static shapes unless asked: episode shapes are fixed, and a new one (a last, uneven chunk of tasks) gets a
    # graph of its own; torch 2.14's dynamic shapes under vmap fail on linear layers whose inputs have more than one
    # feature dimension ("Cannot call sizes() on tensor with symbolic sizes")
    return TorchCompile({"fullgraph": True, "dynamic": False, **option})


class TorchCompile:
    """``torch.compile(fn, **arguments)`` as an object a learner can be pickled with (``ddp_spawn``, ``deepcopy``)."""

    def __init__(self, arguments: dict) -> None:
        self.arguments = arguments

    def __call__(self, fn: Callable) -> Callable:
        return torch.compile(fn, **self.arguments)

    def __repr__(self) -> str:
        return f"TorchCompile({self.arguments})"


def unwrap_compiled(module: nn.Module) -> tuple[nn.Module, Optional[Compiler]]:
    """``(module, None)`` for a plain module; for the result of ``torch.compile(module)``, the plain module and a
    compiler with the same settings (its parameters keep their plain names, so checkpoints do not depend on it)."""
    if isinstance(module, torch._dynamo.eval_frame.OptimizedModule):
        return module._orig_mod, module.dynamo_ctx
    return module, None


@dataclass
class CompileCounts:
    """Compilations so far in this process: ``graphs`` captured, ``graph_breaks`` and ``recompiles`` (a guard
    failed, e.g. a new input shape). After warm-up, training with fixed episode shapes adds none of them."""

    graphs: int
    graph_breaks: int
    recompiles: int


def compile_counts() -> CompileCounts:
    """The process's :class:`CompileCounts` (from ``torch._dynamo``'s counters). Take one before and one after a
    run of steps to count what those steps compiled."""
    from torch._dynamo.utils import counters

    return CompileCounts(graphs=int(counters["stats"]["unique_graphs"]),
                         graph_breaks=int(sum(counters["graph_break"].values())),
                         recompiles=int(sum(counters["recompiles"].values())))


class CompiledFunction:
    """``fn`` compiled by ``compiler`` on first use. The first call with each new input signature (shapes, dtypes,
    devices, which inputs need gradients, gradient mode, autocast: what makes a compiled graph new, e.g. a last,
    uneven chunk of tasks) also runs ``fn`` eagerly from the same random state and compares every floating output
    and, where gradients flow, the gradients of those outputs (one random direction, the same for both) with respect
    to every input and parameter that requires them, taken through a second compiled call: what MAML needs from a
    compiled inner loop is its second-order backward. A mismatch (:data:`TOLERANCE`, :data:`GRADIENT_TOLERANCE`), or
    a failure to compile, makes this function run ``fn`` eagerly from then on, after one
    :class:`CompileFallbackWarning` naming ``name`` and the reason. An error that eager ``fn`` raises too (bad input)
    is raised as it is, not taken for a compiler failure."""

    def __init__(self, fn: Callable, compiler: Compiler, name: str, module: Optional[nn.Module] = None) -> None:
        self.fn, self.name, self.module = fn, name, module
        self.compiled: Optional[Callable] = compiler(_own_code(fn))
        self.checked: set = set()  # the input signatures whose first call was compared with eager
        self.reason: Optional[str] = None  # why it runs eagerly, once it does

    @property
    def eager(self) -> bool:
        """Whether this function has fallen back to eager."""
        return self.compiled is None

    def __call__(self, *args: Any) -> Any:
        if self.compiled is None:
            return self.fn(*args)
        original, key = args, _signature(args)
        first = key not in self.checked
        state = rng_states() if first else {}
        before = _buffers(self.module) if first else []
        try:
            with _eager_random():
                out = self.compiled(*args)
        except Exception as error:  # noqa: BLE001 -- decided below: eager raises too (bad input) or falls back
            if first:
                set_rng_states(state)
                _load_buffers(self.module, before)
            try:
                out = self.fn(*args)
            except Exception as eager_error:  # bad input: the eager error, without the compiler's around it
                raise eager_error.with_traceback(eager_error.__traceback__) from None
            return self._fall_back(f"torch.compile failed: {type(error).__name__}: {_first_line(error)}", out)
        if not first:
            return out
        self.checked.add(key)
        after, updated = rng_states(), _buffers(self.module)
        set_rng_states(state)
        _load_buffers(self.module, before)  # the reference starts where the compiled call started...
        # the check differentiates copies of the inputs cut from their history (the caller's graph stays whole)
        args, leaves = self._differentiable(args)
        with torch.enable_grad() if leaves else torch.no_grad():
            reference = self.fn(*(args if leaves else _detached(args)))
        directions = _directions(reference) if leaves else []
        expected = _gradients(reference, leaves, directions) if leaves else None  # before any buffer changes again
        got = None
        if leaves:  # the gradients from a second compiled call: the caller's backward runs on the first one's graph
            set_rng_states(state)  # (inductor's backward may not keep its graph for a second backward)
            _load_buffers(self.module, before)
            with _eager_random():
                got = _gradients(self.compiled(*args), leaves, directions)
        set_rng_states(after)
        _load_buffers(self.module, updated)  # ...and the buffers (batch norm statistics) are updated once
        autocast = _autocast_dtypes()
        problem = _difference(out, reference, autocast)
        if not problem and got is not None and expected is not None:
            problem = _gradient_difference(got, expected, autocast)
        if not problem:
            return out
        set_rng_states(state)  # the eager result from the same random state, as if compilation had not been asked
        _load_buffers(self.module, before)
        return self._fall_back(problem, self.fn(*original))

    def _differentiable(self, args: tuple) -> tuple[tuple, list[Tensor]]:
        """``args`` with every input that has a history (e.g. ANIL's embeddings, a learned rate picked by step) as a
        copy cut from it, and the tensors gradients flow to: those copies, the leaf inputs and the parameters that
        require gradients (none without gradient mode)."""
        if not torch.is_grad_enabled():
            return args, []
        cut = _map(lambda t: t.detach().requires_grad_() if t.requires_grad and not t.is_leaf else t, args)
        found: dict[int, Tensor] = {}
        params = list(self.module.parameters()) if self.module is not None else []
        for t in [*_leaves(cut), *params]:
            if t.requires_grad and t.is_floating_point():
                found.setdefault(id(t), t)
        return cut, list(found.values())

    def _fall_back(self, reason: str, out: Any) -> Any:
        self.compiled, self.reason = None, reason
        warnings.warn(f"{self.name} runs eagerly: {reason}.", CompileFallbackWarning, stacklevel=3)
        return out


class CompiledCores(nn.Module):
    """The compilation side of a learner (mixed into :class:`~lightning_meta.MetaLearner`): which compiler its cores
    use, the cores made so far and their fallbacks, and ``torch.compile(learner)`` turned into compiled cores."""

    def __init__(self, compile: Any = False) -> None:  # noqa: A002 -- the name users know from torch.compile
        super().__init__()
        self._compiler: Optional[Compiler] = make_compiler(compile)
        self._compiled: dict[str, CompiledFunction] = {}

    @property
    def compiler(self) -> Optional[Compiler]:
        """What compiles the learner's cores (``fn -> compiled fn``), or ``None`` when it runs eagerly."""
        return self._compiler

    def use_compiler(self, compiler: Optional[Compiler]) -> None:
        """Compile the cores with ``compiler`` from now on (``None``: eager); cores compiled with another compiler
        before are dropped (the same one keeps them: ``trainer.test(torch.compile(learner))`` after ``fit``)."""
        if compiler is not self._compiler:
            self._compiler, self._compiled = compiler, {}

    def plain_backbone(self, backbone: nn.Module) -> nn.Module:
        """``backbone`` itself, or for ``torch.compile(backbone)`` the module it wraps, the learner then compiling its
        cores with the same settings (unless ``compile`` chose its own): parameter names and checkpoints stay plain."""
        plain, compiler = unwrap_compiled(backbone)
        if compiler is not None and self._compiler is None:
            self.use_compiler(compiler)
        return plain

    def compiled(self, name: str, fn: Callable) -> Callable:
        """``fn`` compiled (a :class:`CompiledFunction`, made once per ``name``) when the learner compiles, else
        ``fn``. ``fn`` must be a pure tensor function of its arguments and the parameters."""
        if self._compiler is None:
            return fn
        if name not in self._compiled:
            self._compiled[name] = CompiledFunction(fn, self._compiler, f"{type(self).__name__}'s compiled {name}",
                                                    self)
        return self._compiled[name]

    def compiled_cores(self) -> list[str]:
        """The names of the cores made so far for compilation (compiled, or run eagerly after a fallback)."""
        return list(self._compiled)

    def compiled_fallbacks(self) -> dict[str, str]:
        """The cores that fell back to eager, with the reason (empty when all compiled cores run compiled)."""
        return {name: f.reason for name, f in self._compiled.items() if f.eager and f.reason}

    def __getstate__(self) -> dict:  # compiled functions are rebuilt on use, not pickled or deep-copied
        return {**super().__getstate__(), "_compiled": {}}

    @torch.compiler.disable
    def _forward_compiled_by_caller(self, batch: Any) -> Any:
        """What ``forward`` runs when ``torch.compile(learner)`` traces it: the learner compiles its cores instead
        (with ``torch.compile``'s defaults unless it has a compiler) and runs its checks eagerly."""
        if self._compiler is None:
            rank_zero_info(f"torch.compile({type(self).__name__}) was called: the learner compiles its cores "
                           "(MAML: the inner loop; see lightning_meta.compile) with torch.compile's defaults and runs "
                           "its checks eagerly. For other settings pass compile={...} to the learner.")
            self.use_compiler(make_compiler(True))
        return self.forward(batch)


def _signature(args: tuple) -> tuple:
    """What makes a call new to a compiled graph: each input's shape, dtype, device and whether it needs gradients
    (other values as they are), the gradient mode and autocast's dtypes."""

    def describe(value: Any) -> Any:
        if isinstance(value, Tensor):
            return ("tensor", tuple(value.shape), value.dtype, value.device.type, value.requires_grad)
        if isinstance(value, dict):
            return tuple((k, describe(v)) for k, v in value.items())
        if isinstance(value, (list, tuple)):
            return tuple(describe(v) for v in value)
        return repr(value)

    return describe(args), torch.is_grad_enabled(), tuple(_autocast_dtypes())


# the largest relative difference ||compiled - eager|| / ||eager|| of the gradient of a compiled core's outputs
# (one vector over every input and parameter), per dtype, the loosest of the gradient's and autocast's: a second-order
# gradient through a few layers sums many rounding errors, and its small entries (a bias before batch norm, whose true
# gradient is 0) carry only rounding, so the whole vector's norm is the scale. Measured on CPU (tests/test_compile.py's
# Conv4 MAML, compiled vs eager): float32 1e-6; bfloat16 autocast 0.005 on the task loop, 0.19 under vmap (batch
# norm's float32 island reorders more there), so under half types only gross errors show
GRADIENT_TOLERANCE = {torch.float64: 1e-7, torch.float32: 1e-3, torch.bfloat16: 0.35, torch.float16: 0.35}


def _gradient_difference(got: Tensor, want: Tensor, autocast: Sequence[torch.dtype] = ()) -> Optional[str]:
    """Why the compiled gradient vector ``got`` is not eager's ``want`` within :data:`GRADIENT_TOLERANCE`, or
    ``None``."""
    tolerance = max([GRADIENT_TOLERANCE.get(want.dtype, GRADIENT_TOLERANCE[torch.float32]),
                     *(GRADIENT_TOLERANCE[d] for d in autocast)])
    if not torch.equal(torch.isfinite(got), torch.isfinite(want)):
        return "its gradient is non-finite in other places than eager's"
    ok = torch.isfinite(want)
    a, b = got[ok].double(), want[ok].double()
    relative = ((a - b).norm() / b.norm().clamp_min(1e-300)).item()
    if relative > tolerance:
        return (f"its gradient (of every input and parameter, in one random direction of its outputs) differs from "
                f"eager's by {relative:.3g} of its norm (tolerance {tolerance})")
    return None


def _directions(reference: Any) -> list[Optional[Tensor]]:
    """One fixed random direction per differentiable floating output of ``reference`` (zero where it is not finite,
    e.g. a diverged task), ``None`` for the others: the same for the compiled and the eager outputs."""
    generator = torch.Generator().manual_seed(0)
    directions: list[Optional[Tensor]] = []
    for b in _leaves(reference):
        if not (b.is_floating_point() and b.requires_grad):
            directions.append(None)
            continue
        v = torch.randn(b.shape, generator=generator, dtype=torch.float64).to(device=b.device, dtype=b.dtype)
        directions.append(torch.where(torch.isfinite(b.detach()), v, torch.zeros_like(v)))
    return directions


def _gradients(outputs: Any, leaves: list[Tensor], directions: list[Optional[Tensor]]) -> Tensor:
    """The gradient of ``outputs`` in ``directions`` with respect to ``leaves``, as one float64 vector (one scale for
    the whole gradient: a parameter whose true gradient is zero, a bias before batch norm, carries only rounding)."""
    dtype = functools.reduce(torch.promote_types, [p.dtype for p in leaves])  # compared at the leaves' precision
    pairs = [(o.nan_to_num(), v) for o, v in zip(_leaves(outputs), directions) if v is not None and o.requires_grad]
    if not pairs:
        return torch.zeros(sum(p.numel() for p in leaves), dtype=dtype)
    grads = torch.autograd.grad([o for o, _ in pairs], leaves, [v for _, v in pairs], allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).detach().to(dtype).flatten().cpu()
                      for g, p in zip(grads, leaves)])


def _own_code(fn: Callable) -> Callable:
    """``fn`` behind a function whose code object is this one's alone. Dynamo keeps compiled graphs, and counts
    recompilations against its limit (8), per code object: without this, every learner of a process (a sweep, the
    stages of a recipe, a test suite) would add its graphs to the same code object's cache, and the ninth would stop
    compiling."""

    def call(*args: Any) -> Any:
        return fn(*args)

    return types.FunctionType(call.__code__.replace(), call.__globals__, call.__name__, None, call.__closure__)


def _buffers(module: Optional[nn.Module]) -> list[Tensor]:
    return [b.detach().clone() for b in module.buffers()] if module is not None else []


def _load_buffers(module: Optional[nn.Module], values: list[Tensor]) -> None:
    if module is not None:
        with torch.no_grad():
            for b, v in zip(module.buffers(), values):
                b.copy_(v)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else ""


def _detached(args: tuple) -> tuple:
    return tuple(_map(lambda t: t.detach(), a) for a in args)


def _map(fn: Callable, value: Any) -> Any:
    if isinstance(value, Tensor):
        return fn(value)
    if isinstance(value, dict):
        return {k: _map(fn, v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_map(fn, v) for v in value)
    return value


def _leaves(value: Any) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _leaves(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _leaves(v)]
    return []


def _autocast_dtypes() -> list[torch.dtype]:
    """The reduced dtypes autocast computes in now (a float32 output then carries their rounding)."""
    dtypes = []
    for device in ("cpu", "cuda"):
        try:
            if torch.is_autocast_enabled(device):
                dtypes.append(torch.get_autocast_dtype(device))
        except (TypeError, RuntimeError, AttributeError):  # torch < 2.4, or no CUDA build
            continue
    return dtypes


def _difference(out: Any, reference: Any, autocast: Sequence[torch.dtype] = ()) -> Optional[str]:
    """Why ``out`` (compiled) is not ``reference`` (eager) within :data:`TOLERANCE` (the loosest of the output's
    dtype and the ``autocast`` dtypes it was computed in), or ``None``."""
    got, want = _leaves(out), _leaves(reference)
    if len(got) != len(want):
        return f"it returned {len(got)} tensors where eager returns {len(want)}"
    for i, (a, b) in enumerate(zip(got, want)):
        if a.shape != b.shape:
            return f"output {i} has shape {tuple(a.shape)} where eager gives {tuple(b.shape)}"
        if not b.is_floating_point():
            if not torch.equal(a, b):
                return f"output {i} ({b.dtype}) differs from eager"
            continue
        rtol, atol = TOLERANCE.get(b.dtype, TOLERANCE[torch.float32])
        for dtype in autocast:
            rtol, atol = max(rtol, TOLERANCE[dtype][0]), max(atol, TOLERANCE[dtype][1])
        a, b = a.detach().double(), b.detach().double()
        finite = torch.isfinite(b)
        if not torch.equal(finite, torch.isfinite(a)):
            return f"output {i} is non-finite in other places than eager's"
        if finite.any():
            error = (a[finite] - b[finite]).abs().max().item()
            bound = atol + rtol * b[finite].abs().max().item()
            if error > bound:
                return (f"output {i} differs from eager by {error:.3g} (tolerance {bound:.3g}: rtol {rtol} of the "
                        f"largest value plus atol {atol})")
    return None


def _eager_random():
    """Inductor draws random numbers (dropout) with its own generator unless told to use eager's: with eager's, a
    compiled step consumes and produces the same random numbers as the eager one, so the first-call check, resumed
    runs and compiled-vs-eager comparisons hold with dropout on."""
    import torch._inductor.config as inductor_config

    return inductor_config.patch(fallback_random=True)


def eager_for_ragged(learner: CompiledCores, core: str) -> None:
    """A learner that compiles its cores runs ``core`` eagerly on ragged meta-batches (every new mix of task shapes
    would be a new static-shape graph, compiled and checked against eager again): said once per learner and core
    with a :class:`~lightning_meta.compile.CompileFallbackWarning`; fixed-shape meta-batches stay compiled."""
    said = learner.__dict__.setdefault("_ragged_eager", set())
    if learner.compiler is not None and core not in said:
        said.add(core)
        warnings.warn(f"{type(learner).__name__}'s compiled {core} runs eagerly on ragged meta-batches (tasks of "
                      "different shapes would compile a graph per mix of shapes); fixed-shape meta-batches stay "
                      "compiled.", CompileFallbackWarning, stacklevel=3)
