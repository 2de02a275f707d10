"""Backbones: ordinary ``nn.Module``s passed to learners."""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from lightning_meta._checks import check_choice
from lightning_meta.checkpoint import read_checkpoint


class Backbone(nn.Module):
    """``features`` maps inputs to a flat embedding ``[B, D]``; ``head`` (a Linear, or None) maps it to outputs.

    A backbone remembers the arguments it was built with (``init_args``), so a learner's checkpoint can rebuild it:
    ``Learner.load_from_checkpoint(path)`` needs no backbone argument for these (see :func:`backbone_spec`).

    Every backbone also takes ``pretrained=PATH``: after it is built, its weights are loaded from that checkpoint with
    :func:`load_pretrained` (a :class:`~lightning_meta.Pretrainer`'s, or any learner's). It is what a config file
    writes to start episodic training from a pretraining run, e.g. ``Conv4(pretrained="pretrain.ckpt")``; it is not
    recorded in ``init_args`` (the learner's own checkpoint holds the weights after that).
    """

    features: nn.Module
    head: Optional[nn.Linear]
    embedding_dim: int
    init_args: dict[str, Any]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__init__" not in cls.__dict__:
            return
        init = cls.__dict__["__init__"]
        signature = inspect.signature(init)

        @functools.wraps(init)
        def __init__(self, *args: Any, pretrained: Optional[str] = None, **kw: Any) -> None:
            init(self, *args, **kw)  # the outermost constructor finishes last: its arguments are the ones kept
            bound = signature.bind(self, *args, **kw)
            bound.apply_defaults()
            self.init_args = {k: v for k, v in list(bound.arguments.items())[1:]}
            if pretrained is not None:
                load_pretrained(self, pretrained)

        # the signature tools read (LightningCLI, jsonargparse): the constructor's own, and `pretrained`
        extra = inspect.Parameter("pretrained", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Optional[str])
        params = list(signature.parameters.values())
        at = next((i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_KEYWORD), len(params))
        __init__.__signature__ = signature.replace(parameters=params[:at] + [extra] + params[at:])  # type: ignore[attr-defined]
        cls.__init__ = __init__  # type: ignore[method-assign]

    def forward_features(self, x: Tensor) -> Tensor:
        return self.features(x)

    def forward(self, x: Tensor) -> Tensor:
        z = self.features(x)
        return z if self.head is None else self.head(z)


def backbone_spec(module: nn.Module) -> Optional[dict[str, Any]]:
    """``{"class_path": ..., "init_args": {...}}`` that rebuilds ``module`` (as in a LightningCLI config), or ``None``
    for a module that did not record its arguments (any ``nn.Module`` other than a :class:`Backbone`).

    Example:
        >>> spec = backbone_spec(MLP(4, (16,), 3))
        >>> spec["class_path"], spec["init_args"]["hidden"]
        ('lightning_meta.models.MLP', (16,))
        >>> build_backbone(spec)(torch.zeros(2, 4)).shape
        torch.Size([2, 3])
    """
    args = getattr(module, "init_args", None)
    if not isinstance(module, Backbone) or not isinstance(args, dict):
        return None
    cls = type(module)
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": dict(args)}


def build_backbone(spec: dict[str, Any]) -> nn.Module:
    """The module :func:`backbone_spec` describes (fresh weights: a checkpoint's state dict fills them)."""
    module_name, _, name = spec["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module_name), name)
    return cls(**spec["init_args"])


def load_pretrained(module: nn.Module, checkpoint: str | Path) -> nn.Module:
    """Load a backbone's weights from a checkpoint and return the module.

    ``checkpoint`` is a learner's Lightning checkpoint (its ``backbone.*`` tensors are read: a
    :class:`~lightning_meta.Pretrainer`'s, a ProtoNet's...) or a plain state dict of the module. Tensors the module
    has and the file lacks (a MAML classifier head over a pretrained body) keep their initialisation; tensors of a
    different shape are an error naming them (another architecture), as is a file that shares no tensor with the module.
    What was loaded and what was not is reported in one log line.

    Example:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "body.pt")
        >>> torch.save({f"backbone.{k}": v for k, v in MLP(4, (8,)).state_dict().items()}, path)
        >>> net = MLP(4, (8,), out_features=3, pretrained=path)        # body from the file, head freshly initialised
        >>> sorted(load_pretrained(MLP(4, (8,)), path).state_dict()) == sorted(MLP(4, (8,)).state_dict())
        True
    """
    saved = read_checkpoint(checkpoint, map_location="cpu", weights_only=True)
    state = saved.get("state_dict", saved) if isinstance(saved, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{checkpoint} holds no state dict: pass a learner's checkpoint or a module's state_dict().")
    if any(k.startswith("backbone.") for k in state):
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    own = module.state_dict()
    wrong = [f"{k} {tuple(v.shape)} in the file, {tuple(own[k].shape)} here" for k, v in state.items()
             if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if wrong:
        raise ValueError(
            f"The pretrained weights in {checkpoint} do not fit this {type(module).__name__}: "
            + "; ".join(wrong[:4]) + ("..." if len(wrong) > 4 else "")
            + ". Build the backbone with the same architecture arguments as the pretraining run."
        )
    shared = [k for k in own if k in state]
    if not shared:
        raise ValueError(
            f"{checkpoint} shares no tensor with this {type(module).__name__} (the file has e.g. "
            f"{', '.join(list(state)[:3]) or 'nothing'}; the module {', '.join(list(own)[:3])}): it is not a "
            "checkpoint of this backbone."
        )
    module.load_state_dict({k: state[k] for k in shared}, strict=False)
    kept = [k for k in own if k not in state]
    unused = [k for k in state if k not in own]
    rank_zero_info(
        f"{type(module).__name__}: loaded {len(shared)} pretrained tensors from {checkpoint}"
        + (f"; kept the initialisation of {', '.join(kept)}" if kept else "")
        + (f"; not used from the file: {', '.join(unused)}" if unused else "")
    )
    return module


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2))


class Conv4(Backbone):
    """The 4 x [conv3x3-BN-ReLU-maxpool2] network of Vinyals et al. (2016), Finn et al. (2017), Snell et al. (2017).

    Args:
        in_channels: input channels (1 for Omniglot, 3 for miniImageNet).
        hidden: channels of every block (64 in the papers; 32 for MAML on miniImageNet).
        out_features: ``None`` gives the flattened embedding (ProtoNet, AttentionLearner); an int adds a linear head
            (MAML family: the number of ways).
        image_size: input side, to size the flattened embedding (28 -> 1x1, 84 -> 5x5 spatial).

    Example:
        >>> Conv4(out_features=5)(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 5])
        >>> Conv4(in_channels=3, image_size=84).embedding_dim
        1600
    """

    def __init__(self, in_channels: int = 1, hidden: int = 64, out_features: Optional[int] = None,
                 image_size: int = 28) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _conv_block(in_channels, hidden), _conv_block(hidden, hidden), _conv_block(hidden, hidden),
            _conv_block(hidden, hidden), nn.Flatten(),
        )
        side = image_size
        for _ in range(4):
            side //= 2
        if side < 1:
            raise ValueError(f"Conv4 halves the image four times: `image_size` must be at least 16, got {image_size}.")
        self.embedding_dim = hidden * side * side
        self.head = nn.Linear(self.embedding_dim, out_features) if out_features is not None else None


class MLP(Backbone):
    """Fully connected ReLU network (the MAML paper's sinusoid regressor is ``MLP(1, (40, 40), 1)``).

    ``init="reference"`` initialises as the MAML authors' code does (weights ~ truncated normal with std 0.01, zero
    biases) instead of PyTorch's default.

    Example:
        >>> MLP(1, (40, 40), 1)(torch.zeros(10, 1)).shape
        torch.Size([10, 1])
    """

    def __init__(self, in_features: int, hidden: Sequence[int] = (40, 40), out_features: Optional[int] = None,
                 init: str = "torch") -> None:
        super().__init__()
        check_choice("init", init, ("torch", "reference"))
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.features = nn.Sequential(*layers)
        self.embedding_dim = width
        self.head = nn.Linear(width, out_features) if out_features is not None else None
        if init == "reference":  # Finn et al.'s code: weights ~ truncated normal (std 0.01, cut at 2 std), zero biases
            for layer in self.modules():
                if isinstance(layer, nn.Linear):
                    nn.init.trunc_normal_(layer.weight, std=0.01, a=-0.02, b=0.02)
                    nn.init.zeros_(layer.bias)


class _ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.LeakyReLU(0.1),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.LeakyReLU(0.1),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
        )
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.out = nn.Sequential(nn.LeakyReLU(0.1), nn.MaxPool2d(2))

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.body(x) + self.shortcut(x))


class ResNet12(Backbone):
    """ResNet-12 of Oreshkin et al. (2018) / Lee et al. (2019): four residual blocks, global average pooling.

    Example:
        >>> ResNet12(channels=(8, 16, 32, 64))(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 64])
    """

    def __init__(self, in_channels: int = 3, channels: Sequence[int] = (64, 160, 320, 640),
                 out_features: Optional[int] = None) -> None:
        super().__init__()
        blocks, width = [], in_channels
        for c in channels:
            blocks.append(_ResBlock(width, c))
            width = c
        self.features = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.embedding_dim = width
        self.head = nn.Linear(width, out_features) if out_features is not None else None


__all__ = ["MLP", "Backbone", "Conv4", "ResNet12", "backbone_spec", "build_backbone"]
