"""Errors of the hypergradient core, and operations that lack the double backward it needs.

Curvature products and the mixed term differentiate through the model twice. Torch reports an
operation without a double backward in several wordings (translated here into one
:class:`HypergradError` naming the operation and the fix), and a custom Function whose backward is
``@once_differentiable`` raises nothing at all: torch cuts the graph there and second derivatives
come out as silent zeros, so such Functions are looked for before any is used.
"""

from __future__ import annotations

import contextlib
import re
from typing import Iterator, Sequence

import torch
from torch import Tensor

from auxframe.errors import AuxframeError


class HypergradError(AuxframeError):
    """A hypergradient cannot be computed as asked (bad arguments, an operation without double
    backward, a Hessian that the chosen method cannot invert).

    Attributes:
        operation: for a missing double backward, the operation that lacks it (else ``None``).
    """

    def __init__(self, message: str, operation: str | None = None):
        super().__init__(message)
        self.operation = operation


_NOT_IMPLEMENTED = re.compile(r"derivative for '?([\w.:]+?)'? is not implemented")
_DOUBLE_BACKWARD = re.compile(r"double backward|differentiate twice", re.IGNORECASE)
_NAMED_DOUBLE_BACKWARD = re.compile(
    r"^\s*([\w.:]+?)(?:\(\))?:?\s+(?:does not support|doesn't support|double backward)",
    re.IGNORECASE,
)
_ONCE_DIFFERENTIABLE_CODE = torch.autograd.function.once_differentiable(lambda ctx: None).__code__


def _once_differentiable_ops(roots: Sequence[Tensor], targets: Sequence[Tensor]) -> list[str]:
    """Custom autograd Functions with an ``@once_differentiable`` backward lying between
    ``targets`` (leaf tensors) and ``roots`` in the autograd graph, by class name.

    Their double backward does not raise: torch cuts the graph there, and gradients of the
    gradient come out as silent zeros. So they are looked for before any such gradient is used.
    """
    wanted = {id(t) for t in targets}
    reaches: dict[object, bool] = {}
    found: list[str] = []
    stack = [(r.grad_fn, False) for r in roots if r.grad_fn is not None]
    while stack:
        node, expanded = stack.pop()
        if node in reaches and not expanded:
            continue
        children = [n for n, _ in node.next_functions if n is not None]
        if not expanded:
            reaches[node] = False  # provisional: the autograd graph is acyclic
            stack.append((node, True))
            stack.extend((c, False) for c in children if c not in reaches)
            continue
        variable = getattr(node, "variable", None)
        hit = (variable is not None and id(variable) in wanted) or any(reaches[c] for c in children)
        reaches[node] = hit
        forward_cls = getattr(node, "_forward_cls", None)
        backward = getattr(forward_cls, "backward", None)
        if hit and getattr(backward, "__code__", None) is _ONCE_DIFFERENTIABLE_CODE:
            found.append(forward_cls.__name__)
    return sorted(set(found))


def _double_backward_error(operation: str | None, detail: str, fix: str) -> HypergradError:
    what = f"operation '{operation}'" if operation else "an operation"
    return HypergradError(
        f"{what} does not support double backward ({detail}), which this hypergradient needs. "
        f"{fix}",
        operation=operation,
    )


_STANDALONE_HINT = (
    "Curvature products need double backward through every operation between params and the "
    "loss: replace the operation by a twice-differentiable one, or use "
    "hypergradient(..., method='first_order', mixed='jacobian')."
)


def _fix_hint(method: str, mixed: str) -> str:
    if method != "first_order":
        return (
            f"method='{method}' needs Hessian-vector products through every operation between "
            "inner_params and train_loss. Use method='first_order', mixed='jacobian' (needs no "
            "double backward through the main network when outer_params only weight the losses), "
            "or replace the operation by a twice-differentiable one."
        )
    if mixed == "vjp":
        return (
            "Use mixed='jacobian' (one first-order backward per element of outer_params), or "
            "replace the operation by a twice-differentiable one."
        )
    return (
        "With method='first_order', mixed='jacobian' only the operations between outer_params "
        "and train_loss are differentiated twice (the combination of the losses, not the main "
        "network); replace this one by a twice-differentiable one."
    )


@contextlib.contextmanager
def _explain_double_backward(hint: str) -> Iterator[None]:
    """Re-raise torch's missing-double-backward errors as :class:`HypergradError` naming the op."""
    try:
        yield
    except (RuntimeError, NotImplementedError) as error:
        message = str(error)
        match = _NOT_IMPLEMENTED.search(message)
        if match:
            raise _double_backward_error(match.group(1), f"torch: {message}", hint) from error
        if _DOUBLE_BACKWARD.search(message):
            named = _NAMED_DOUBLE_BACKWARD.match(message)
            operation = named.group(1) if named else None
            raise _double_backward_error(operation, f"torch: {message}", hint) from error
        raise


def _check_once_differentiable(roots: Sequence[Tensor], targets: Sequence[Tensor], hint: str):
    """Raise if a once-differentiable custom Function lies between ``targets`` and ``roots``."""
    ops = _once_differentiable_ops(roots, targets)
    if ops:
        raise _double_backward_error(
            ", ".join(ops),
            "its backward is marked @once_differentiable, so torch would silently return zero "
            "second derivatives through it",
            hint,
        )
