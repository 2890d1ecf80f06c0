r"""Hypergradients by implicit differentiation: the engine behind AuxiLearn-style outer steps.

Navon et al., "Auxiliary Learning by Implicit Differentiation" (ICLR 2021). The main model has
parameters ``W`` (``inner_params``), the auxiliary network that combines the losses has
parameters ``phi`` (``outer_params``). The inner problem trains ``W`` on the training loss
``L_T(W, phi)``; the outer problem tunes ``phi`` so that ``W*(phi)`` does well on the outer loss
``L_A(W)``, the main task's loss on a held-out auxiliary set. At a stationary point
``grad_W L_T(W*(phi), phi) = 0`` the implicit function theorem gives::

    dL_A/dphi = grad_phi L_A  -  (d2 L_T / dW dphi)^T  (H_W L_T)^-1  grad_W L_A
                \_ direct _/     \___ mixed term ___/  \_______ p = H^-1 v _______/

with ``v = grad_W L_A`` and ``H = H_W L_T``. The direct term is zero in AuxiLearn, where ``L_A``
does not depend on ``phi``; it is included so that the result is the total derivative.

Only products with ``H`` are ever formed. The inverse-Hessian-vector product ``p`` comes from:

* ``"neumann"`` (default): the truncated Neumann series ``p = sum_{j=0..J} (I - alpha H)^j v``,
  ``J = neumann_terms``. Since ``H^-1 = alpha * sum_{j>=0} (I - alpha H)^j``, the true inverse is
  ``alpha`` times that sum. The AuxiLearn reference code omits the factor ``alpha`` and lets the
  outer learning rate absorb it; so does this module by default (``scale_by_alpha=False``), so that
  ported hyperparameters give the same numbers. ``scale_by_alpha=True`` multiplies by ``alpha``.
  The series converges iff ``alpha * lambda`` lies in ``(0, 2)`` for every eigenvalue ``lambda``
  of ``H``: too large an ``alpha`` makes it diverge, and so does any zero or negative curvature
  (a saddle, a non-convex region), whatever ``alpha``. :func:`top_eigenvalue` and
  :func:`safe_alpha` pick ``alpha``; :attr:`HypergradResult.diverging` reports trouble.
* ``"cg"``: conjugate gradients on ``H p = v`` (needs ``H`` positive definite along the way;
  small problems and tests).
* ``"exact"``: the dense Hessian from one product per parameter, then a linear solve (tiny
  problems only: refused above :data:`EXACT_MAX_PARAMS`).
* ``"first_order"``: ``p = v`` (``J = 0``): the hypergradient becomes the alignment of the
  training-loss gradients with the outer gradient.

``cg`` and ``exact`` return the true ``H^-1 v`` whatever ``scale_by_alpha`` says (they ignore
``alpha``); ``neumann`` and ``first_order`` with the default ``scale_by_alpha=False`` are
``1 / alpha`` times larger, so switching between the two families means rescaling the outer
learning rate.

Curvature products ``H v`` are either exact Hessian-vector products (``curvature="hessian"``, by
reverse-over-reverse differentiation: the gradient ``g = grad(L_T, W, create_graph=True)`` is built
once and every product is ``grad(g . v, W)`` on that retained graph) or generalised Gauss-Newton
products (``curvature="gauss_newton"``: ``G v = J^T H_out J v`` with ``J = d outputs / dW``,
positive semi-definite whenever ``output_loss`` is convex in the outputs, as cross-entropy and
squared error are).

The curvature may come from another loss than ``train_loss`` (``hessian_loss=``): typically the
training loss on a random part of the batch. A Hessian-vector product costs in proportion to the
examples it runs through, and the Neumann series needs ``J`` of them in a row, so a curvature
mini-batch smaller than the gradient mini-batch (Martens, "Deep learning via Hessian-free
optimization", ICML 2010; Byrd et al., "On the use of stochastic Hessian information in
optimization methods for machine learning", SIAM J. Optim. 2011) cuts most of the outer step's
cost. The products then estimate the same expected Hessian from fewer examples.

Finally the mixed term is one more backward pass, ``grad_phi(g . p)``, on the same retained gradient
graph (``mixed="vjp"``), or one first-order backward per element of ``phi`` (``mixed="jacobian"``:
``<grad_W dL_T/dphi_i, p>``, by symmetry of second derivatives), which needs no double backward
through the main network when ``phi`` only weights its losses, or ``grad_phi`` of a directional
derivative that the caller computes (``mixed="directional"``: ``directional(p)`` returns
``<grad_W L_T, p>`` as a function of ``phi``; AuxiLearn gets it from one forward-mode pass of the
model along ``p``, cheaper than a backward through the gradient graph and with no gradient graph of
``train_loss`` at all when ``hessian_loss`` carries the curvature).

Reverse over reverse is the default because the gradient graph is built once and shared by all
``J`` products and the mixed term; ``bench/hypergrad_methods.py`` compares it with
forward-over-reverse (``torch.func.jvp`` of ``torch.func.grad``), which rebuilds forward and
backward for every product. A forward-mode mixed term needs the model as a function, not just
tensors, so this module takes it from the caller (``mixed="directional"``).

This module knows nothing about tasks or trainers: it takes scalar losses and lists of tensors.

Data-parallel training (several processes, each with a shard of the batch): pass
``reduce=auxframe.distributed.all_reduce_mean``. The losses are then each process's local mean;
the global loss is the mean over processes, and so are its gradient, every curvature product
(the Hessian of a mean is the mean of the Hessians) and the mixed term. ``reduce`` averages
``grad_W L_A``, each product and the final hypergradient in place, so every process computes the
single-process hypergradient of the whole batch, and all the scalars (norms, CG steps, the
divergence flag) agree between processes.

Example:
    >>> losses = per_sample_losses(model(x_train), y_train)          # (B, K)
    >>> train_loss = (losses @ aux_net.weights()).mean()
    >>> outer_loss = main_loss(model(x_aux), y_aux)
    >>> W, phi = list(model.parameters()), list(aux_net.parameters())
    >>> alpha = safe_alpha(top_eigenvalue(train_loss, W))             # once in a while
    >>> result = hypergradient(train_loss, outer_loss, W, phi, neumann_terms=3, alpha=alpha)
    >>> for param, grad in zip(phi, result.grads):
    ...     param.grad = grad
    >>> outer_optimizer.step()
    >>> if result.diverging: ...                                       # lower alpha
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence, Union

import torch
from torch import Tensor

from auxframe.errors import AuxframeError

__all__ = [
    "EXACT_MAX_PARAMS",
    "MIXED_JACOBIAN_MAX",
    "GaussNewtonOperator",
    "HessianOperator",
    "HypergradError",
    "HypergradResult",
    "gauss_newton_vector_product",
    "hessian_vector_product",
    "hypergradient",
    "safe_alpha",
    "top_eigenvalue",
]

#: ``method="exact"`` builds a dense ``n x n`` Hessian with ``n`` products; it refuses larger ``n``.
EXACT_MAX_PARAMS = 2_000
#: ``mixed="jacobian"`` runs one backward pass per element of ``outer_params``; it refuses more.
MIXED_JACOBIAN_MAX = 1_000

METHODS = ("neumann", "cg", "exact", "first_order")
CURVATURES = ("hessian", "gauss_newton")
MIXED = ("vjp", "jacobian", "directional")

Params = Union[Sequence[Tensor], Iterable[Tensor]]
Outputs = Union[Tensor, Sequence[Tensor]]


class HypergradError(AuxframeError):
    """A hypergradient cannot be computed as asked (bad arguments, an operation without double
    backward, a Hessian that the chosen method cannot invert).

    Attributes:
        operation: for a missing double backward, the operation that lacks it (else ``None``).
    """

    def __init__(self, message: str, operation: str | None = None):
        super().__init__(message)
        self.operation = operation


@dataclass
class HypergradResult:
    """What :func:`hypergradient` returns.

    Attributes:
        grads: one tensor per element of ``outer_params`` (same shapes), zeros where no loss
            reaches the parameter; ready to be assigned to ``.grad``.
        term_norms: ``neumann``: the norm of each term ``(I - alpha H)^j v``, ``j = 0..J``
            (unscaled); ``first_order``: ``[|v|]``; ``cg``: the residual norm ``|v - H p|`` at
            each iteration, the first being ``|v|``; ``exact``: ``[|p|]``.
        diverging: a term norm is not finite, or the last term norm exceeds the first (the
            Neumann series grows: ``alpha`` too large or curvature not positive; for ``cg``:
            the residual grew).
        outer_grad_norm: ``|v| = |grad_W outer_loss|`` over all ``inner_params``.
    """

    grads: list[Tensor]
    term_norms: list[float] = field(default_factory=list)
    diverging: bool = False
    outer_grad_norm: float = 0.0


# ---------------------------------------------------------------------------------------------
# Small helpers on lists of tensors


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


# ---------------------------------------------------------------------------------------------
# Operations without double backward: find them, name them, say what to do


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


# ---------------------------------------------------------------------------------------------
# Curvature operators


class HessianOperator:
    """Hessian-vector products ``v -> H v`` of ``loss`` w.r.t. ``params``, reverse over reverse.

    The gradient ``g = grad(loss, params, create_graph=True)`` is built once, at construction;
    each product is then one backward pass ``grad(g . v, params)`` on that retained graph.

    Args:
        loss: a scalar tensor whose graph reaches ``params``.
        params: the tensors to differentiate with respect to (any sequence or generator).

    Attributes:
        params: the parameters, as a list.
        grads: ``g``, one entry per parameter (zeros where ``loss`` does not reach it), still
            attached to its graph (reuse it for mixed derivatives).
        reached: per parameter, whether ``loss`` reaches it (products are zero where not).

    Raises:
        HypergradError: ``loss`` passes through a custom Function with a once-differentiable
            backward between ``params`` and the loss (second derivatives would be silently zero).

    Example:
        >>> H = HessianOperator(loss, model.parameters())
        >>> Hv = H([torch.randn_like(p) for p in H.params])
    """

    def __init__(self, loss: Tensor, params: Params):
        params = _as_list(params, "params")
        _check_loss(loss, "loss")
        _check_once_differentiable([loss], params, _STANDALONE_HINT)
        self._build(loss, params, _STANDALONE_HINT)

    @classmethod
    def _from_loss(cls, loss: Tensor, params: list[Tensor], hint: str) -> HessianOperator:
        """For callers that already checked the graph and have their own advice on errors."""
        operator = cls.__new__(cls)
        operator._build(loss, params, hint)
        return operator

    def _build(self, loss: Tensor, params: list[Tensor], hint: str):
        self.params, self._hint = params, hint
        with _explain_double_backward(hint), torch.enable_grad():
            grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        self.reached = [g is not None for g in grads]
        self.grads = _zeros_for_none(grads, params)

    def __call__(self, vector: Sequence[Tensor]) -> list[Tensor]:
        """``H v`` for ``v`` given as one tensor per parameter."""
        pairs = [(g, v) for g, v in zip(self.grads, vector) if g.requires_grad]
        if not pairs:  # loss linear in params: H = 0
            return [torch.zeros_like(p) for p in self.params]
        outputs, grad_outputs = zip(*pairs)
        with _explain_double_backward(self._hint), torch.enable_grad():
            hv = torch.autograd.grad(
                outputs, self.params, grad_outputs, retain_graph=True, allow_unused=True
            )
        return [h.detach() for h in _zeros_for_none(hv, self.params)]


class GaussNewtonOperator:
    """Generalised Gauss-Newton products ``v -> J^T H_out J v``.

    ``J = d outputs / d params`` and ``H_out`` is the Hessian of ``output_loss`` w.r.t. the outputs.
    The matrix is positive semi-definite whenever ``output_loss`` is convex in the outputs
    (cross-entropy, squared error), so it suits conjugate gradients and Neumann series where the
    Hessian is indefinite. ``J v`` comes from the double-vjp trick (``J^T u`` is built once with a
    dummy ``u`` and differentiated w.r.t. ``u``), ``H_out`` from a gradient graph of
    ``output_loss`` on detached outputs, ``J^T w`` from one backward pass.

    Terms of the training loss that do not pass through ``outputs`` (weight decay) contribute no
    curvature: add them to the outputs (e.g. the parameters themselves) if they matter.

    With ``jvp`` (a callable ``v -> J v``, e.g. one forward-mode pass of the network along ``v``)
    each product is that forward-mode pass plus one backward pass ``J^T w`` on the outputs' graph,
    instead of two passes through a graph of the gradient: about half the cost on a small CNN.

    Args:
        outputs: the network outputs (a tensor or a sequence of tensors) the loss is computed from,
            still attached to their graph.
        output_loss: maps outputs (a tensor, or a list of tensors if ``outputs`` is a sequence,
            same order) to the scalar loss.
        params: the tensors to differentiate with respect to (any sequence or generator).
        jvp: optional ``v -> J v``: given one detached tensor per parameter, the directional
            derivatives of the outputs (one tensor, or None for zero, per output, same order).

    Attributes:
        params: the parameters, as a list.
        reached: per parameter, whether the outputs depend on it (products are zero where not).

    Example:
        >>> logits = model(x)
        >>> G = GaussNewtonOperator(logits, lambda z: F.cross_entropy(z, y), model.parameters())
        >>> Gv = G([torch.randn_like(p) for p in G.params])
    """

    def __init__(
        self,
        outputs: Outputs,
        output_loss: Callable[..., Tensor],
        params: Params,
        jvp: Callable[[list[Tensor]], Sequence[Tensor]] | None = None,
    ):
        self.params = _as_list(params, "params")
        single = isinstance(outputs, Tensor)
        self._outputs = [outputs] if single else list(outputs)
        if not self._outputs or not all(isinstance(o, Tensor) for o in self._outputs):
            raise HypergradError("outputs must be a tensor or a non-empty sequence of tensors.")
        if jvp is not None and not callable(jvp):
            raise HypergradError(f"output_jvp must be callable, got {type(jvp).__name__}.")
        self._hint = _STANDALONE_HINT
        self._jvp = jvp
        if jvp is None:  # J v by the double-vjp trick: twice through the graph
            _check_once_differentiable(self._outputs, self.params, self._hint)
        with torch.enable_grad():
            self._detached = [o.detach().requires_grad_() for o in self._outputs]
            loss = output_loss(self._detached[0] if single else list(self._detached))
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                raise HypergradError("output_loss must return a scalar tensor.")
            out_grads = torch.autograd.grad(
                loss, self._detached, create_graph=True, allow_unused=True
            )
            self._out_grads = _zeros_for_none(out_grads, self._detached)
            if jvp is not None:
                self.reached = _leaves_reached(self._outputs, self.params)
                return
            self._dummies = [torch.zeros_like(o, requires_grad=True) for o in self._outputs]
            live = [(o, u) for o, u in zip(self._outputs, self._dummies) if o.requires_grad]
            jt_u = (
                torch.autograd.grad(
                    [o for o, _ in live], self.params, [u for _, u in live],
                    create_graph=True, allow_unused=True,
                )
                if live
                else [None] * len(self.params)
            )
        self.reached = [j is not None for j in jt_u]
        self._jt_u = jt_u

    def __call__(self, vector: Sequence[Tensor]) -> list[Tensor]:
        """``G v`` for ``v`` given as one tensor per parameter."""
        zeros = [torch.zeros_like(p) for p in self.params]
        if self._jvp is not None:
            jv = [
                torch.zeros_like(o) if t is None else t.detach().to(o.dtype).reshape(o.shape)
                for t, o in zip(self._jvp([v.detach() for v in vector]), self._outputs)
            ]
        else:
            pairs = [(j, v) for j, v in zip(self._jt_u, vector) if _requires_grad(j)]
            if not pairs:
                return zeros
        with _explain_double_backward(self._hint), torch.enable_grad():
            if self._jvp is None:
                jv = torch.autograd.grad(
                    [j for j, _ in pairs], self._dummies, [v for _, v in pairs],
                    retain_graph=True, allow_unused=True,
                )
                jv = _zeros_for_none(jv, self._dummies)
            curved = [(g, w) for g, w in zip(self._out_grads, jv) if g.requires_grad]
            if not curved:  # output_loss linear in the outputs: H_out = 0
                return zeros
            h_jv = torch.autograd.grad(
                [g for g, _ in curved], self._detached, [w for _, w in curved],
                retain_graph=True, allow_unused=True,
            )
            h_jv = _zeros_for_none(h_jv, self._detached)
            live = [(o, w) for o, w in zip(self._outputs, h_jv) if o.requires_grad]
            gv = torch.autograd.grad(
                [o for o, _ in live], self.params, [w for _, w in live],
                retain_graph=True, allow_unused=True,
            )
        return [g.detach() for g in _zeros_for_none(gv, self.params)]


def hessian_vector_product(loss: Tensor, params: Params, vector: Sequence[Tensor]) -> list[Tensor]:
    """``H v``, the Hessian of ``loss`` w.r.t. ``params`` times ``vector``, in one call.

    For several products with one loss build a :class:`HessianOperator` once instead.

    Args:
        loss: scalar tensor whose graph reaches ``params``.
        params: tensors to differentiate with respect to (any sequence or generator).
        vector: one tensor per parameter, same shapes.

    Returns:
        One tensor per parameter (zeros where ``loss`` does not reach it).
    """
    return HessianOperator(loss, params)(vector)


def gauss_newton_vector_product(
    outputs: Outputs, output_loss: Callable[..., Tensor], params: Params, vector: Sequence[Tensor]
) -> list[Tensor]:
    """``J^T H_out J v``, one generalised Gauss-Newton product (see :class:`GaussNewtonOperator`).

    Args:
        outputs: network outputs (tensor or sequence of tensors) attached to their graph.
        output_loss: maps outputs to the scalar loss.
        params: tensors to differentiate with respect to (any sequence or generator).
        vector: one tensor per parameter, same shapes.

    Returns:
        One tensor per parameter (zeros where the outputs do not depend on it).
    """
    return GaussNewtonOperator(outputs, output_loss, params)(vector)


def _check_curvature(curvature: str, outputs, output_loss, output_jvp=None):
    if output_jvp is not None and curvature != "gauss_newton":
        raise HypergradError("output_jvp is only used with curvature='gauss_newton'.")
    if curvature not in CURVATURES:
        raise HypergradError(f"unknown curvature '{curvature}'; choose one of {CURVATURES}.")
    if curvature == "gauss_newton" and (outputs is None or output_loss is None):
        raise HypergradError(
            "curvature='gauss_newton' needs outputs (the network outputs train_loss is "
            "computed from) and output_loss (a callable mapping them to the loss)."
        )
    if curvature == "hessian" and (outputs is not None or output_loss is not None):
        raise HypergradError(
            "outputs and output_loss are only used with curvature='gauss_newton'; "
            "pass curvature='gauss_newton' or leave them out."
        )


def _curvature_operator(
    curvature: str,
    loss: Tensor,
    params: list[Tensor],
    outputs: Outputs | None,
    output_loss: Callable[..., Tensor] | None,
    hint: str,
    hessian: HessianOperator | None = None,
    output_jvp: Callable[[list[Tensor]], Sequence[Tensor]] | None = None,
) -> HessianOperator | GaussNewtonOperator:
    """The curvature operator asked for (arguments already checked by :func:`_check_curvature`)."""
    if curvature == "gauss_newton":
        operator = GaussNewtonOperator(outputs, output_loss, params, jvp=output_jvp)
        operator._hint = hint
        return operator
    return hessian if hessian is not None else HessianOperator._from_loss(loss, params, hint)


class _Reduced:
    """A curvature operator whose products are averaged over processes by ``reduce`` (in place)."""

    def __init__(self, operator, reduce: Callable[[list[Tensor]], None]):
        self.operator, self.reduce, self.reached = operator, reduce, operator.reached

    def __call__(self, vector: Sequence[Tensor]) -> list[Tensor]:
        product = self.operator(vector)
        self.reduce(product)
        return product


def _with_reduce(operator, reduce: Callable[[list[Tensor]], None] | None):
    return operator if reduce is None or operator is None else _Reduced(operator, reduce)


# ---------------------------------------------------------------------------------------------
# Step sizes


def top_eigenvalue(
    loss: Tensor,
    params: Params,
    iters: int = 20,
    seed: int = 0,
    *,
    curvature: str = "hessian",
    outputs: Outputs | None = None,
    output_loss: Callable[..., Tensor] | None = None,
    reduce: Callable[[list[Tensor]], None] | None = None,
    output_jvp: Callable[[list[Tensor]], Sequence[Tensor]] | None = None,
) -> float:
    """The eigenvalue of largest magnitude of the Hessian (or GGN), by power iteration.

    The estimate is the Rayleigh quotient of the last iterate; it approaches the eigenvalue from
    below in magnitude, at a rate set by the gap to the next one. A negative result means the
    Hessian has a negative eigenvalue larger in magnitude than any positive one: no ``alpha``
    makes the Neumann series converge there (see :func:`safe_alpha`).

    Args:
        loss: scalar tensor whose graph reaches ``params`` (its graph is retained).
        params: tensors (any sequence or generator).
        iters: number of Hessian-vector products.
        seed: seed of the random start (drawn on the CPU, so equal on every device).
        curvature: ``"hessian"`` or ``"gauss_newton"`` (then ``outputs`` and ``output_loss`` as
            in :func:`hypergradient`).
        outputs: see :class:`GaussNewtonOperator`.
        output_loss: see :class:`GaussNewtonOperator`.
        reduce: averages a list of tensors over processes in place (data-parallel training; see
            the module docstring); None in a single process.
        output_jvp: for ``gauss_newton``: ``v -> J v`` (see :class:`GaussNewtonOperator`).

    Returns:
        The estimate, a float (``0.0`` if the curvature is zero).
    """
    params = _as_list(params, "params")
    if iters < 1:
        raise HypergradError(f"iters must be >= 1, got {iters}.")
    _check_curvature(curvature, outputs, output_loss, output_jvp)
    if curvature == "hessian":
        _check_once_differentiable([loss], params, _STANDALONE_HINT)
    operator = _curvature_operator(curvature, loss, params, outputs, output_loss, _STANDALONE_HINT,
                                   output_jvp=output_jvp)
    operator = _with_reduce(operator, reduce)
    generator = torch.Generator().manual_seed(seed)
    x = [
        torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device) if reached
        else torch.zeros_like(p)
        for p, reached in zip(params, operator.reached)
    ]
    estimate = 0.0
    for _ in range(iters):
        scale = _norm(x).item()
        if scale == 0.0 or not math.isfinite(scale):
            return 0.0
        x = [xi / scale for xi in x]
        hx = operator(x)
        estimate = _dot(x, hx).item()
        x = hx
    return estimate


def safe_alpha(top_eig: float, margin: float = 0.5) -> float:
    """A Neumann step size ``alpha`` with ``alpha * lambda_max = 2 * margin``.

    The Neumann series ``sum_j (I - alpha H)^j`` converges iff ``|1 - alpha * lambda| < 1``, i.e.
    ``alpha * lambda`` lies in ``(0, 2)``, for every eigenvalue ``lambda`` of ``H``. This rule
    handles the top of the spectrum; eigenvalues that are zero or negative (a saddle, a non-convex
    region, a point far from the inner optimum) break the series for every ``alpha`` - watch
    :attr:`HypergradResult.diverging`, or use ``curvature="gauss_newton"``.

    Args:
        top_eig: the largest eigenvalue, e.g. from :func:`top_eigenvalue`.
        margin: in ``(0, 1)``; the default 0.5 gives ``alpha = 1 / lambda_max``.

    Returns:
        ``2 * margin / top_eig``.

    Raises:
        HypergradError: ``top_eig`` is not positive and finite, or ``margin`` is outside ``(0, 1)``.
    """
    if not 0.0 < margin < 1.0:
        raise HypergradError(
            f"margin must lie in (0, 1) so that alpha * lambda_max < 2, got {margin}."
        )
    if not (math.isfinite(top_eig) and top_eig > 0.0):
        raise HypergradError(
            f"top eigenvalue {top_eig} is not positive: the curvature is negative or zero along "
            "its top direction and the Neumann series diverges for every alpha. Move W closer to "
            "the inner optimum, or use curvature='gauss_newton' (positive semi-definite)."
        )
    return 2.0 * margin / top_eig


# ---------------------------------------------------------------------------------------------
# Inverse-Hessian-vector products


def _neumann(operator, v: list[Tensor], terms: int, alpha: float):
    """``p = sum_{j=0..terms} (I - alpha H)^j v`` and the norm of each term."""
    term = v
    p = [t.clone() for t in v]
    norms = [_norm(v)]
    for _ in range(terms):
        term = _axpy(-alpha, operator(term), term)
        p = [a + b for a, b in zip(p, term)]
        norms.append(_norm(term))
    return p, norms


def _conjugate_gradient(operator, v: list[Tensor], iters: int, tol: float):
    """Solve ``H p = v``; raise on non-positive curvature. Returns ``p`` and residual norms."""
    p = [torch.zeros_like(t) for t in v]
    r = [t.clone() for t in v]
    d = [t.clone() for t in v]
    rs = _dot(r, r)
    norms = [rs.sqrt()]
    target = tol * norms[0].item()
    for i in range(iters):
        if norms[-1].item() <= target:
            break
        hd = operator(d)
        curvature = _dot(d, hd)
        if not curvature.item() > 0.0:
            raise HypergradError(
                f"conjugate gradients met curvature d^T H d = {curvature.item():.3g} <= 0 at "
                f"iteration {i}: the Hessian of train_loss w.r.t. inner_params is not positive "
                "definite here (W is not at a strict local minimum of train_loss, or the loss is "
                "non-convex there). Use curvature='gauss_newton' (positive semi-definite), "
                "method='exact' (any invertible Hessian), or train W closer to its optimum."
            )
        step = rs / curvature
        p = _axpy(step, d, p)
        r = _axpy(-step, hd, r)
        rs_new = _dot(r, r)
        d = _axpy(rs_new / rs, d, r)
        rs = rs_new
        norms.append(rs.sqrt())
    return p, norms


def _exact(operator, v: list[Tensor], reached: list[bool]) -> list[Tensor]:
    """Dense Hessian over the reached parameters from one product per element, then a solve."""
    active = [i for i, r in enumerate(reached) if r]
    sizes = [v[i].numel() for i in active]
    n = sum(sizes)
    if n > EXACT_MAX_PARAMS:
        raise HypergradError(
            f"method='exact' builds the dense Hessian with one product per parameter element; "
            f"{n:,} elements exceed EXACT_MAX_PARAMS = {EXACT_MAX_PARAMS:,}. "
            f"Use method='cg' or method='neumann'."
        )
    columns = []
    for k in range(n):
        unit = torch.zeros(n, dtype=torch.float64)
        unit[k] = 1.0
        pieces = dict(zip(active, unit.split(sizes)))
        e = [
            pieces[i].reshape(t.shape).to(t) if i in pieces else torch.zeros_like(t)
            for i, t in enumerate(v)
        ]
        hv = operator(e)
        columns.append(torch.cat([hv[i].reshape(-1).double().cpu() for i in active]))
    hessian = torch.stack(columns, dim=1) if columns else torch.zeros(0, 0, dtype=torch.float64)
    hessian = (hessian + hessian.T) / 2
    rhs = torch.cat([v[i].reshape(-1).double().cpu() for i in active]) if active else hessian[:, 0]
    solution, info = torch.linalg.solve_ex(hessian, rhs)
    if info.item() != 0 or not torch.isfinite(solution).all():
        raise HypergradError(
            "the Hessian of train_loss w.r.t. inner_params is singular, so the implicit function "
            "theorem does not apply at this W. Add weight decay to train_loss, or use "
            "method='neumann'."
        )
    p = [torch.zeros_like(t) for t in v]
    for i, piece in zip(active, solution.split(sizes)):
        p[i] = piece.reshape(v[i].shape).to(v[i])
    return p


def _inverse_hvp(method, operator, v, reached, terms, alpha, scale_by_alpha, cg_iters, cg_tol):
    """``p`` for ``method`` and the norms reported as :attr:`HypergradResult.term_norms`."""
    if method == "cg":
        return _conjugate_gradient(operator, v, cg_iters, cg_tol)
    if method == "exact":
        p = _exact(operator, v, reached)
        return p, [_norm(p)]
    p, norms = _neumann(operator, v, terms, alpha)  # neumann, first_order (terms = 0)
    return ([alpha * t for t in p] if scale_by_alpha else p), norms


# ---------------------------------------------------------------------------------------------
# Mixed term


def _mixed_vjp(grads: list[Tensor], p: list[Tensor], outer: list[Tensor]) -> list[Tensor]:
    """``grad_phi (g . p)`` on the retained gradient graph ``g = grad_W L_T``."""
    pairs = [(g, q) for g, q in zip(grads, p) if g.requires_grad]
    if not pairs:
        return [torch.zeros_like(t) for t in outer]
    mixed = torch.autograd.grad(
        [g for g, _ in pairs], outer, [q for _, q in pairs], retain_graph=True, allow_unused=True
    )
    return _zeros_for_none(mixed, outer)


def _mixed_directional(directional, p: list[Tensor], outer: list[Tensor]) -> list[Tensor]:
    """``grad_phi <grad_W L_T, p>`` from the caller's directional derivative ``directional(p)``."""
    value = directional([t.detach() for t in p])
    if not isinstance(value, Tensor) or value.numel() != 1:
        raise HypergradError("directional(p) must return a scalar tensor <grad_W train_loss, p>.")
    if not value.requires_grad:
        return [torch.zeros_like(t) for t in outer]
    mixed = torch.autograd.grad(value, outer, allow_unused=True)
    return _zeros_for_none(mixed, outer)


def _mixed_jacobian(
    train_loss: Tensor, inner: list[Tensor], outer: list[Tensor], p: list[Tensor]
) -> list[Tensor]:
    """``<grad_W (dL_T / dphi_i), p>`` for each element ``phi_i``: one backward per element."""
    n = sum(t.numel() for t in outer)
    if n > MIXED_JACOBIAN_MAX:
        raise HypergradError(
            f"mixed='jacobian' runs one backward pass per element of outer_params; {n:,} elements "
            f"exceed MIXED_JACOBIAN_MAX = {MIXED_JACOBIAN_MAX:,}. Use mixed='vjp'."
        )
    d_phi = torch.autograd.grad(train_loss, outer, create_graph=True, allow_unused=True)
    result = []
    for t, d in zip(outer, d_phi):
        flat = torch.zeros(t.numel(), dtype=t.dtype, device=t.device)
        if _requires_grad(d):
            rows = d.reshape(-1)
            for k in range(rows.numel()):
                row = torch.autograd.grad(rows[k], inner, retain_graph=True, allow_unused=True)
                flat[k] = _dot(_zeros_for_none(row, inner), p)
        result.append(flat.reshape(t.shape))
    return result


# ---------------------------------------------------------------------------------------------
# The hypergradient


def _check_options(method, neumann_terms, alpha, cg_iters, cg_tol, mixed, directional=None):
    """Raise :class:`HypergradError` on an unknown method or an out-of-range setting."""
    if method not in METHODS:
        raise HypergradError(f"unknown method '{method}'; choose one of {METHODS}.")
    if mixed not in MIXED:
        raise HypergradError(f"unknown mixed '{mixed}'; choose one of {MIXED}.")
    if (mixed == "directional") != (directional is not None):
        raise HypergradError(
            "mixed='directional' and directional= go together: pass directional (a callable "
            "p -> <grad_W train_loss, p>, differentiable in outer_params) with mixed='directional', "
            "and only then."
        )
    if directional is not None and not callable(directional):
        raise HypergradError(f"directional must be callable, got {type(directional).__name__}.")
    if isinstance(neumann_terms, bool) or not isinstance(neumann_terms, int) or neumann_terms < 0:
        raise HypergradError(f"neumann_terms must be an int >= 0, got {neumann_terms!r}.")
    if isinstance(alpha, bool) or not (
        isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0
    ):
        raise HypergradError(f"alpha must be a positive finite number, got {alpha!r}.")
    if cg_iters < 1 or not cg_tol >= 0:
        raise HypergradError(f"cg_iters must be >= 1 and cg_tol >= 0, got {cg_iters}, {cg_tol}.")


def _check_loss(loss: Tensor, name: str):
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise HypergradError(f"{name} must be a scalar tensor.")
    if not loss.requires_grad:
        raise HypergradError(
            f"{name} does not require grad: was it computed under torch.no_grad(), or detached?"
        )


def hypergradient(
    train_loss: Tensor | None,
    outer_loss: Tensor,
    inner_params: Params,
    outer_params: Params,
    *,
    method: str = "neumann",
    neumann_terms: int = 3,
    alpha: float = 1e-2,
    scale_by_alpha: bool = False,
    curvature: str = "hessian",
    cg_iters: int = 100,
    cg_tol: float = 1e-6,
    mixed: str = "vjp",
    outputs: Outputs | None = None,
    output_loss: Callable[..., Tensor] | None = None,
    reduce: Callable[[list[Tensor]], None] | None = None,
    hessian_loss: Tensor | None = None,
    directional: Callable[[list[Tensor]], Tensor] | None = None,
    output_jvp: Callable[[list[Tensor]], Sequence[Tensor]] | None = None,
) -> HypergradResult:
    """The implicit hypergradient ``dL_A/dphi`` of ``outer_loss`` w.r.t. ``outer_params``.

    Computes ``grad_phi L_A - (d2 L_T / dW dphi)^T p`` with ``p ~ H^-1 grad_W L_A`` (see the
    module docstring). The result is exact at a stationary point of ``train_loss`` in ``W`` (up to
    the approximation of ``p``); elsewhere it is the usual AuxiLearn approximation.

    All graphs are retained: ``train_loss`` and ``outer_loss`` can still be backpropagated
    afterwards. ``.grad`` fields are not touched.

    Args:
        train_loss: scalar ``L_T(W, phi)``; its graph reaches ``inner_params`` and
            ``outer_params``. Not differentiated (so it may be detached, or None) when
            ``mixed="directional"`` and ``hessian_loss`` carries the curvature.
        outer_loss: scalar ``L_A(W)`` (may also depend on ``phi``: that direct term is added).
        inner_params: ``W`` (any sequence or generator; a generator is consumed once).
        outer_params: ``phi`` (any sequence or generator).
        method: ``"neumann"``, ``"cg"``, ``"exact"`` or ``"first_order"``.
        neumann_terms: ``J``, the number of curvature products of the Neumann series (``0`` is
            ``first_order``).
        alpha: the Neumann step; the series converges iff ``alpha * lambda`` in ``(0, 2)`` for
            every eigenvalue of the curvature (see :func:`safe_alpha`).
        scale_by_alpha: multiply the Neumann sum by ``alpha`` so that ``p`` approximates
            ``H^-1 v``. Default ``False``, as in the AuxiLearn reference code (the scale is then in
            the outer learning rate). Applies to ``neumann`` and ``first_order``; ``cg`` and
            ``exact`` always return the true inverse and ignore ``alpha``.
        curvature: ``"hessian"`` (exact Hessian-vector products) or ``"gauss_newton"`` (GGN,
            needs ``outputs`` and ``output_loss``).
        cg_iters: maximum conjugate-gradient iterations.
        cg_tol: stop CG when ``|v - H p| <= cg_tol * |v|``.
        mixed: ``"vjp"`` (default): the mixed term is one backward pass through the retained
            gradient graph. ``"jacobian"``: one first-order backward per element of
            ``outer_params`` (at most :data:`MIXED_JACOBIAN_MAX`); with ``method="first_order"``
            it needs no double backward through the main network when ``phi`` only weights losses.
            ``"directional"``: ``grad_phi directional(p)`` (see ``directional``).
        outputs: for ``gauss_newton``: the tensor(s) ``train_loss`` is computed from.
        output_loss: for ``gauss_newton``: maps ``outputs`` (a tensor, or a list in the order of
            ``outputs``) to the scalar training loss.
        reduce: for data-parallel training, averages a list of tensors over processes in place
            (``auxframe.distributed.all_reduce_mean``); the result is then the hypergradient of
            the losses' mean over processes, the same on every process. None in one process.
        hessian_loss: the scalar whose curvature the products use (``hessian`` curvature), by
            default ``train_loss``; e.g. the training loss on a random part of the batch (see
            the module docstring). Its graph must reach ``inner_params``.
        directional: for ``mixed="directional"``: a callable taking ``p`` (one detached tensor per
            inner parameter) and returning the scalar ``<grad_W train_loss, p>`` as a
            differentiable function of ``outer_params``.
        output_jvp: for ``gauss_newton``: ``v -> J v``, the outputs' directional derivatives
            (e.g. by forward mode; see :class:`GaussNewtonOperator`).

    Returns:
        A :class:`HypergradResult`.

    Raises:
        HypergradError: bad arguments; an operation between the parameters and the loss lacks
            double backward (the message names it and the fix); ``cg`` met non-positive
            curvature; ``exact`` met a singular Hessian or too many parameters.
    """
    inner = _as_list(inner_params, "inner_params")
    outer = _as_list(outer_params, "outer_params")
    _check_options(method, neumann_terms, alpha, cg_iters, cg_tol, mixed, directional)
    needs_curvature = method != "first_order"
    if mixed != "directional" or (needs_curvature and hessian_loss is None):
        _check_loss(train_loss, "train_loss")  # (not differentiated otherwise: may be None)
    _check_loss(outer_loss, "outer_loss")
    if hessian_loss is not None:
        _check_loss(hessian_loss, "hessian_loss")
    inner_ids = {id(t) for t in inner}
    if any(id(t) in inner_ids for t in outer):
        raise HypergradError("a tensor appears in both inner_params and outer_params.")
    if not needs_curvature and (outputs is not None or output_loss is not None):
        raise HypergradError(
            "method='first_order' uses no curvature; leave out outputs and output_loss."
        )
    if needs_curvature:
        _check_curvature(curvature, outputs, output_loss, output_jvp)
    elif output_jvp is not None:
        raise HypergradError("method='first_order' uses no curvature; leave out output_jvp.")
    hint = _fix_hint(method, mixed)
    curvature_loss = train_loss if hessian_loss is None else hessian_loss
    # Second derivatives are taken through every op between W and the curvature loss (Hessian
    # products), W and the outputs (Gauss-Newton by double vjp), W and L_T (mixed='vjp'), or phi
    # and L_T (mixed='jacobian').
    if needs_curvature and curvature == "hessian":
        _check_once_differentiable([curvature_loss], inner, hint)
    elif needs_curvature and output_jvp is None:
        _check_once_differentiable(list(outputs) if not isinstance(outputs, Tensor) else [outputs], inner, hint)
    twice = (inner if mixed == "vjp" else []) + (outer if mixed == "jacobian" else [])
    if twice:
        _check_once_differentiable([train_loss], twice, hint)

    with torch.enable_grad(), _explain_double_backward(hint):
        direct_and_v = torch.autograd.grad(
            outer_loss, inner + outer, retain_graph=True, allow_unused=True
        )
        v = [g.detach() for g in _zeros_for_none(direct_and_v[: len(inner)], inner)]
        direct = _zeros_for_none(direct_and_v[len(inner):], outer)
        if reduce is not None:
            reduce(v)

        # The retained gradient graphs g = grad_W (loss), built only where something needs them.
        train_graph = (
            HessianOperator._from_loss(train_loss, inner, hint) if mixed == "vjp" else None
        )
        curvature_graph = None
        if needs_curvature and curvature == "hessian":
            curvature_graph = (
                train_graph if train_graph is not None and hessian_loss is None
                else HessianOperator._from_loss(curvature_loss, inner, hint)
            )
        operator = None
        if needs_curvature:
            operator = _curvature_operator(
                curvature, curvature_loss, inner, outputs, output_loss, hint, curvature_graph, output_jvp
            )
            operator = _with_reduce(operator, reduce)
        source = operator if operator is not None else train_graph
        reached = source.reached if source is not None else [True] * len(inner)
        v_reached = [t if r else torch.zeros_like(t) for t, r in zip(v, reached)]

        terms = neumann_terms if method == "neumann" else 0
        p, norms = _inverse_hvp(
            method, operator, v_reached, reached, terms, alpha, scale_by_alpha, cg_iters, cg_tol
        )
        if mixed == "vjp":
            mixed_term = _mixed_vjp(train_graph.grads, p, outer)
        elif mixed == "directional":
            mixed_term = _mixed_directional(directional, p, outer)
        else:
            mixed_term = _mixed_jacobian(train_loss, inner, outer, p)

    grads = [(d - m).detach() for d, m in zip(direct, mixed_term)]
    if reduce is not None:  # linear in the local terms, so one reduction covers direct and mixed
        reduce(grads)
    values = torch.stack([_norm(v), *norms]).tolist()
    term_norms = values[1:]
    diverging = not all(math.isfinite(x) for x in term_norms) or (
        len(term_norms) > 1 and term_norms[-1] > term_norms[0]
    )
    return HypergradResult(
        grads=grads, term_norms=term_norms, diverging=diverging, outer_grad_norm=values[0]
    )
