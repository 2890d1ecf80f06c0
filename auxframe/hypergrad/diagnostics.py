"""Diagnostics of the hypergradient: the curvature's scale (alpha for the Neumann series) and divergence.

* :func:`top_eigenvalue`: the eigenvalue of largest magnitude of the Hessian (or Gauss-Newton
  matrix), by power iteration;
* :func:`safe_alpha`: a Neumann step from it, ``alpha * lambda_max = 2 * margin``;
* :func:`diverging`: whether a solver's norms say the series grew (alpha too large, or curvature
  that is not positive).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor

from auxframe.hypergrad._tensors import Params, _as_list, _dot, _norm
from auxframe.hypergrad.errors import _STANDALONE_HINT, HypergradError, _check_once_differentiable
from auxframe.hypergrad.operators import Outputs, _check_curvature, _curvature_operator, _with_reduce


def diverging(norms: Sequence[float]) -> bool:
    """A norm is not finite, or the last exceeds the first: the Neumann series grows (``alpha``
    too large or curvature not positive; for conjugate gradients: the residual grew)."""
    return not all(math.isfinite(x) for x in norms) or (len(norms) > 1 and norms[-1] > norms[0])


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
