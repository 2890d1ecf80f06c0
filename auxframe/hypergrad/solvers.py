"""Linear solvers for ``A x = b`` with one signature, ``solver(matvec, b) -> Solution``.

As in TorchOpt's ``linear_solve``, a solver only sees ``matvec`` (``x -> A x`` on a list of
tensors, one per parameter) and the right-hand side ``b``, so the solvers below are
interchangeable wherever an inverse-curvature-vector product is needed; each one's settings are
fixed when it is made:

* :class:`Neumann`: the truncated series ``x = sum_{j=0..terms} (I - alpha A)^j b`` (times
  ``alpha`` with ``scale_by_alpha``, which makes it approximate ``A^-1 b``). It converges iff
  ``alpha * lambda`` lies in ``(0, 2)`` for every eigenvalue ``lambda`` of ``A``. No host
  synchronisation: ``alpha`` may be a 0-dim tensor, and the term norms stay tensors (a CUDA graph
  captures it, :mod:`auxframe.weighting.graphed`). ``terms=0`` is the first-order
  approximation ``x = b`` and needs no product at all.
* :class:`ConjugateGradient`: conjugate gradients, for ``A`` positive definite along the way.
* :class:`Exact`: the dense ``A`` from one product per unknown, then a linear solve (small
  problems: refused above :data:`EXACT_MAX_PARAMS` unknowns).

Any callable with this signature (and a ``needs_matvec`` attribute, True when it calls
``matvec``) can be passed to :func:`auxframe.hypergrad.hypergradient` as ``solver=``.

Example:
    >>> H = HessianOperator(loss, params)
    >>> for solve in (Neumann(terms=10, alpha=0.1, scale_by_alpha=True), ConjugateGradient(), Exact()):
    ...     x, norms = solve(H, b)            # three approximations of H^-1 b
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import torch
from torch import Tensor

from auxframe.hypergrad._tensors import _axpy, _dot, _norm
from auxframe.hypergrad.errors import HypergradError

#: :class:`Exact` builds a dense ``n x n`` matrix with ``n`` products; it refuses larger ``n``.
EXACT_MAX_PARAMS = 2_000

#: ``x -> A x`` on one tensor per unknown block (a curvature operator of :mod:`.operators`).
MatVec = Callable[[list[Tensor]], list[Tensor]]


class Solution(NamedTuple):
    """What a solver returns.

    Attributes:
        x: the solution, one tensor per block of ``b``.
        norms: 0-dim tensors (read them when convenient: no host synchronisation here).
            :class:`Neumann`: the norm of each term ``(I - alpha A)^j b``, ``j = 0..terms``;
            :class:`ConjugateGradient`: the residual norm ``|b - A x|`` at each iteration, the
            first being ``|b|``; :class:`Exact`: ``[|x|]``.
    """

    x: list[Tensor]
    norms: list[Tensor]


@dataclass(frozen=True)
class Neumann:
    """``x = sum_{j=0..terms} (I - alpha A)^j b``, times ``alpha`` when ``scale_by_alpha``.

    Since ``A^-1 = alpha * sum_{j>=0} (I - alpha A)^j``, the scaled series approximates ``A^-1 b``;
    the AuxiLearn reference code leaves the factor out (the outer learning rate absorbs it).

    Args:
        terms: J, the number of products (0: ``x = b``, the first-order approximation).
        alpha: the step, a float or a 0-dim tensor.
        scale_by_alpha: multiply the sum by ``alpha``.
    """

    terms: int = 3
    alpha: float | Tensor = 1e-2
    scale_by_alpha: bool = False

    @property
    def needs_matvec(self) -> bool:
        return self.terms > 0

    def __call__(self, matvec: MatVec, b: Sequence[Tensor]) -> Solution:
        term = list(b)
        x = [t.clone() for t in b]
        norms = [_norm(term)]
        for _ in range(self.terms):
            term = _axpy(-self.alpha, matvec(term), term)
            x = [a + t for a, t in zip(x, term)]
            norms.append(_norm(term))
        if self.scale_by_alpha:
            x = [self.alpha * t for t in x]
        return Solution(x, norms)


@dataclass(frozen=True)
class ConjugateGradient:
    """Conjugate gradients on ``A x = b``, stopping when ``|b - A x| <= tol * |b|``.

    Raises:
        HypergradError: it met a direction of non-positive curvature (``A`` is not positive
            definite there).
    """

    iters: int = 100
    tol: float = 1e-6
    needs_matvec = True

    def __call__(self, matvec: MatVec, b: Sequence[Tensor]) -> Solution:
        x = [torch.zeros_like(t) for t in b]
        r = [t.clone() for t in b]
        d = [t.clone() for t in b]
        rs = _dot(r, r)
        norms = [rs.sqrt()]
        target = self.tol * norms[0].item()
        for i in range(self.iters):
            if norms[-1].item() <= target:
                break
            ad = matvec(d)
            curvature = _dot(d, ad)
            if not curvature.item() > 0.0:
                raise HypergradError(
                    f"conjugate gradients met curvature d^T H d = {curvature.item():.3g} <= 0 at "
                    f"iteration {i}: the Hessian of train_loss w.r.t. inner_params is not positive "
                    "definite here (W is not at a strict local minimum of train_loss, or the loss is "
                    "non-convex there). Use curvature='gauss_newton' (positive semi-definite), "
                    "method='exact' (any invertible Hessian), or train W closer to its optimum."
                )
            step = rs / curvature
            x = _axpy(step, d, x)
            r = _axpy(-step, ad, r)
            rs_new = _dot(r, r)
            d = _axpy(rs_new / rs, d, r)
            rs = rs_new
            norms.append(rs.sqrt())
        return Solution(x, norms)


@dataclass(frozen=True)
class Exact:
    """The dense matrix from one product per unknown (symmetrised), then ``torch.linalg.solve``.

    Raises:
        HypergradError: more than ``max_params`` unknowns (default :data:`EXACT_MAX_PARAMS`,
            read when called), or a singular matrix.
    """

    max_params: int | None = None
    needs_matvec = True

    def __call__(self, matvec: MatVec, b: Sequence[Tensor]) -> Solution:
        b = list(b)
        sizes = [t.numel() for t in b]
        n = sum(sizes)
        limit = EXACT_MAX_PARAMS if self.max_params is None else self.max_params
        if n > limit:
            raise HypergradError(
                f"method='exact' builds the dense Hessian with one product per parameter element; "
                f"{n:,} elements exceed EXACT_MAX_PARAMS = {limit:,}. "
                f"Use method='cg' or method='neumann'."
            )
        columns = []
        for k in range(n):
            unit = torch.zeros(n, dtype=torch.float64)
            unit[k] = 1.0
            e = [piece.reshape(t.shape).to(t) for piece, t in zip(unit.split(sizes), b)]
            columns.append(torch.cat([h.reshape(-1).double().cpu() for h in matvec(e)]))
        matrix = torch.stack(columns, dim=1) if columns else torch.zeros(0, 0, dtype=torch.float64)
        matrix = (matrix + matrix.T) / 2
        rhs = torch.cat([t.reshape(-1).double().cpu() for t in b]) if b else matrix[:, 0]
        solution, info = torch.linalg.solve_ex(matrix, rhs)
        if info.item() != 0 or not torch.isfinite(solution).all():
            raise HypergradError(
                "the Hessian of train_loss w.r.t. inner_params is singular, so the implicit function "
                "theorem does not apply at this W. Add weight decay to train_loss, or use "
                "method='neumann'."
            )
        x = [piece.reshape(t.shape).to(t) for piece, t in zip(solution.split(sizes), b)]
        return Solution(x, [_norm(x)])


Solver = Callable[[MatVec, Sequence[Tensor]], Solution]

METHODS = ("neumann", "cg", "exact", "first_order")


def solver_for(method: str, *, neumann_terms: int = 3, alpha: float | Tensor = 1e-2, scale_by_alpha: bool = False,
               cg_iters: int = 100, cg_tol: float = 1e-6) -> Solver:
    """The solver a ``method=`` name of :func:`auxframe.hypergrad.hypergradient` stands for."""
    if method == "neumann":
        return Neumann(neumann_terms, alpha, scale_by_alpha)
    if method == "first_order":
        return Neumann(0, alpha, scale_by_alpha)
    if method == "cg":
        return ConjugateGradient(cg_iters, cg_tol)
    if method == "exact":
        return Exact()
    raise HypergradError(f"unknown method '{method}'; choose one of {METHODS}.")


def restricted(matvec: MatVec, like: Sequence[Tensor], active: Sequence[int]) -> MatVec:
    """``matvec`` on the blocks ``active`` of ``like`` only, the others held at zero (the
    parameters a loss does not reach, whose rows and columns of the curvature are zero)."""

    def product(x: list[Tensor]) -> list[Tensor]:
        full = [torch.zeros_like(t) for t in like]
        for i, xi in zip(active, x):
            full[i] = xi
        out = matvec(full)
        return [out[i] for i in active]

    return product
