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
  outer learning rate absorb it; so does this package by default (``scale_by_alpha=False``), so that
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
tensors, so this package takes it from the caller (``mixed="directional"``).

This package knows nothing about tasks or trainers: it takes scalar losses and lists of tensors.
Its parts:

* :mod:`.operators`: the curvature operators (:class:`HessianOperator`,
  :class:`GaussNewtonOperator`) and the mixed term;
* :mod:`.solvers`: linear solvers with one signature, ``solver(matvec, b)`` (:class:`Neumann`,
  :class:`ConjugateGradient`, :class:`Exact`), interchangeable: pass one as ``method=``;
* :mod:`.diagnostics`: :func:`top_eigenvalue`, :func:`safe_alpha`, :func:`diverging`;
* :mod:`.implicit`: :func:`hypergradient`, and :func:`hypergradient_parts`, the same computation
  with no host synchronisation (what :mod:`auxframe.weighting.graphed` captures in a CUDA graph);
* :mod:`.errors`: :class:`HypergradError` and the detection of operations without double backward.

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

from auxframe.hypergrad.diagnostics import diverging, safe_alpha, top_eigenvalue
from auxframe.hypergrad.errors import HypergradError
from auxframe.hypergrad.implicit import HypergradParts, HypergradResult, hypergradient, hypergradient_parts
from auxframe.hypergrad.operators import (
    MIXED_JACOBIAN_MAX,
    GaussNewtonOperator,
    HessianOperator,
    gauss_newton_vector_product,
    hessian_vector_product,
    mixed_directional,
    mixed_jacobian,
    mixed_vjp,
)
from auxframe.hypergrad.solvers import EXACT_MAX_PARAMS, ConjugateGradient, Exact, Neumann, Solution, Solver

__all__ = [
    "EXACT_MAX_PARAMS",
    "MIXED_JACOBIAN_MAX",
    "ConjugateGradient",
    "Exact",
    "GaussNewtonOperator",
    "HessianOperator",
    "HypergradError",
    "HypergradParts",
    "HypergradResult",
    "Neumann",
    "Solution",
    "Solver",
    "diverging",
    "gauss_newton_vector_product",
    "hessian_vector_product",
    "hypergradient",
    "hypergradient_parts",
    "mixed_directional",
    "mixed_jacobian",
    "mixed_vjp",
    "safe_alpha",
    "top_eigenvalue",
]
