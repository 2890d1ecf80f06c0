"""auxframe.hypergrad against mathematics: closed forms, finite differences, dense matrices.

Every reference here is computed without auxframe.hypergrad: the ridge hypergradient by autograd
through ``torch.linalg.solve`` of the normal equations (and by hand), the nonlinear one by finite
differences of re-optimised networks, Hessians and Gauss-Newton matrices densely with
``torch.autograd.functional``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

from auxframe.errors import AuxframeError
from auxframe.hypergrad import errors, solvers
from auxframe.hypergrad import (
    GaussNewtonOperator,
    HessianOperator,
    HypergradError,
    gauss_newton_vector_product,
    hessian_vector_product,
    hypergradient,
    safe_alpha,
    top_eigenvalue,
)

DT = torch.float64


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# ---------------------------------------------------------------------------------------------
# Ridge regression: W*(phi) = argmin ||XW-y||^2/n + sum_k phi_k ||X_k W-y_k||^2/n_k + lam ||W||^2


class Ridge:
    """Main data, two auxiliary data sets weighted by phi, weight decay, held-out aux set."""

    def __init__(self, d: int = 6, lam: float = 0.1, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        def data(n):
            return torch.randn(n, d, generator=g, dtype=DT), torch.randn(n, generator=g, dtype=DT)

        self.main = data(20)
        self.aux = [data(15), data(12)]
        self.held_out = data(25)
        self.lam = lam
        self.d = d
        self.phi = torch.tensor([0.7, 1.3], dtype=DT)

    def train_loss(self, W, phi):
        (X, y), ((X1, y1), (X2, y2)) = self.main, self.aux
        return (
            ((X @ W - y) ** 2).mean()
            + phi[0] * ((X1 @ W - y1) ** 2).mean()
            + phi[1] * ((X2 @ W - y2) ** 2).mean()
            + self.lam * (W**2).sum()
        )

    def outer_loss(self, W):
        Xa, ya = self.held_out
        return ((Xa @ W - ya) ** 2).sum()

    def normal_equations(self, phi):
        """``A W* = b`` with ``A = H / 2``."""
        terms = [(self.main, 1.0)] + list(zip(self.aux, phi))
        A = sum(w * X.T @ X / len(X) for (X, _), w in terms) + self.lam * torch.eye(self.d, dtype=DT)
        b = sum(w * X.T @ y / len(X) for (X, y), w in terms)
        return A, b

    def optimum(self, phi):
        A, b = self.normal_equations(phi)
        return torch.linalg.solve(A, b)

    def analytic_hypergradient(self):
        """d L_A(W*(phi)) / d phi by autograd through the closed form."""
        phi = self.phi.clone().requires_grad_()
        (grad,) = torch.autograd.grad(self.outer_loss(self.optimum(phi)), phi)
        return grad

    def at_optimum(self):
        """W = W*(phi), phi as leaves, and both losses there."""
        W = self.optimum(self.phi).requires_grad_()
        phi = self.phi.clone().requires_grad_()
        return W, phi, self.train_loss(W, phi), self.outer_loss(W)

    def hessian(self):
        return 2 * self.normal_equations(self.phi)[0]


@pytest.fixture(scope="module")
def ridge():
    return Ridge()


def test_ridge_reference_agrees_with_hand_derivation(ridge):
    # By hand: A W* = b with dA/dphi_k = X_k^T X_k / n_k, db/dphi_k = X_k^T y_k / n_k, so
    # dW*/dphi_k = A^-1 (X_k^T y_k - X_k^T X_k W*) / n_k and dL_A/dphi_k = grad L_A . dW*/dphi_k.
    A, _ = ridge.normal_equations(ridge.phi)
    W = ridge.optimum(ridge.phi)
    Xa, ya = ridge.held_out
    grad_la = 2 * Xa.T @ (Xa @ W - ya)
    by_hand = torch.stack(
        [grad_la @ torch.linalg.solve(A, X.T @ (y - X @ W) / len(X)) for X, y in ridge.aux]
    )
    assert rel_err(ridge.analytic_hypergradient(), by_hand) < 1e-10
    assert by_hand.abs().min() > 1e-3  # a non-trivial reference


@pytest.mark.parametrize("mixed", ["vjp", "jacobian"])
@pytest.mark.parametrize("method", ["exact", "cg"])
def test_exact_and_cg_match_closed_form(ridge, method, mixed):
    W, phi, train, outer = ridge.at_optimum()
    result = hypergradient(train, outer, [W], [phi], method=method, mixed=mixed)
    assert rel_err(result.grads[0], ridge.analytic_hypergradient()) <= 1e-4
    assert not result.diverging
    assert result.outer_grad_norm == pytest.approx(
        torch.autograd.grad(ridge.outer_loss(W), W)[0].norm().item()
    )


def test_cg_residuals_shrink_to_tolerance(ridge):
    W, phi, train, outer = ridge.at_optimum()
    result = hypergradient(train, outer, [W], [phi], method="cg", cg_tol=1e-9)
    assert result.term_norms[0] == pytest.approx(result.outer_grad_norm)
    assert result.term_norms[-1] <= 1e-9 * result.term_norms[0]
    assert len(result.term_norms) <= ridge.d + 2  # CG is exact in at most d steps


def test_neumann_error_decreases_with_terms(ridge):
    H = ridge.hessian()
    eigs = torch.linalg.eigvalsh(H)
    alpha = 1.0 / eigs.max().item()  # alpha * lambda in (0, 1]: convergent
    truth = ridge.analytic_hypergradient()
    # Truncation error of p: -(I - alpha H)^(J+1) H^-1 v; mapped by the mixed matrix M.
    W, phi, *_ = ridge.at_optimum()
    v = torch.autograd.grad(ridge.outer_loss(W), W)[0]
    M = torch.stack([2 * X.T @ (X @ W - y) / len(X) for X, y in ridge.aux]).detach()  # d/dphi grad_W
    contraction = 1 - alpha * eigs.min().item()
    errors = []
    for J in (0, 2, 5, 10, 50):
        W, phi, train, outer = ridge.at_optimum()
        result = hypergradient(
            train, outer, [W], [phi], neumann_terms=J, alpha=alpha, scale_by_alpha=True
        )
        assert len(result.term_norms) == J + 1
        assert not result.diverging
        errors.append((result.grads[0] - truth).norm().item())
        bound = M.norm(2).item() * contraction ** (J + 1) * torch.linalg.solve(H, v).norm().item()
        assert errors[-1] <= bound * (1 + 1e-9)
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] / truth.norm().item() < 1e-6
    assert errors[0] / truth.norm().item() > 0.1  # J = 0 is a poor approximation here


def test_scale_by_alpha_convention(ridge):
    alpha = 0.05
    runs = {}
    for scale in (False, True):
        W, phi, train, outer = ridge.at_optimum()
        runs[scale] = hypergradient(
            train, outer, [W], [phi], neumann_terms=4, alpha=alpha, scale_by_alpha=scale
        ).grads[0]
    torch.testing.assert_close(runs[False], runs[True] / alpha, rtol=1e-12, atol=0)
    # first_order is the J = 0 series: -alpha * M^T v when scaled.
    W, phi, train, outer = ridge.at_optimum()
    first = hypergradient(
        train, outer, [W], [phi], method="first_order", alpha=alpha, scale_by_alpha=True
    )
    v = torch.autograd.grad(ridge.outer_loss(W), W)[0]
    M = torch.stack([2 * X.T @ (X @ W - y) / len(X) for X, y in ridge.aux])
    torch.testing.assert_close(first.grads[0], -alpha * M @ v, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("method", ["exact", "cg"])
def test_gauss_newton_equals_hessian_for_linear_outputs(ridge, method):
    # Outputs linear in W (predictions, and W itself for the penalty): the GGN is the Hessian.
    W, phi, train, outer = ridge.at_optimum()
    Xs = [ridge.main[0], *(X for X, _ in ridge.aux)]
    ys = [ridge.main[1], *(y for _, y in ridge.aux)]
    outputs = [X @ W for X in Xs] + [W]

    def output_loss(outs):
        weights = [1.0, phi[0], phi[1]]
        fit = sum(w * ((o - y) ** 2).mean() for w, o, y in zip(weights, outs, ys))
        return fit + ridge.lam * (outs[-1] ** 2).sum()

    result = hypergradient(
        train, outer, [W], [phi], method=method, curvature="gauss_newton",
        outputs=outputs, output_loss=output_loss,
    )
    assert rel_err(result.grads[0], ridge.analytic_hypergradient()) <= 1e-4


# ---------------------------------------------------------------------------------------------
# A tiny tanh network: finite differences through re-optimisation


class TanhNet:
    shapes = [(4, 2), (4,), (1, 4), (1,)]

    def __init__(self):
        g = torch.Generator().manual_seed(3)
        def data(n):
            return (
                torch.randn(n, 2, generator=g, dtype=DT),
                torch.randn(n, 1, generator=g, dtype=DT),
            )

        self.main, self.aux, self.held_out = data(12), [data(10), data(9)], data(15)
        self.start = [0.5 * torch.randn(s, generator=g, dtype=DT) for s in self.shapes]
        self.phi = torch.tensor([0.6, 1.4], dtype=DT)
        self.lam = 1e-2

    @staticmethod
    def forward(params, x):
        W1, b1, W2, b2 = params
        return torch.tanh(x @ W1.T + b1) @ W2.T + b2

    def train_loss(self, params, phi):
        mse = lambda xy: ((self.forward(params, xy[0]) - xy[1]) ** 2).mean()  # noqa: E731
        decay = sum((p**2).sum() for p in params)
        return mse(self.main) + phi[0] * mse(self.aux[0]) + phi[1] * mse(self.aux[1]) + self.lam * decay

    def outer_loss(self, params):
        x, y = self.held_out
        return ((self.forward(params, x) - y) ** 2).mean()

    def optimum(self, phi):
        params = [p.clone().requires_grad_() for p in self.start]
        opt = torch.optim.LBFGS(
            params, lr=1, max_iter=1000, tolerance_grad=1e-14, tolerance_change=0,
            history_size=50, line_search_fn="strong_wolfe",
        )

        def closure():
            opt.zero_grad()
            loss = self.train_loss(params, phi)
            loss.backward()
            return loss

        opt.step(closure)
        # Polish with Newton steps on the dense Hessian (13 parameters): machine precision.
        sizes = [p.numel() for p in params]
        theta = torch.cat([p.detach().reshape(-1) for p in params])
        loss_of = lambda th: self.train_loss(  # noqa: E731
            [t.reshape(s) for t, s in zip(th.split(sizes), self.shapes)], phi
        )
        for _ in range(4):
            grad = torch.autograd.functional.jacobian(loss_of, theta)
            theta = theta - torch.linalg.solve(torch.autograd.functional.hessian(loss_of, theta), grad)
        assert torch.autograd.functional.jacobian(loss_of, theta).abs().max() < 1e-13, "not solved"
        return [t.reshape(s).clone().requires_grad_() for t, s in zip(theta.split(sizes), self.shapes)]


def test_finite_differences_on_tanh_network():
    net = TanhNet()
    params = net.optimum(net.phi)
    phi = net.phi.clone().requires_grad_()

    eps = 1e-4
    fd = []
    for i in range(len(net.phi)):
        step = torch.zeros_like(net.phi)
        step[i] = eps
        plus = net.outer_loss(net.optimum(net.phi + step)).item()
        minus = net.outer_loss(net.optimum(net.phi - step)).item()
        fd.append((plus - minus) / (2 * eps))
    fd = torch.tensor(fd, dtype=DT)
    assert fd.abs().min() > 1e-3

    # The inner optimum is a strict local minimum (else the theorem does not apply).
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    sizes = [p.numel() for p in params]

    def loss_of_flat(theta):
        parts = [t.reshape(s) for t, s in zip(theta.split(sizes), net.shapes)]
        return net.train_loss(parts, net.phi)

    assert torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss_of_flat, flat)).min() > 0

    for method in ("exact", "cg"):
        result = hypergradient(
            net.train_loss(params, phi), net.outer_loss(params), params, [phi], method=method
        )
        assert rel_err(result.grads[0], fd) < 1e-5, (method, result.grads[0], fd)


# ---------------------------------------------------------------------------------------------
# Gauss-Newton, curvature estimates, step sizes


def _mlp_classifier(seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 3, generator=g, dtype=DT)
    y = torch.randint(0, 3, (8,), generator=g)
    shapes = [(4, 3), (4,), (3, 4), (3,)]
    params = [torch.randn(s, generator=g, dtype=DT).requires_grad_() for s in shapes]

    def forward(ps):
        return torch.tanh(x @ ps[0].T + ps[1]) @ ps[2].T + ps[3]

    return params, forward, (lambda z: F.cross_entropy(z, y)), x, y


def _dense(operator, params):
    n = sum(p.numel() for p in params)
    cols = []
    for k in range(n):
        e = torch.zeros(n, dtype=DT)
        e[k] = 1
        parts = [t.reshape(p.shape) for t, p in zip(e.split([p.numel() for p in params]), params)]
        cols.append(torch.cat([c.reshape(-1) for c in operator(parts)]))
    return torch.stack(cols, dim=1)


def test_gauss_newton_is_psd_and_equals_dense_jthj():
    params, forward, ce, *_ = _mlp_classifier()
    sizes = [p.numel() for p in params]
    unflat = lambda th: [t.reshape(p.shape) for t, p in zip(th.split(sizes), params)]  # noqa: E731
    flat = torch.cat([p.detach().reshape(-1) for p in params])

    hessian = torch.autograd.functional.hessian(lambda th: ce(forward(unflat(th))), flat)
    assert torch.linalg.eigvalsh(hessian).min() < -1e-4  # indefinite here: GGN != Hessian

    logits = forward(params)
    G = _dense(GaussNewtonOperator(logits, ce, params), params)
    torch.testing.assert_close(G, G.T, rtol=0, atol=1e-12)
    assert torch.linalg.eigvalsh(G).min() >= -1e-8

    J = torch.autograd.functional.jacobian(lambda th: forward(unflat(th)).reshape(-1), flat)
    H_out = torch.autograd.functional.hessian(
        lambda z: ce(z.reshape(logits.shape)), logits.detach().reshape(-1)
    )
    torch.testing.assert_close(G, J.T @ H_out @ J, rtol=1e-10, atol=1e-12)

    v = [torch.randn_like(p) for p in params]
    one_shot = gauss_newton_vector_product(forward(params), ce, params, v)
    torch.testing.assert_close(
        torch.cat([t.reshape(-1) for t in one_shot]),
        G @ torch.cat([t.reshape(-1) for t in v]),
        rtol=1e-10, atol=1e-12,
    )
    estimate = top_eigenvalue(
        ce(logits), params, iters=100, curvature="gauss_newton", outputs=logits, output_loss=ce
    )
    assert estimate == pytest.approx(torch.linalg.eigvalsh(G).max().item(), rel=1e-4)


def test_gauss_newton_with_a_forward_mode_jvp_equals_dense_jthj():
    params, forward, ce, *_ = _mlp_classifier(seed=3)
    sizes = [p.numel() for p in params]
    unflat = lambda th: [t.reshape(p.shape) for t, p in zip(th.split(sizes), params)]  # noqa: E731
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    logits = forward(params)

    def jvp(v):  # J v by forward-mode AD of the network, as AuxiLearn does for the model
        with fwAD.dual_level():
            out = forward([fwAD.make_dual(p.detach(), t) for p, t in zip(params, v)])
            return [fwAD.unpack_dual(out).tangent]

    G = _dense(GaussNewtonOperator(logits, ce, params, jvp=jvp), params)
    J = torch.autograd.functional.jacobian(lambda th: forward(unflat(th)).reshape(-1), flat)
    H_out = torch.autograd.functional.hessian(lambda z: ce(z.reshape(logits.shape)), logits.detach().reshape(-1))
    torch.testing.assert_close(G, J.T @ H_out @ J, rtol=1e-10, atol=1e-12)
    # through hypergradient and top_eigenvalue too (the same numbers as the double-vjp products)
    phi = torch.tensor(1.5, dtype=DT, requires_grad=True)
    loss = phi * ce(logits)
    outer = (forward(params) ** 2).mean()
    kwargs = dict(method="neumann", neumann_terms=4, alpha=0.3, curvature="gauss_newton", outputs=logits,
                  output_loss=lambda z: phi.detach() * ce(z))
    plain = hypergradient(loss, outer, params, [phi], **kwargs)
    fast = hypergradient(loss, outer, params, [phi], output_jvp=jvp, **kwargs)
    torch.testing.assert_close(fast.grads[0], plain.grads[0], rtol=1e-10, atol=1e-14)
    assert top_eigenvalue(ce(logits), params, iters=50, curvature="gauss_newton", outputs=logits, output_loss=ce,
                          output_jvp=jvp) == pytest.approx(torch.linalg.eigvalsh(G).max().item(), rel=1e-3)
    with pytest.raises(HypergradError, match="output_jvp is only used with curvature='gauss_newton'"):
        hypergradient(loss, outer, params, [phi], output_jvp=jvp)


def test_hessian_vector_product_matches_dense_hessian():
    params, forward, ce, *_ = _mlp_classifier(seed=2)
    sizes = [p.numel() for p in params]
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    unflat = lambda th: [t.reshape(p.shape) for t, p in zip(th.split(sizes), params)]  # noqa: E731
    H = torch.autograd.functional.hessian(lambda th: ce(forward(unflat(th))), flat)
    v = [torch.randn_like(p) for p in params]
    hv = hessian_vector_product(ce(forward(params)), params, v)
    torch.testing.assert_close(
        torch.cat([t.reshape(-1) for t in hv]),
        H @ torch.cat([t.reshape(-1) for t in v]),
        rtol=1e-10, atol=1e-12,
    )


def test_top_eigenvalue_matches_eigvalsh(ridge):
    W, phi, train, _ = ridge.at_optimum()
    expected = torch.linalg.eigvalsh(ridge.hessian()).max().item()
    assert top_eigenvalue(train, [W], iters=50) == pytest.approx(expected, rel=1e-6)
    assert top_eigenvalue(train, [W], iters=20) == pytest.approx(expected, rel=1e-2)


def test_top_eigenvalue_reports_dominant_negative_curvature():
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=DT))
    A = Q @ torch.diag(torch.tensor([-5.0, 0.5, 1.0, 2.0], dtype=DT)) @ Q.T
    W = torch.randn(4, generator=g, dtype=DT, requires_grad=True)
    assert top_eigenvalue(0.5 * W @ A @ W, [W], iters=60) == pytest.approx(-5.0, rel=1e-6)
    with pytest.raises(HypergradError, match="not positive"):
        safe_alpha(-5.0)


def test_safe_alpha_rule():
    assert safe_alpha(4.0) == pytest.approx(0.25)
    assert safe_alpha(4.0, margin=0.9) * 4.0 == pytest.approx(1.8)
    for margin in (0.0, 1.0):
        with pytest.raises(HypergradError, match="margin"):
            safe_alpha(4.0, margin=margin)


def test_diverging_flag_follows_alpha(ridge):
    lam_max = torch.linalg.eigvalsh(ridge.hessian()).max().item()
    W, phi, train, outer = ridge.at_optimum()
    too_big = hypergradient(train, outer, [W], [phi], neumann_terms=20, alpha=3.0 / lam_max)
    assert too_big.diverging
    assert too_big.term_norms[-1] > 100 * too_big.term_norms[0]

    W, phi, train, outer = ridge.at_optimum()
    alpha = safe_alpha(top_eigenvalue(train, [W]))
    assert alpha * lam_max < 2
    fine = hypergradient(train, outer, [W], [phi], neumann_terms=20, alpha=alpha)
    assert not fine.diverging
    assert all(a >= b for a, b in zip(fine.term_norms, fine.term_norms[1:]))


def test_cg_refuses_indefinite_hessian():
    params, forward, ce, x, y = _mlp_classifier()  # indefinite Hessian (see the GGN test)
    phi = torch.tensor(1.0, dtype=DT, requires_grad=True)
    logits = forward(params)
    train = phi * ce(logits) + 0.5 * (logits**2).mean()
    outer = ce(forward(params) + 0.1)
    with pytest.raises(HypergradError, match="not positive definite"):
        hypergradient(train, outer, params, [phi], method="cg", cg_iters=60)
    # The GGN is positive semi-definite: CG gets through (a ridge term makes it definite).
    result = hypergradient(
        train, outer, params, [phi], method="cg", cg_iters=60, curvature="gauss_newton",
        outputs=[logits, *params], output_loss=lambda o: phi * ce(o[0]) + 0.5 * (o[0] ** 2).mean()
        + 1e-3 * sum((p**2).sum() for p in o[1:]),
    )
    assert torch.isfinite(result.grads[0]).all()


def test_exact_refuses_large_problems(monkeypatch, ridge):
    monkeypatch.setattr(solvers, "EXACT_MAX_PARAMS", ridge.d - 1)
    W, phi, train, outer = ridge.at_optimum()
    with pytest.raises(HypergradError, match="EXACT_MAX_PARAMS.*method='cg'"):
        hypergradient(train, outer, [W], [phi], method="exact")


# ---------------------------------------------------------------------------------------------
# Robustness: unused parameters, direct terms, generators, retained graphs, bad arguments


@pytest.mark.parametrize("method", ["neumann", "cg", "exact", "first_order"])
def test_unused_params_get_zeros_and_leave_the_rest_alone(ridge, method):
    W, phi, train, outer = ridge.at_optimum()
    reference = hypergradient(train, outer, [W], [phi], method=method).grads[0]

    W, phi, train, _ = ridge.at_optimum()
    W_nowhere = torch.randn(3, dtype=DT, requires_grad=True)
    W_outer_only = torch.randn(2, dtype=DT, requires_grad=True)
    phi_nowhere = torch.randn(2, 2, dtype=DT, requires_grad=True)
    phi_direct = torch.tensor([0.3, -2.0], dtype=DT, requires_grad=True)
    outer = ridge.outer_loss(W) + (W_outer_only**2).sum() + 0.5 * (phi_direct**2).sum()
    result = hypergradient(
        train, outer, [W_nowhere, W, W_outer_only], [phi, phi_nowhere, phi_direct], method=method
    )
    torch.testing.assert_close(result.grads[0], reference, rtol=1e-10, atol=1e-12)
    assert torch.equal(result.grads[1], torch.zeros(2, 2, dtype=DT))
    torch.testing.assert_close(result.grads[2], phi_direct.detach())  # d(0.5 phi^2)/dphi, no mixed term


def test_generators_are_accepted_once(ridge):
    W, phi, train, outer = ridge.at_optimum()
    from_lists = hypergradient(train, outer, [W], [phi], neumann_terms=5, alpha=0.05)
    from_gens = hypergradient(
        train, outer, (p for p in [W]), (p for p in [phi]), neumann_terms=5, alpha=0.05
    )
    torch.testing.assert_close(from_gens.grads[0], from_lists.grads[0], rtol=0, atol=0)
    assert from_gens.term_norms == from_lists.term_norms

    consumed = (p for p in [W])
    list(consumed)
    with pytest.raises(HypergradError, match="consumed"):
        hypergradient(train, outer, consumed, [phi])


def test_graphs_survive_for_the_inner_step(ridge):
    W, phi, train, outer = ridge.at_optimum()
    hypergradient(train, outer, [W], [phi], neumann_terms=2)
    train.backward()  # the trainer's own backward still works
    assert W.grad is not None and W.grad.norm() < 1e-8  # W is the optimum: zero gradient
    assert phi.grad is not None and phi.grad.abs().min() > 0


def test_bad_arguments_are_explained(ridge):
    W, phi, train, outer = ridge.at_optimum()
    cases = [
        (dict(method="lbfgs"), "unknown method"),
        (dict(neumann_terms=-1), "neumann_terms"),
        (dict(alpha=0.0), "alpha"),
        (dict(curvature="gauss_newton"), "needs outputs"),
        (dict(outputs=W), "only used with curvature='gauss_newton'"),
        (dict(mixed="forward"), "unknown mixed"),
    ]
    for kwargs, message in cases:
        with pytest.raises(HypergradError, match=message):
            hypergradient(train, outer, [W], [phi], **kwargs)
    with pytest.raises(HypergradError, match="both inner_params and outer_params"):
        hypergradient(train, outer, [W], [W, phi])
    with pytest.raises(HypergradError, match="no_grad"):
        hypergradient(train.detach(), outer, [W], [phi])
    assert issubclass(HypergradError, AuxframeError)


# ---------------------------------------------------------------------------------------------
# Operations without double backward


def _ctc_problem():
    """Main task: classification; auxiliary task: CTC (no double backward in torch)."""
    g = torch.Generator().manual_seed(4)
    W = torch.randn(3, 5, generator=g, dtype=DT, requires_grad=True)
    phi = torch.tensor([0.8], dtype=DT, requires_grad=True)
    x_seq = torch.randn(6, 2, 3, generator=g, dtype=DT)  # (T, N, features)
    targets, target_lengths = torch.tensor([[1, 2], [3, 3]]), torch.tensor([2, 2])
    x, y = torch.randn(10, 3, generator=g, dtype=DT), torch.randint(0, 5, (10,), generator=g)
    xa, ya = torch.randn(10, 3, generator=g, dtype=DT), torch.randint(0, 5, (10,), generator=g)

    def aux(W):
        log_probs = (x_seq @ W).log_softmax(-1)
        return F.ctc_loss(log_probs, targets, torch.tensor([6, 6]), target_lengths)

    train = F.cross_entropy(x @ W, y) + phi[0] * aux(W)
    outer = F.cross_entropy(xa @ W, ya)
    return W, phi, train, outer, aux


def test_missing_double_backward_is_named_with_the_fix():
    W, phi, train, outer, aux = _ctc_problem()
    with pytest.raises(HypergradError, match="first_order") as info:
        hypergradient(train, outer, [W], [phi])
    assert "_ctc_loss_backward" in str(info.value)
    assert info.value.operation == "aten::_ctc_loss_backward"
    with pytest.raises(HypergradError, match="mixed='jacobian'"):
        hypergradient(train, outer, [W], [phi], method="first_order")

    # The suggested fix works, and is gradient alignment: -<grad_W aux, grad_W outer>.
    result = hypergradient(train, outer, [W], [phi], method="first_order", mixed="jacobian")
    (g_aux,) = torch.autograd.grad(aux(W), W)
    (v,) = torch.autograd.grad(outer, W, retain_graph=True)
    expected = -(g_aux * v).sum().reshape(1)
    torch.testing.assert_close(result.grads[0], expected, rtol=1e-10, atol=1e-12)


class Cube(torch.autograd.Function):
    """x^3 with a backward that torch cannot differentiate again."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        return grad_out * 3 * x**2


def test_once_differentiable_function_is_named_not_silently_zero():
    g = torch.Generator().manual_seed(5)
    W = torch.randn(3, generator=g, dtype=DT, requires_grad=True)
    phi = torch.tensor([0.5], dtype=DT, requires_grad=True)
    x = torch.randn(7, 3, generator=g, dtype=DT)
    aux = lambda W: ((x @ W - 1) ** 2).mean()  # noqa: E731
    train = Cube.apply(W).sum() + phi[0] * aux(W)  # torch would give zero curvature through Cube
    outer = (W**2).sum()
    for kwargs in (dict(), dict(method="first_order"), dict(method="exact")):
        with pytest.raises(HypergradError, match="Cube") as info:
            hypergradient(train, outer, [W], [phi], **kwargs)
        assert info.value.operation == "Cube"
    with pytest.raises(HypergradError, match="Cube"):
        hessian_vector_product(train, [W], [torch.ones(3, dtype=DT)])
    with pytest.raises(HypergradError, match="Cube"):
        HessianOperator(Cube.apply(x @ W).pow(2).sum(), [W])

    result = hypergradient(train, outer, [W], [phi], method="first_order", mixed="jacobian")
    (g_aux,) = torch.autograd.grad(aux(W), W)
    torch.testing.assert_close(result.grads[0], -(g_aux * 2 * W.detach()).sum().reshape(1))


def test_no_false_alarm_without_once_differentiable_ops(ridge):
    W, phi, train, outer = ridge.at_optimum()
    assert errors._once_differentiable_ops([train], [W, phi]) == []
    assert math.isfinite(hypergradient(train, outer, [W], [phi]).term_norms[-1])


@pytest.mark.parametrize(
    "message, operation",
    [
        ("derivative for aten::_foo_backward is not implemented", "aten::_foo_backward"),
        ("the derivative for '_embedding_bag_backward' is not implemented.", "_embedding_bag_backward"),
        ("scatter_reduce(): Double backward is unsupported for src when ...", "scatter_reduce"),
        ("Double backwards is not supported for CuDNN RNNs due to limitations", None),
    ],
)
def test_torch_double_backward_messages_are_translated(message, operation):
    with pytest.raises(HypergradError, match="first_order") as info:
        with errors._explain_double_backward(errors._fix_hint("neumann", "vjp")):
            raise RuntimeError(message)
    assert info.value.operation == operation
    assert isinstance(info.value.__cause__, RuntimeError)
    with pytest.raises(RuntimeError, match="unrelated"):  # other errors pass through untouched
        with errors._explain_double_backward("hint"):
            raise RuntimeError("unrelated: shapes do not match")


# ---------------------------------------------------------------------------------------------
# The curvature of another loss (a sub-batch) and a caller-supplied directional derivative


def _directional_by_forward_mode(ridge, W, phi):
    """``p -> <grad_W L_T, p>`` by forward-mode AD of the training loss along p (graph to phi)."""
    def directional(p):
        with fwAD.dual_level():
            loss = ridge.train_loss(fwAD.make_dual(W.detach(), p[0]), phi)
            return fwAD.unpack_dual(loss).tangent
    return directional


@pytest.mark.parametrize("method", ["exact", "cg"])
def test_directional_mixed_term_matches_closed_form(ridge, method):
    W, phi, train, outer = ridge.at_optimum()
    result = hypergradient(train, outer, [W], [phi], method=method, mixed="directional",
                           directional=_directional_by_forward_mode(ridge, W, phi))
    assert rel_err(result.grads[0], ridge.analytic_hypergradient()) <= 1e-4


def test_hessian_loss_sets_the_curvature(ridge):
    # Curvature from another quadratic (the training loss with other weights phi2): the result is
    # -(d2 L_T / dW dphi)^T H2^-1 v with H2 = 2 A(phi2), by hand.
    W, phi, train, outer = ridge.at_optimum()
    phi2 = torch.tensor([0.2, 2.5], dtype=DT)
    curvature = ridge.train_loss(W, phi2)
    v = torch.autograd.grad(outer, W, retain_graph=True)[0]
    p = torch.linalg.solve(2 * ridge.normal_equations(phi2)[0], v)
    mixed = torch.stack([2 * X.T @ (X @ W.detach() - y) / len(X) for X, y in ridge.aux])
    expected = -(mixed @ p)
    for train_loss, mixed_mode, extra in [
        (train, "vjp", {}),
        (None, "directional", {"directional": _directional_by_forward_mode(ridge, W, phi)}),
    ]:
        result = hypergradient(train_loss, outer, [W], [phi], method="exact", hessian_loss=curvature,
                               mixed=mixed_mode, **extra)
        assert rel_err(result.grads[0], expected) <= 1e-8
    # and it differs from the training loss's own curvature
    assert rel_err(ridge.analytic_hypergradient(), expected) > 1e-2


def test_directional_arguments_go_together(ridge):
    W, phi, train, outer = ridge.at_optimum()
    with pytest.raises(HypergradError, match="mixed='directional' and directional= go together"):
        hypergradient(train, outer, [W], [phi], mixed="directional")
    with pytest.raises(HypergradError, match="go together"):
        hypergradient(train, outer, [W], [phi], mixed="vjp", directional=lambda p: p[0].sum())
    with pytest.raises(HypergradError, match="train_loss must be a scalar tensor"):
        # without hessian_loss the curvature is train_loss's: it is needed
        hypergradient(None, outer, [W], [phi], mixed="directional",
                      directional=_directional_by_forward_mode(ridge, W, phi))


# ---------------------------------------------------------------------------------------------
# The solvers: one signature, solver(matvec, b), interchangeable


def _spd_system(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(7, 7, generator=g, dtype=DT)
    a = m @ m.T / 7 + 0.5 * torch.eye(7, dtype=DT)
    blocks = [3, 4]  # the unknowns as two tensors, like two parameters

    def matvec(x):
        return list((a @ torch.cat([t.reshape(-1) for t in x])).split(blocks))

    b = list(torch.randn(7, generator=g, dtype=DT).split(blocks))
    return a, matvec, b


@pytest.mark.parametrize("solver, tol", [
    (solvers.Neumann(terms=400, alpha=0.2, scale_by_alpha=True), 1e-10),
    (solvers.ConjugateGradient(iters=50, tol=1e-12), 1e-10),
    (solvers.Exact(), 1e-12),
])
def test_every_solver_solves_a_linear_system_through_matvec_alone(solver, tol):
    a, matvec, b = _spd_system()
    x, norms = solver(matvec, b)
    expected = torch.linalg.solve(a, torch.cat(b))
    assert rel_err(torch.cat(x), expected) <= tol
    assert all(isinstance(n, torch.Tensor) and n.dim() == 0 for n in norms)


def test_neumann_is_its_truncated_series():
    a, matvec, b = _spd_system(1)
    alpha, v = 0.3, torch.cat(b)
    step = torch.eye(7, dtype=DT) - alpha * a
    expected = v + step @ v + step @ step @ v
    x, norms = solvers.Neumann(terms=2, alpha=alpha)(matvec, b)
    assert rel_err(torch.cat(x), expected) <= 1e-14
    torch.testing.assert_close(torch.stack(norms), torch.stack([v.norm(), (step @ v).norm(), (step @ step @ v).norm()]))
    x0, _ = solvers.Neumann(terms=0, alpha=alpha)(lambda x: pytest.fail("no product for terms=0"), b)
    assert torch.equal(torch.cat(x0), v)


def test_a_solver_object_is_a_method(ridge):
    # The same hypergradient through a solver passed as method= as through its name.
    W, phi, train, outer = ridge.at_optimum()
    truth = ridge.analytic_hypergradient()
    for solver in (solvers.ConjugateGradient(iters=100, tol=1e-12), solvers.Exact()):
        assert rel_err(hypergradient(train, outer, [W], [phi], method=solver).grads[0], truth) <= 1e-6
    named = hypergradient(train, outer, [W], [phi], neumann_terms=5, alpha=0.05)
    given = hypergradient(train, outer, [W], [phi], method=solvers.Neumann(5, 0.05))
    assert torch.equal(named.grads[0], given.grads[0]) and named.term_norms == given.term_norms
