"""The Gramian methods (TorchJD's weightings, GradVac, PriGradVac, AuxiNash's bargaining) against
TorchJD's aggregators on the explicit Jacobian, the official AuxiNash solver's numbers and closed forms."""

from __future__ import annotations

import pytest
import torch

from auxframe.errors import ConfigError
from auxframe.weighting.auxinash import AuxiNash, bargaining_jacobian, nash_bargaining
from auxframe.weighting.base import WeightingSetup
from auxframe.weighting.jacobian_descent import (
    CAGrad, DualProj, GradVac, IMTLG, MGDA, AlignedMTL, NashMTL, PriGradVacWeighting, UPGrad, psd_sqrt,
)
from test_gradients import TASKS, explicit_jacobian, make_step

aggregation = pytest.importorskip("torchjd.aggregation")


def setup(weighting, model, aux=TASKS[1:], has_aux_set=True):
    weighting.setup(WeightingSetup("main", list(aux), model, model.shared_parameters(), torch.device("cpu"), 100, 10,
                                   has_aux_set=has_aux_set))
    return weighting


def update(weighting, seed=0):
    """The backbone's update and the weights of one step of ``weighting``, with the explicit Jacobian."""
    model, losses, ctx = make_step(seed=seed)
    jac = explicit_jacobian(losses, ctx.shared_parameters)
    setup(weighting, model).backward(losses, ctx)
    return torch.cat([p.grad.reshape(-1) for p in ctx.shared_parameters]), jac, weighting


# -- every TorchJD method: auxframe's step equals TorchJD's aggregator on the explicit Jacobian --------
CASES = {
    "upgrad": (UPGrad, lambda: aggregation.UPGrad()),
    "mgda": (MGDA, lambda: aggregation.MGDA()),
    "cagrad": (lambda: CAGrad(c=0.4), lambda: aggregation.CAGrad(c=0.4)),
    "imtl_g": (IMTLG, lambda: aggregation.IMTLG()),
    "aligned_mtl": (AlignedMTL, lambda: aggregation.AlignedMTL()),
    "dualproj": (DualProj, lambda: aggregation.DualProj()),
    "nash_mtl": (NashMTL, lambda: aggregation.NashMTL(n_tasks=len(TASKS))),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_update_equals_torchjd_aggregator_on_the_jacobian(name):
    ours, reference = CASES[name]
    got, jac, _ = update(ours())
    expected = reference()(jac)
    torch.testing.assert_close(got, expected, rtol=2e-4, atol=1e-6)
    assert got.norm() > 0


def test_gradvac_equals_torchjd_with_the_same_draws():
    # TorchJD's GradVac draws its order from the global generator; ours from its own stream seeded
    # with `seed`: the same draws, so the same update; two steps exercise the cosine targets' state.
    weighting = GradVac(beta=0.5, seed=3)
    reference = aggregation.GradVac(beta=0.5)
    torch.manual_seed(3)
    state = torch.get_rng_state()
    for step in range(2):
        model, losses, ctx = make_step(seed=step)
        jac = explicit_jacobian(losses, ctx.shared_parameters)
        if step == 0:
            setup(weighting, model)
        weighting.backward(losses, ctx)
        got = torch.cat([p.grad.reshape(-1) for p in ctx.shared_parameters])
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(state)
            expected = reference(jac)
            state = torch.get_rng_state()
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    assert (weighting.gramian_weighting._phi_t != 0).any()


def test_nash_mtl_reads_the_gramian_through_its_square_root():
    g = torch.randn(4, 9)
    gram = g @ g.T
    m = psd_sqrt(gram)
    torch.testing.assert_close(m @ m.T, gram, rtol=1e-5, atol=1e-5)


def test_nash_mtl_resumes_with_its_solver_state():
    a, b = NashMTL(), NashMTL()
    update(a, seed=0)
    model, losses, ctx = make_step(seed=1)
    setup(b, model)
    b.load_state_dict(a.state_dict())
    _, losses_a, ctx_a = make_step(seed=1)
    a.backward(losses_a, ctx_a)
    b.backward(losses, ctx)
    torch.testing.assert_close(a.w, b.w)


# -- PriGradVac: the closed form of ForkMerge's code ---------------------------------------------------
def test_prigradvac_moves_each_aux_gradient_to_its_target_cosine_with_the_main_one():
    torch.manual_seed(0)
    jac = torch.randn(3, 6, dtype=torch.float64)
    gram = jac @ jac.T
    w = PriGradVacWeighting(3, beta=1.0)
    w.target[1:] = torch.tensor([0.6, 0.3], dtype=torch.float64)
    cos_before = (gram[0, 1:] / (gram[0, 0] * gram.diagonal()[1:]).sqrt())
    weights = w(gram)
    # Each auxiliary gradient below its target moves to cosine == target with the main gradient
    # (ForkMerge's PriGradVac.py: g_k + w g_main, w from the vaccine formula); the update is the sum.
    moved = []
    g0 = jac[0]
    for k, target in ((1, 0.6), (2, 0.3)):
        gk = jac[k]
        if cos_before[k - 1] < target:
            phi = cos_before[k - 1]
            coef = gk.norm() * (target * (1 - phi**2).sqrt() - phi * (1 - target**2) ** 0.5) / (g0.norm() * (1 - target**2) ** 0.5)
            gk = gk + coef * g0
            assert torch.dot(gk, g0) / (gk.norm() * g0.norm()) == pytest.approx(target, abs=1e-6)
        moved.append(gk)
    torch.testing.assert_close(weights @ jac, g0 + moved[0] + moved[1])
    assert weights[1:].tolist() == [1.0, 1.0]  # auxiliary gradients are only ever added to
    torch.testing.assert_close(w.target[1:], cos_before)  # beta = 1: the target becomes this step's cosine


def test_gradvac_aux_only_leaves_the_main_gradient_alone():
    got, jac, weighting = update(GradVac(aux_only=True))
    w = weighting.w.double()
    assert w[1:].tolist() == [1.0, 1.0, 1.0]
    torch.testing.assert_close(got.double(), w @ jac.double(), rtol=1e-4, atol=1e-6)


# -- AuxiNash's bargaining --------------------------------------------------------------------------
J = torch.tensor([[1.0, 0.5, -0.2, 0.0], [0.3, 1.5, 0.4, -0.5], [-0.6, 0.2, 0.9, 0.7]], dtype=torch.float64)
#: The official AuxiNash solver (AvivSham/auxinash@2e411c9, methods/weight_methods.py: AuxiNash(n_tasks=3,
#: p=p, max_norm=0).get_weighted_loss on losses with gradients J's rows; cvxpy 1.9.3 / ECOS 2.0.14).
OFFICIAL = {
    (1.0, 1.0, 1.0): [0.9743932998775869, 0.4389977911474443, 0.9654641261512412],
    (2.0, 0.5, 0.5): [1.3952599427861916, 0.23620320341515827, 0.8758497281028351],
    (0.2, 1.0, 1.8): [0.5155574405484407, 0.4970121518552079, 1.116531307953531],
}


@pytest.mark.parametrize("prefs", sorted(OFFICIAL))
def test_bargaining_matches_the_official_auxinash_solver(prefs):
    alpha = nash_bargaining(J @ J.T, torch.tensor(prefs, dtype=torch.float64))
    torch.testing.assert_close(alpha, torch.tensor(OFFICIAL[prefs], dtype=torch.float64), rtol=1e-6, atol=1e-7)
    # and it is the bargaining solution: G alpha = p / alpha
    torch.testing.assert_close((J @ J.T) @ alpha, torch.tensor(prefs, dtype=torch.float64) / alpha)


def test_bargaining_closed_form_for_orthogonal_gradients():
    gram = torch.diag(torch.tensor([4.0, 1.0, 0.25], dtype=torch.float64))
    p = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    torch.testing.assert_close(nash_bargaining(gram, p), (p / gram.diagonal()).sqrt())


def test_preferences_one_give_nash_mtl():
    # p = 1 is Nash-MTL: TorchJD's solver (without the norm bound) on the same Jacobian.
    expected = aggregation.NashMTL(n_tasks=3, max_norm=0.0).weighting(J.float())
    torch.testing.assert_close(nash_bargaining(J @ J.T, torch.ones(3, dtype=torch.float64)).float(), expected,
                               rtol=1e-4, atol=1e-5)


def test_bargaining_jacobian_matches_finite_differences():
    gram, p = J @ J.T, torch.tensor([2.0, 0.5, 0.5], dtype=torch.float64)
    alpha = nash_bargaining(gram, p)
    jac = bargaining_jacobian(gram, p, alpha)
    eps = 1e-6
    for i in range(3):
        dp = torch.zeros(3, dtype=torch.float64)
        dp[i] = eps
        fd = (nash_bargaining(gram, p + dp) - nash_bargaining(gram, p - dp)) / (2 * eps)
        torch.testing.assert_close(jac[:, i], fd, rtol=1e-5, atol=1e-7)


def test_auxinash_update_is_the_bounded_bargaining_combination():
    got, jac, weighting = update(AuxiNash(max_norm=1.0))
    gram = (jac @ jac.T).double()
    alpha = nash_bargaining(gram, torch.ones(4, dtype=torch.float64))
    scale = min(1.0, 1.0 / float((alpha @ gram @ alpha).sqrt()))
    torch.testing.assert_close(got, (alpha * scale).float() @ jac, rtol=1e-4, atol=1e-6)
    assert float(got.norm()) == pytest.approx(min(1.0, float((alpha @ gram @ alpha).sqrt())), rel=1e-4)


def test_auxinash_needs_an_aux_set():
    model, _, _ = make_step()
    with pytest.raises(ConfigError, match="auxiliary set"):
        setup(AuxiNash(), model, has_aux_set=False)
