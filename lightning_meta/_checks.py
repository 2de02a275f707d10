"""Checks shared across the package: constructor arguments (one message template) and a cheap finiteness test."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor


def check_int(name: str, value: Any, minimum: int) -> None:
    """Raise ``ValueError("Expected `name` to be an integer >= minimum, but got value.")`` unless it is one."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"Expected `{name}` to be an integer >= {minimum}, but got {value!r}.")


def check_positive(name: str, value: Any) -> None:
    """Raise ``ValueError("Expected `name` to be a positive number, but got value.")`` unless it is one."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"Expected `{name}` to be a positive number, but got {value!r}.")


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> None:
    """Raise ``ValueError("Expected `name` to be one of (choices), but got value.")`` unless ``value`` is a choice.

    Example:
        >>> check_choice("distance", "l1", ("euclidean", "cosine"))
        Traceback (most recent call last):
        ...
        ValueError: Expected `distance` to be one of ('euclidean', 'cosine'), but got 'l1'.
    """
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"Expected `{name}` to be one of {choices}, but got {value!r}.")


def surely_finite(tensors: Iterable[Tensor]) -> bool:
    """True when every element of ``tensors`` is surely finite: one float32 sum each and one synchronisation. A sum
    is non-finite when any element is, or when finite values overflow it (a false alarm, never a miss), so a False
    asks the caller for its exact, element-wise check."""
    with torch.no_grad():
        total = None
        for t in tensors:
            s = t.sum(dtype=torch.float32)
            total = s if total is None else total + s
        return total is None or bool(torch.isfinite(total))


def check_embedding_width(z: Tensor) -> None:
    """Raise when a backbone's flat embeddings ``[n, D]`` have no width (``D = 0``): every distance would be 0 and the
    loss stay at ln N without an error. A shape check only, so it runs inside compiled functions without a graph
    break.

    Example:
        >>> check_embedding_width(torch.zeros(3, 0))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: The backbone gives embeddings of width 0 (shape (3, 0)): every example would look the same. ...
    """
    if z.dim() >= 2 and z.shape[-1] == 0:
        raise ValueError(
            f"The backbone gives embeddings of width 0 (shape {tuple(z.shape)}): every example would look the same. A "
            "torchvision classifier built with num_classes=0 keeps a 0-output layer: build it with its default classes "
            "and replace the classifier, e.g. model.fc = nn.Identity().")
