"""Curvature operators and the mixed term: the linear maps an implicit hypergradient is made of.

* :class:`HessianOperator`: ``v -> H v``, reverse over reverse on a gradient graph built once.
* :class:`GaussNewtonOperator`: ``v -> J^T H_out J v`` (positive semi-definite for convex output
  losses), with ``J v`` by a double vjp or by the caller's forward-mode pass.
* The mixed term ``(d2 L_T / dW dphi)^T p``: :func:`mixed_vjp` (one backward through the retained
  gradient graph), :func:`mixed_jacobian` (one first-order backward per element of phi) and
  :func:`mixed_directional` (``grad_phi`` of a directional derivative the caller computes).

Each product is a list of tensors, one per parameter, detached; the solvers
(:mod:`auxframe.hypergrad.solvers`) take any of the operators as their ``matvec``.
"""

from __future__ import annotations

from typing import Callable, Sequence, Union

import torch
from torch import Tensor

from auxframe.hypergrad._tensors import (
    Params,
    _as_list,
    _check_loss,
    _dot,
    _leaves_reached,
    _requires_grad,
    _zeros_for_none,
)
from auxframe.hypergrad.errors import (
    _STANDALONE_HINT,
    HypergradError,
    _check_once_differentiable,
    _explain_double_backward,
)

#: ``mixed="jacobian"`` runs one backward pass per element of ``outer_params``; it refuses more.
MIXED_JACOBIAN_MAX = 1_000

CURVATURES = ("hessian", "gauss_newton")

Outputs = Union[Tensor, Sequence[Tensor]]


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

    @classmethod
    def from_gradients(cls, grads: Sequence[Tensor | None], params: Params) -> HessianOperator:
        """The operator of a gradient graph the caller already built,
        ``grads = autograd.grad(loss, params, create_graph=True, allow_unused=True)`` (e.g. the
        inner step's own, reused for an outer step)."""
        operator = cls.__new__(cls)
        operator.params, operator._hint = _as_list(params, "params"), _STANDALONE_HINT
        operator.reached = [g is not None for g in grads]
        operator.grads = _zeros_for_none(grads, operator.params)
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


# -- the mixed term -------------------------------------------------------------------------


def mixed_vjp(grads: list[Tensor], p: list[Tensor], outer: list[Tensor]) -> list[Tensor]:
    """``grad_phi (g . p)`` on the retained gradient graph ``g = grad_W L_T``."""
    pairs = [(g, q) for g, q in zip(grads, p) if g.requires_grad]
    if not pairs:
        return [torch.zeros_like(t) for t in outer]
    mixed = torch.autograd.grad(
        [g for g, _ in pairs], outer, [q for _, q in pairs], retain_graph=True, allow_unused=True
    )
    return _zeros_for_none(mixed, outer)


def mixed_directional(directional, p: list[Tensor], outer: list[Tensor]) -> list[Tensor]:
    """``grad_phi <grad_W L_T, p>`` from the caller's directional derivative ``directional(p)``."""
    value = directional([t.detach() for t in p])
    if not isinstance(value, Tensor) or value.numel() != 1:
        raise HypergradError("directional(p) must return a scalar tensor <grad_W train_loss, p>.")
    if not value.requires_grad:
        return [torch.zeros_like(t) for t in outer]
    mixed = torch.autograd.grad(value, outer, allow_unused=True)
    return _zeros_for_none(mixed, outer)


def mixed_jacobian(
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
