"""The implicit hypergradient: the public function, made of the operators, a solver and the diagnostics."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Sequence

import torch
from torch import Tensor

from auxframe.hypergrad._tensors import Params, _as_list, _check_loss, _norm, _zeros_for_none
from auxframe.hypergrad.diagnostics import diverging
from auxframe.hypergrad.errors import (
    _STANDALONE_HINT,
    HypergradError,
    _check_once_differentiable,
    _explain_double_backward,
    _fix_hint,
)
from auxframe.hypergrad.operators import (
    HessianOperator,
    Outputs,
    _check_curvature,
    _curvature_operator,
    _with_reduce,
    mixed_directional,
    mixed_jacobian,
    mixed_vjp,
)
from auxframe.hypergrad.solvers import METHODS, Solver, restricted, solver_for

MIXED = ("vjp", "jacobian", "directional")


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


def _check_options(method, neumann_terms, alpha, cg_iters, cg_tol, mixed, directional=None):
    """Raise :class:`HypergradError` on an unknown method or an out-of-range setting."""
    if not callable(method) and method not in METHODS:
        raise HypergradError(f"unknown method '{method}'; choose one of {METHODS}, or pass a solver.")
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


def hypergradient(
    train_loss: Tensor | None,
    outer_loss: Tensor,
    inner_params: Params,
    outer_params: Params,
    *,
    method: str | Solver = "neumann",
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
        method: ``"neumann"``, ``"cg"``, ``"exact"`` or ``"first_order"``, or a solver
            ``solver(matvec, b) -> Solution`` (:mod:`auxframe.hypergrad.solvers`; then
            ``neumann_terms``, ``alpha``, ``scale_by_alpha``, ``cg_iters`` and ``cg_tol`` are the
            solver's own, not these).
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
    solver = method if callable(method) else solver_for(
        method, neumann_terms=neumann_terms, alpha=alpha, scale_by_alpha=scale_by_alpha, cg_iters=cg_iters,
        cg_tol=cg_tol,
    )
    needs_curvature = getattr(solver, "needs_matvec", True) if callable(method) else method != "first_order"
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
    hint = _fix_hint(method if isinstance(method, str) else "neumann", mixed)
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

    parts = hypergradient_parts(
        train_loss, outer_loss, inner, outer, solver, needs_curvature=needs_curvature, curvature=curvature,
        mixed=mixed, outputs=outputs, output_loss=output_loss, reduce=reduce, hessian_loss=hessian_loss,
        directional=directional, output_jvp=output_jvp, hint=hint,
    )
    values = torch.stack([parts.outer_grad_norm, *parts.norms]).tolist()  # (one host synchronisation)
    return HypergradResult(
        grads=parts.grads, term_norms=values[1:], diverging=diverging(values[1:]), outer_grad_norm=values[0]
    )


class HypergradParts(NamedTuple):
    """:func:`hypergradient_parts`' result: tensors only, nothing read on the host.

    Attributes:
        grads: the hypergradient, one tensor per outer parameter.
        norms: the solver's norms (:class:`~auxframe.hypergrad.solvers.Solution`), 0-dim tensors.
        outer_grad_norm: ``|grad_W outer_loss|``, a 0-dim tensor.
    """

    grads: list[Tensor]
    norms: list[Tensor]
    outer_grad_norm: Tensor


def hypergradient_parts(
    train_loss: Tensor | None,
    outer_loss: Tensor,
    inner: list[Tensor],
    outer: list[Tensor],
    solver: Solver,
    *,
    needs_curvature: bool = True,
    curvature: str = "hessian",
    mixed: str = "vjp",
    outputs: Outputs | None = None,
    output_loss: Callable[..., Tensor] | None = None,
    reduce: Callable[[list[Tensor]], None] | None = None,
    hessian_loss: Tensor | None = None,
    directional: Callable[[list[Tensor]], Tensor] | None = None,
    output_jvp: Callable[[list[Tensor]], Sequence[Tensor]] | None = None,
    hint: str = _STANDALONE_HINT,
) -> HypergradParts:
    """The computation of :func:`hypergradient`, on arguments it has checked, with no host
    synchronisation where the solver has none (:class:`~auxframe.hypergrad.solvers.Neumann`):
    what a CUDA graph captures (:mod:`auxframe.weighting.graphed`).

    ``v = grad_W outer_loss``; ``p = solver(curvature operator, v)`` over the inner parameters
    the curvature reaches (the others hold ``p = 0``); the result is ``grad_phi outer_loss`` minus
    the mixed term ``(d2 L_T / dW dphi)^T p``.
    """
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
        curvature_loss = train_loss if hessian_loss is None else hessian_loss
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
        active = [i for i, r in enumerate(reached) if r]
        matvec = restricted(operator, inner, active) if operator is not None else _no_curvature
        solution = solver(matvec, [v[i] for i in active])
        p = [torch.zeros_like(t) for t in v]
        for i, x in zip(active, solution.x):
            p[i] = x
        if mixed == "vjp":
            mixed_term = mixed_vjp(train_graph.grads, p, outer)
        elif mixed == "directional":
            mixed_term = mixed_directional(directional, p, outer)
        else:
            mixed_term = mixed_jacobian(train_loss, inner, outer, p)

    grads = [(d - m).detach() for d, m in zip(direct, mixed_term)]
    if reduce is not None:  # linear in the local terms, so one reduction covers direct and mixed
        reduce(grads)
    return HypergradParts(grads, list(solution.norms), _norm(v))


def _no_curvature(vector: list[Tensor]) -> list[Tensor]:
    raise HypergradError("this solver asks for curvature products, but method='first_order' builds none; "
                         "pass a solver with needs_matvec = True.")
