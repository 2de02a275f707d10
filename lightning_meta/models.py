"""Backbones: ordinary ``nn.Module``s passed to learners."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
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
    recorded = getattr(module, "lightning_meta_spec", None)  # timm_backbone(), torchvision_backbone()
    if isinstance(recorded, dict):
        return {"class_path": recorded["class_path"], "init_args": dict(recorded["init_args"])}
    timm_spec = _timm_spec(module)
    if timm_spec is not None:
        return timm_spec
    args = getattr(module, "init_args", None)
    if not isinstance(module, Backbone) or not isinstance(args, dict):
        return None
    cls = type(module)
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": dict(args)}


def _timm_spec(module: nn.Module) -> Optional[dict[str, Any]]:
    """What rebuilds a model made by ``timm.create_model`` itself: its architecture, ``num_classes`` and input
    channels (the arguments that shape its weights; others, such as drop rates, are not recorded: build it with
    :func:`timm_backbone` to record them all)."""
    cfg = getattr(module, "pretrained_cfg", None)
    if not type(module).__module__.startswith("timm.") or not isinstance(cfg, dict) or "architecture" not in cfg:
        return None
    conv = next((m for m in module.modules() if isinstance(m, nn.Conv2d)), None)
    args: dict[str, Any] = {"model_name": cfg["architecture"], "num_classes": getattr(module, "num_classes", 0)}
    if conv is not None:
        args["in_chans"] = conv.in_channels
    return {"class_path": "timm.create_model", "init_args": args}


def embedding_width(module: nn.Module) -> Optional[int]:
    """The width D of a backbone's flat embedding when the model states it: ``embedding_dim`` (this module's
    backbones, :func:`torchvision_backbone`) or timm's ``num_features`` (a ``timm.create_model(..., num_classes=0)``
    model returns its pooled features); ``None`` otherwise (see :func:`infer_embedding_width`)."""
    for name in ("embedding_dim", "num_features"):
        value = getattr(module, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            if name == "num_features" and getattr(module, "num_classes", None):
                return None  # a timm model with a classifier returns class logits, not its features
            return value
    return None


def infer_embedding_width(module: nn.Module, example: Tensor) -> int:
    """D from :func:`embedding_width`, else from one forward of ``example`` (one input, no batch dimension) in
    evaluation mode without gradients (batch-norm statistics are not touched)."""
    width = embedding_width(module)
    if width is not None:
        return width
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            out = module(example[None])
    finally:
        module.train(was_training)
    if not isinstance(out, Tensor) or out.dim() < 2:
        raise TypeError(f"{type(module).__name__} returned {type(out).__name__} "
                        f"{tuple(out.shape) if isinstance(out, Tensor) else ''} for one input: a backbone maps [n, ...] "
                        "inputs to embeddings [n, D].")
    return int(out.flatten(1).shape[1])


def timm_backbone(model_name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """``timm.create_model(model_name, num_classes=0, pretrained=pretrained, **kwargs)``: a timm model returning its
    pooled features, with its name and arguments recorded so that a learner's checkpoint rebuilds it
    (``load_from_checkpoint(path)`` alone). A model made by ``timm.create_model`` directly works too and is rebuilt
    from its architecture, ``num_classes`` and input channels. Needs ``pip install 'lightning-meta[timm]'``.

    ``pretrained=True`` loads timm's weights for the name (its tag picks them: ``"vit_small_patch16_224.dino"``) from
    the Hugging Face hub, or from a local file with ``pretrained_cfg_overlay={"file": path}`` (timm adapts the first
    convolution to ``in_chans`` and drops a classifier of another ``num_classes``); ``checkpoint_path=`` loads a
    state dict after building. The weights are loaded once, here: the recorded arguments rebuild the architecture
    without them (no download, no file; the learner's checkpoint holds the weights). The model then carries the
    weights' input normalisation (``pretrained_cfg`` mean and std, averaged over channels when ``in_chans`` differs),
    which every learner applies on the device by default (see :func:`input_normalization`).

    Example:
        >>> net = timm_backbone("resnet10t", in_chans=1) if importlib.util.find_spec("timm") else None
        >>> net is None or (net(torch.zeros(2, 1, 32, 32)).shape, embedding_width(net)) == (torch.Size([2, 512]), 512)
        True
    """
    try:
        import timm
    except ImportError as err:
        raise ImportError("timm backbones need timm: pip install 'lightning-meta[timm]'.") from err
    kwargs.setdefault("num_classes", 0)
    model = timm.create_model(model_name, pretrained=pretrained, **kwargs)
    args = {k: _without_weights(v) if k in ("pretrained_cfg_overlay", "pretrained_cfg") else v
            for k, v in kwargs.items() if k != "checkpoint_path"}
    args = {k: v for k, v in args.items() if v != {}}  # an overlay that only named the file
    _record_spec(model, "timm.create_model", {"model_name": model_name, **args})
    if pretrained or kwargs.get("checkpoint_path"):
        cfg = getattr(model, "pretrained_cfg", None) or {}
        _check_rebuilds(model)
        record_input_normalization(model, _fit_channels(cfg.get("mean"), cfg.get("std"), _in_channels(model)))
    return model


def _without_weights(cfg: Any) -> Any:
    """A timm ``pretrained_cfg`` (overlay) without the local source of its weights (a file, a state dict)."""
    return {k: v for k, v in cfg.items() if k not in ("file", "state_dict")} if isinstance(cfg, dict) else cfg


def _in_channels(model: nn.Module) -> Optional[int]:
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return conv.in_channels if conv is not None else None


def _fit_channels(mean: Any, std: Any, channels: Optional[int]) -> Optional[tuple[tuple[float, ...], tuple[float, ...]]]:
    """Per-channel ``(mean, std)`` of pretrained weights, averaged to one value when the model takes another number
    of input channels than the weights were trained on (timm sums a first convolution's weights for ``in_chans=1``)."""
    if mean is None or std is None:
        return None
    m, s = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    if channels is not None and len(m) not in (1, channels):
        m, s = (sum(m) / len(m),), (sum(s) / len(s),)
    return m, s


def torchvision_backbone(name: str, features_only: bool = True, weights: Any = None, **kwargs: Any) -> nn.Module:
    """A torchvision classification model (``torchvision.models.get_model(name, weights=weights, **kwargs)``) with
    its final linear classifier replaced by ``nn.Identity``, so it returns its pooled features; ``embedding_dim`` is
    set and the arguments are recorded (a learner's checkpoint rebuilds it). ``features_only=False`` keeps the
    classifier (e.g. ``num_classes=5`` for MAML, which adapts the whole network).

    ``weights`` (a weights enum or its name: ``"DEFAULT"``, ``"IMAGENET1K_V1"``) loads torchvision's pretrained
    weights once, here, through torch.hub's cache (``$TORCH_HOME/hub/checkpoints``); the recorded arguments rebuild
    the architecture without them (no download: the learner's checkpoint holds the weights). The model then carries
    the mean and std of the weights' ``transforms()``, which every learner applies on the device by default (see
    :func:`input_normalization`).

    Example:
        >>> net = torchvision_backbone("resnet18")
        >>> net(torch.zeros(2, 3, 32, 32)).shape, net.embedding_dim
        (torch.Size([2, 512]), 512)
    """
    try:
        from torchvision import models
    except ImportError as err:
        raise ImportError("torchvision backbones need torchvision: pip install 'lightning-meta[vision]'.") from err
    enum = None
    if weights is not None:
        kind = models.get_model_weights(name)
        try:
            enum = kind.verify(weights)
        except KeyError:
            raise ValueError(f"torchvision's {name} has no weights {weights!r}: pass one of "
                             f"{', '.join(['DEFAULT', *(w.name for w in kind)])}.") from None
    model = models.get_model(name, weights=enum, **kwargs)
    args = {"name": name, "features_only": features_only, **kwargs, **_weight_arguments(name, enum, kwargs)}
    _record_spec(model, "lightning_meta.models.torchvision_backbone", args)
    if enum is not None:
        _check_rebuilds(model, features_only=False)
        preset = enum.transforms()
        record_input_normalization(model, _fit_channels(getattr(preset, "mean", None), getattr(preset, "std", None),
                                                        _in_channels(model)))
    if not features_only:
        return model
    for attr in ("fc", "classifier", "heads", "head"):
        parent = getattr(model, attr, None)
        if isinstance(parent, nn.Linear):
            model.embedding_dim = parent.in_features
            setattr(model, attr, nn.Identity())
            break
        if isinstance(parent, nn.Sequential) and len(parent) and isinstance(parent[-1], nn.Linear):
            model.embedding_dim = parent[-1].in_features
            parent[-1] = nn.Identity()
            break
    else:
        raise ValueError(f"torchvision's {name} has no final linear classifier (fc, classifier, heads) to remove.")
    return model


def _weight_arguments(name: str, weights: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The architecture arguments torchvision's builders set from pretrained ``weights`` (so that the recorded
    arguments rebuild the same network without them); nothing without weights."""
    if weights is None:
        return {}
    meta, args = weights.meta, {}
    if "categories" in meta:
        args["num_classes"] = len(meta["categories"])
    if name.startswith("vit_"):
        args["image_size"] = meta["min_size"][0]
    if name.startswith("maxvit"):
        args["input_size"] = meta["min_size"]
    if name in ("inception_v3", "googlenet"):  # their builders drop the auxiliary heads again after loading
        args.update(transform_input=kwargs.get("transform_input", True), aux_logits=kwargs.get("aux_logits", False),
                    init_weights=False)
    return args


def _check_rebuilds(model: nn.Module, features_only: bool = True) -> None:
    """The recorded arguments rebuild ``model``'s architecture without its weights: the same tensors, of the same
    shapes (built on the meta device: nothing allocated, nothing downloaded)."""
    spec = backbone_spec(model)
    if spec is None:
        return
    if "features_only" in spec["init_args"]:
        spec["init_args"]["features_only"] = features_only
    with torch.device("meta"):
        rebuilt = build_backbone(spec)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
    if want != got:
        differ = sorted(set(want.items()) ^ set(got.items()))[:3]
        raise ValueError(f"{spec['init_args']} without the pretrained weights builds another architecture than with "
                         f"them (e.g. {differ}): pass the architecture arguments the weights set explicitly.")


def build_backbone(spec: dict[str, Any]) -> nn.Module:
    """The module :func:`backbone_spec` describes (fresh weights: a checkpoint's state dict fills them)."""
    module_name, _, name = spec["class_path"].rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except ImportError as err:
        raise ImportError(f"The checkpoint's backbone is {spec['class_path']}, whose package is not installed ({err}): "
                          "install it, or pass the backbone: load_from_checkpoint(path, backbone=...).") from err
    model = cls(**spec["init_args"])
    if spec["class_path"] == "timm.create_model":  # recorded again, so a reloaded learner saves the same spec
        _record_spec(model, spec["class_path"], dict(spec["init_args"]))
    return model


def _record_spec(model: nn.Module, class_path: str, init_args: dict[str, Any]) -> None:
    """Record how to build ``model`` again (read by :func:`backbone_spec`): a plain attribute, not a submodule."""
    vars(model)["lightning_meta_spec"] = {"class_path": class_path, "init_args": init_args}


Normalization = tuple[tuple[float, ...], tuple[float, ...]]


def input_normalization(module: nn.Module) -> Optional[Normalization]:
    """The ``(mean, std)`` per input channel that ``module``'s weights expect of inputs in [0, 1], or ``None``: set
    by :func:`timm_backbone` and :func:`torchvision_backbone` with pretrained weights, by ``Backbone(pretrained=PATH)``
    from the learner that saved ``PATH``, and by a learner on its backbone (its ``normalize``). A learner's
    ``normalize="auto"`` (the default) applies it on the device.

    Example:
        >>> net = record_input_normalization(MLP(4, (8,)), ((0.5,), (0.25,)))
        >>> input_normalization(net), input_normalization(MLP(4, (8,)))
        (((0.5,), (0.25,)), None)
    """
    return vars(module).get("lightning_meta_normalize")


def record_input_normalization(module: nn.Module, normalization: Optional[Normalization]) -> nn.Module:
    """Record what :func:`input_normalization` returns for ``module`` (a plain attribute: not in its state dict)."""
    vars(module)["lightning_meta_normalize"] = normalization
    return module


def load_pretrained(module: nn.Module, checkpoint: str | Path) -> nn.Module:
    """Load a backbone's weights from a checkpoint and return the module.

    ``checkpoint`` is a learner's Lightning checkpoint (its ``backbone.*`` tensors are read: a
    :class:`~lightning_meta.Pretrainer`'s, a ProtoNet's...) or a plain state dict of the module. Tensors the module
    has and the file lacks (a MAML classifier head over a pretrained body) keep their initialisation; tensors of a
    different shape are an error naming them (another architecture), as is a file that shares no tensor with the module.
    What was loaded and what was not is reported in one log line. A learner's checkpoint also gives the module the
    input normalisation it was trained with (its ``normalize``; see :func:`input_normalization`).

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
    hparams = saved.get("hyper_parameters") if isinstance(saved, dict) else None
    if isinstance(hparams, dict) and isinstance(hparams.get("normalize"), (list, tuple)):  # what the weights expect
        mean, std = hparams["normalize"]
        record_input_normalization(module, (tuple(mean), tuple(std)))
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


class DropBlock(nn.Module):
    """DropBlock (Ghiasi et al. 2018): in training, zero square blocks of ``block_size`` x ``block_size`` activations
    of each channel and rescale the rest to keep the mean; the identity in evaluation.

    ``rate`` is the expected fraction of activations dropped, exactly: block centres are drawn with probability
    ``1 - (1 - rate) ** (1 / block_size**2)`` at every position (blocks may overhang the border), so every activation
    is covered by ``block_size**2`` possible blocks. Randomness comes from torch's generator (seeded runs repeat).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> drop = DropBlock(0.1, 5)
        >>> x = torch.ones(32, 8, 64, 64)  # a million activations: the fraction dropped is 0.1 to within 0.002
        >>> round(float((drop(x) == 0).float().mean()), 2), torch.equal(drop.eval()(x), x)
        (0.1, True)
    """

    def __init__(self, rate: float, block_size: int) -> None:
        super().__init__()
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"Expected the DropBlock `rate` in [0, 1), but got {rate}.")
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"Expected `block_size` to be a positive integer, but got {block_size!r}.")
        self.rate, self.block_size = rate, block_size

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.rate == 0.0:
            return x
        gamma = 1.0 - (1.0 - self.rate) ** (1.0 / self.block_size**2)
        k = self.block_size
        # centres over the map grown by k - 1 (blocks overhanging the border): every activation, at the border too,
        # has k*k possible blocks, so it is kept with probability (1 - gamma) ** (k*k) = 1 - rate
        h, w = x.shape[-2:]
        centres = (torch.rand((*x.shape[:-2], h + k - 1, w + k - 1), device=x.device) < gamma).to(x.dtype)
        dropped = F.max_pool2d(centres, k, stride=1)  # [..., h, w]
        keep = 1.0 - dropped
        return x * keep * (keep.numel() / keep.sum().clamp(min=1.0))

    def extra_repr(self) -> str:
        return f"rate={self.rate}, block_size={self.block_size}"


class _ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, drop: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.LeakyReLU(0.1),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.LeakyReLU(0.1),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
        )
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.out = nn.Sequential(nn.LeakyReLU(0.1), nn.MaxPool2d(2), *([drop] if drop is not None else []))

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.body(x) + self.shortcut(x))


class ResNet12(Backbone):
    """ResNet-12 of Oreshkin et al. (2018) / Lee et al. (2019): four residual blocks of widths ``channels``
    (64, 160, 320, 640), global average pooling; the embedding is ``channels[-1]`` wide (640).

    ``drop_rate`` regularises as MetaOptNet (Lee et al. 2019) and RFS (Tian et al. 2020) do: dropout of that rate after
    the first two blocks and :class:`DropBlock` of that rate (blocks of ``dropblock_size``) after the last two. Their
    recipe: ``drop_rate=0.1``, ``dropblock_size=5`` on 84x84 images (2 on 32x32 CIFAR images). The default 0 has none.

    Example:
        >>> ResNet12(channels=(8, 16, 32, 64))(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 64])
        >>> ResNet12(drop_rate=0.1).embedding_dim
        640
    """

    def __init__(self, in_channels: int = 3, channels: Sequence[int] = (64, 160, 320, 640),
                 out_features: Optional[int] = None, drop_rate: float = 0.0, dropblock_size: int = 5) -> None:
        super().__init__()
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"Expected `drop_rate` in [0, 1), but got {drop_rate}.")
        blocks, width = [], in_channels
        for i, c in enumerate(channels):
            drop = None
            if drop_rate > 0:
                drop = DropBlock(drop_rate, dropblock_size) if i >= len(channels) - 2 else nn.Dropout(drop_rate)
            blocks.append(_ResBlock(width, c, drop))
            width = c
        self.features = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.embedding_dim = width
        self.head = nn.Linear(width, out_features) if out_features is not None else None


__all__ = ["MLP", "Backbone", "Conv4", "DropBlock", "ResNet12", "backbone_spec", "build_backbone", "embedding_width",
           "infer_embedding_width", "input_normalization", "record_input_normalization", "timm_backbone",
           "torchvision_backbone"]
