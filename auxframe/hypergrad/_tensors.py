"""Small helpers on lists of tensors (one tensor per parameter), shared by the hypergradient core."""

from __future__ import annotations

from typing import Iterable, Sequence, Union

import torch
from torch import Tensor

from auxframe.hypergrad.errors import HypergradError

Params = Union[Sequence[Tensor], Iterable[Tensor]]


def _as_list(params: Params, name: str) -> list[Tensor]:
    """A list from any sequence or generator (consumed once, here), checked to be usable."""
    if isinstance(params, Tensor):
        raise HypergradError(
            f"{name} must be a sequence of tensors, not one tensor: wrap it as [{name}]."
        )
    params = list(params)
    if not params:
        raise HypergradError(
            f"{name} is empty. If it came from model.parameters(), was that generator already "
            f"consumed? Pass list(model.parameters())."
        )
    for i, p in enumerate(params):
        if not isinstance(p, Tensor):
            raise HypergradError(f"{name}[{i}] is a {type(p).__name__}, not a tensor.")
        if not p.requires_grad:
            raise HypergradError(
                f"{name}[{i}] (shape {tuple(p.shape)}) does not require grad; "
                f"call .requires_grad_() on it or leave it out of {name}."
            )
    return params


def _zeros_for_none(grads: Sequence[Tensor | None], like: Sequence[Tensor]) -> list[Tensor]:
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, like)]


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    return sum((torch.sum(x * y) for x, y in zip(a, b)), torch.zeros((), device=a[0].device))


def _norm(a: Sequence[Tensor]) -> Tensor:
    dtype = torch.float64 if any(x.dtype == torch.float64 for x in a) else torch.float32
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x).to(dtype) for x in a]))


def _axpy(alpha: float | Tensor, x: Sequence[Tensor], y: Sequence[Tensor]) -> list[Tensor]:
    """``alpha * x + y`` elementwise over two lists."""
    return [yi + alpha * xi for xi, yi in zip(x, y)]


def _requires_grad(t: Tensor | None) -> bool:
    return t is not None and t.requires_grad


def _leaves_reached(roots: Sequence[Tensor], targets: Sequence[Tensor]) -> list[bool]:
    """Per target, whether the autograd graph of ``roots`` reaches it (non-leaf targets: True)."""
    found: set[int] = set()
    seen: set[object] = set()
    stack = [r.grad_fn for r in roots if r.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if variable is not None:
            found.add(id(variable))
        stack.extend(n for n, _ in node.next_functions if n is not None)
    return [id(t) in found or not t.is_leaf for t in targets]


def _check_loss(loss: Tensor, name: str):
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise HypergradError(f"{name} must be a scalar tensor.")
    if not loss.requires_grad:
        raise HypergradError(
            f"{name} does not require grad: was it computed under torch.no_grad(), or detached?"
        )
