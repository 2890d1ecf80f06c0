"""TorchJD's Gramian weightings on auxframe's gradient engine: UPGrad, MGDA, CAGrad, Nash-MTL,
IMTL-G, Aligned-MTL, DualProj and GradVac.

Each method here is one "Gramian -> weights" map from TorchJD (Quinton and Rey, "Jacobian
Descent for Multi-Objective Optimization", 2024; ``torchjd.aggregation``), plugged into the seam of
:class:`auxframe.weighting.gramian.GramianWeighting`: the engine computes the Gramian ``G = J J^T``
of the tasks' gradients ``J = [g_main; g_1; ...; g_K]`` once per step, the TorchJD weighting maps
it to weights ``w``, and the backbone's update is ``w @ J`` (no further backward pass). Each head
trains on its own loss, as in TorchJD's ``mtl_backward``. This is TorchJD's
``GramianWeightedAggregator(weighting)`` with auxframe computing the Gramian (the test checks
``w @ J`` against TorchJD's aggregator on the explicit Jacobian).

The one adapter, :class:`TorchJDWeighting`, builds the TorchJD weighting once the number of tasks
is known, keeps its state (GradVac's cosine targets, Nash-MTL's last solution) in checkpoints,
and gives a TorchJD weighting that draws random numbers (GradVac's order) its own seeded stream.
The classes below only name each method's parameters for gin.

Nash-MTL is a TorchJD *matrix* weighting (it reads ``J``), but it uses ``J`` only through
``J J^T`` and ``||J^T w||``: it is given the symmetric square root of ``G``, which has the same
Gramian, so it gives the same weights as on ``J`` itself.

Main-task-prioritised variants (the main gradient kept as it is, only the auxiliary gradients
moved): ``gradvac.aux_only`` (PriGradVac) and ``pcgrad.aux_only`` (PriPCGrad), both defined in
ForkMerge's code (Jiang et al., NeurIPS 2023; thuml/ForkMerge,
``auxiliary_task_scene_understanding/LibMTL/weighting/PriGradVac.py``, ``PriPCGrad.py``).
AuxiNash (:mod:`auxframe.weighting.auxinash`) is Nash-MTL's bargaining with the main task
preferred. The literature defines no prioritised form of the other methods here.
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping, Sequence

import torch

from auxframe.errors import ConfigError
from auxframe.weighting.base import WeightingSetup
from auxframe.weighting.gradients import check_space
from auxframe.weighting.gramian import GramianWeighting

_EPS = 1e-8


def psd_sqrt(gramian: torch.Tensor) -> torch.Tensor:
    """The symmetric square root ``M`` of a PSD matrix, ``M M^T = G`` (negative eigenvalues from
    round-off clamped at 0)."""
    values, vectors = torch.linalg.eigh(gramian.double())
    return ((vectors * values.clamp_min(0).sqrt()) @ vectors.T).to(gramian.dtype)


class TorchJDWeighting(GramianWeighting):
    """A TorchJD Gramian (or Gramian-only matrix) weighting as an auxframe weighting.

    Subclasses define :meth:`build`. The TorchJD weighting is ``self.gramian_weighting`` after
    :meth:`setup`.

    Args:
        space: where the gradients live (``'shared'``, ``'last_shared'``, ``'representation'``).
        seed: seed of the weighting's own random stream (used only by weightings that draw).
    """

    #: Whether the TorchJD weighting reads the matrix (given ``psd_sqrt(G)``) rather than ``G``.
    reads_matrix = False

    def __init__(self, space: str = "shared", seed: int = 0):
        super().__init__(None, space=check_space(space, f"weightings.{self.gin_name()}"))
        self.seed = int(seed)

    @classmethod
    def gin_name(cls) -> str:
        return cls.__name__.lower()

    def build(self, num_tasks: int):
        """The TorchJD weighting for ``num_tasks`` tasks (main first)."""
        raise NotImplementedError(f"{type(self).__name__} must define build(num_tasks), the TorchJD weighting it wraps")

    def setup(self, info: WeightingSetup) -> None:
        super().setup(info)
        try:
            self.gramian_weighting = self.build(len(self.names))
        except ImportError as e:  # e.g. Nash-MTL's cvxpy, with TorchJD's install hint
            raise ConfigError(f"weightings.{self.gin_name()} needs an optional dependency: {e}") from None
        self.rng_state = torch.Generator().manual_seed(self.seed).get_state()

    def from_gramian(self, gramian: torch.Tensor) -> torch.Tensor:
        stat = psd_sqrt(gramian) if self.reads_matrix else gramian
        # TorchJD draws from the global generator; each call runs on this weighting's own stream, so
        # a run repeats, resumes exactly and gives every rank the same draws, and nothing else moves.
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(self.rng_state)
            weights = self.gramian_weighting(stat)
            self.rng_state = torch.get_rng_state()
        return weights

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "rng": self.rng_state.clone(), "torchjd": self.torchjd_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.rng_state = state["rng"].clone()
        self.load_torchjd_state(state["torchjd"])

    def torchjd_state(self) -> dict[str, Any]:
        """The TorchJD weighting's state: its buffers (GradVac's targets are one)."""
        return {k: v.clone() for k, v in self.gramian_weighting.state_dict().items()}

    def load_torchjd_state(self, state: Mapping[str, Any]) -> None:
        for name, value in state.items():  # buffers that were None at construction are set directly
            setattr(self.gramian_weighting, name, value.clone())


def _pref(pref_vector: Sequence[float] | None) -> torch.Tensor | None:
    return None if pref_vector is None else torch.as_tensor(list(pref_vector), dtype=torch.float32)


class UPGrad(TorchJDWeighting):
    """UPGrad (Quinton and Rey, 2024): each task gradient projected onto the dual cone of all of
    them (the set of directions that conflict with none), and the projections averaged:

        w = sum_i p_i * argmin_{u >= e_i} u^T G u      (a quadratic programme in the Gramian)

    Args:
        pref_vector: the p_i (default 1/T each).
        space: see :class:`TorchJDWeighting`.
    """

    def __init__(self, pref_vector: Sequence[float] | None = None, space: str = "shared"):
        super().__init__(space=space)
        self.pref_vector = pref_vector

    def build(self, num_tasks: int):
        from torchjd.aggregation import UPGradWeighting

        return UPGradWeighting(pref_vector=_pref(self.pref_vector))


class MGDA(TorchJDWeighting):
    """MGDA (Désidéri 2012; Sener and Koltun, NeurIPS 2018): the minimum-norm point of the convex
    hull of the task gradients, ``w = argmin_{w in simplex} w^T G w`` (Frank-Wolfe on G).

    Args:
        epsilon: stop when the Frank-Wolfe step is below this.
        max_iters: Frank-Wolfe iterations at most.
        space: see :class:`TorchJDWeighting`.
    """

    def __init__(self, epsilon: float = 1e-3, max_iters: int = 100, space: str = "shared"):
        super().__init__(space=space)
        self.epsilon, self.max_iters = float(epsilon), int(max_iters)

    def build(self, num_tasks: int):
        from torchjd.aggregation import MGDAWeighting

        return MGDAWeighting(epsilon=self.epsilon, max_iters=self.max_iters)


class CAGrad(TorchJDWeighting):
    """CAGrad (Liu, Liu, Jin, Stone and Liu, NeurIPS 2021): the update maximises the worst task's
    improvement within a ball of radius ``c ||g_0||`` around the average gradient ``g_0``:

        max_d min_i <g_i, d>   s.t.  ||d - g_0|| <= c ||g_0||     (solved in the Gramian, cvxpy)

    Args:
        c: the radius scale (0.4 in the paper's NYUv2 runs; 0 is the average gradient).
        norm_eps: added to norms before dividing.
        space: see :class:`TorchJDWeighting`.
    """

    def __init__(self, c: float = 0.4, norm_eps: float = 1e-4, space: str = "shared"):
        if c < 0:
            raise ConfigError(f"weightings.cagrad.c must be >= 0, got {c}.")
        super().__init__(space=space)
        self.c, self.norm_eps = float(c), float(norm_eps)

    def build(self, num_tasks: int):
        from torchjd.aggregation import CAGradWeighting

        return CAGradWeighting(c=self.c, norm_eps=self.norm_eps)


class NashMTL(TorchJDWeighting):
    """Nash-MTL (Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik and Fetaya, ICML 2022): the
    Nash bargaining solution of the tasks, ``G w = 1 / w`` (elementwise, ``w > 0``), found by the
    paper's sequence of convex problems (cvxpy/ECOS), then scaled so that ``||J^T w|| <= max_norm``.

    Args:
        max_norm: the bound on the update's norm (0: none; 1 in the official code).
        update_weights_every: solve every this many steps, reusing the weights in between.
        optim_niter: convex-concave iterations per solve.
        space: see :class:`TorchJDWeighting`.
    """

    reads_matrix = True

    def __init__(self, max_norm: float = 1.0, update_weights_every: int = 1, optim_niter: int = 20,
                 space: str = "shared"):
        super().__init__(space=space)
        self.max_norm, self.update_weights_every, self.optim_niter = float(max_norm), int(update_weights_every), int(optim_niter)

    @classmethod
    def gin_name(cls) -> str:
        return "nash_mtl"

    def from_gramian(self, gramian: torch.Tensor) -> torch.Tensor:
        with warnings.catch_warnings():  # cvxpy's note that the problem is not DPP, at every solve
            warnings.filterwarnings("ignore", message=".*not DPP.*")
            return super().from_gramian(gramian)

    def build(self, num_tasks: int):
        from torchjd.aggregation import NashMTL as _NashMTL

        return _NashMTL(n_tasks=num_tasks, max_norm=self.max_norm, update_weights_every=self.update_weights_every,
                        optim_niter=self.optim_niter).weighting

    # TorchJD keeps Nash-MTL's state in plain attributes (the cvxpy problem is rebuilt on load).
    def torchjd_state(self) -> dict[str, Any]:
        w = self.gramian_weighting
        return {"step": float(w.step), "prvs_alpha": torch.as_tensor(w.prvs_alpha).clone(),
                "normalization_factor": torch.as_tensor(w.normalization_factor).clone()}

    def load_torchjd_state(self, state: Mapping[str, Any]) -> None:
        w = self.gramian_weighting
        w.step = float(state["step"])
        w.prvs_alpha = state["prvs_alpha"].numpy().copy()
        w.normalization_factor = state["normalization_factor"].numpy().copy()
        if w.step > 0:  # TorchJD builds the problem at its first call, which a resumed run has had
            w._init_optim_problem()


class IMTLG(TorchJDWeighting):
    """IMTL-G (Liu, Li, Kuang, Xue, Chen, Yang, Liao and Zhang, ICLR 2021): the update has equal
    projections onto every task's unit gradient, ``w ∝ G^+ diag(G)^(1/2)``, normalised to sum 1.

    Args:
        space: see :class:`TorchJDWeighting`.
    """

    @classmethod
    def gin_name(cls) -> str:
        return "imtl_g"

    def build(self, num_tasks: int):
        from torchjd.aggregation import IMTLGWeighting

        return IMTLGWeighting()


class AlignedMTL(TorchJDWeighting):
    """Aligned-MTL (Senushkin, Patakin, Kuznetsov and Konushin, CVPR 2023): the gradients made
    orthogonal and equal in norm by the balance transformation of their Gramian's eigendecomposition
    (``G = V Λ V^T``, weights ``∝ V Λ^(-1/2) V^T p``, scaled by the smallest singular value).

    Args:
        pref_vector: the task preferences p (default 1/T each).
        scale_mode: ``'min'`` (the paper), ``'median'`` or ``'rmse'``: which eigenvalue sets the scale.
        space: see :class:`TorchJDWeighting`.
    """

    def __init__(self, pref_vector: Sequence[float] | None = None, scale_mode: str = "min", space: str = "shared"):
        if scale_mode not in ("min", "median", "rmse"):
            raise ConfigError(f"weightings.aligned_mtl.scale_mode must be 'min', 'median' or 'rmse', got {scale_mode!r}.")
        super().__init__(space=space)
        self.pref_vector, self.scale_mode = pref_vector, scale_mode

    @classmethod
    def gin_name(cls) -> str:
        return "aligned_mtl"

    def build(self, num_tasks: int):
        from torchjd.aggregation import AlignedMTLWeighting

        return AlignedMTLWeighting(pref_vector=_pref(self.pref_vector), scale_mode=self.scale_mode)


class DualProj(TorchJDWeighting):
    """DualProj (Quinton and Rey, 2024): the averaged gradient ``sum_i p_i g_i`` projected onto
    the dual cone of the task gradients, ``w = argmin_{u >= p} u^T G u``.

    Args:
        pref_vector: the p_i (default 1/T each).
        space: see :class:`TorchJDWeighting`.
    """

    def __init__(self, pref_vector: Sequence[float] | None = None, space: str = "shared"):
        super().__init__(space=space)
        self.pref_vector = pref_vector

    def build(self, num_tasks: int):
        from torchjd.aggregation import DualProjWeighting

        return DualProjWeighting(pref_vector=_pref(self.pref_vector))


class GradVac(TorchJDWeighting):
    """Gradient Vaccine (Wang, Tsvetkov, Firat and Cao, ICLR 2021).

    Each task gradient, visiting the others in random order, is moved toward every other task's
    gradient whose cosine ``phi_ij`` with it is below an exponential moving average target
    ``phihat_ij`` (``phihat <- (1 - beta) phihat + beta phi`` after each comparison):

        g_i <- g_i + g_j ||g_i|| (phihat sqrt(1 - phi^2) - phi sqrt(1 - phihat^2)) / (||g_j|| sqrt(1 - phihat^2))

    and the update is the sum of the moved gradients - a combination of the original ones, read
    from the Gramian (TorchJD's ``GradVacWeighting``; the whole space as one group, the paper's
    "whole model" granularity).

    With ``aux_only=True`` (PriGradVac, ForkMerge's code): the main gradient is left alone and each
    auxiliary gradient is moved only toward the *original* main gradient, with the target
    ``phihat_k`` of its cosine to the main one; no random order.

    Args:
        beta: the moving average's rate (0.5 in TorchJD; 0.01 in the paper's NMT runs).
        eps: added to denominators.
        aux_only: the main-task-prioritised form.
        space: see :class:`TorchJDWeighting`.
        seed: seed of the random order.
    """

    def __init__(self, beta: float = 0.5, eps: float = _EPS, aux_only: bool = False, space: str = "shared",
                 seed: int = 0):
        if not 0.0 <= beta <= 1.0:
            raise ConfigError(f"weightings.gradvac.beta must be in [0, 1], got {beta}.")
        super().__init__(space=space, seed=seed)
        self.beta, self.eps, self.aux_only = float(beta), float(eps), bool(aux_only)

    def build(self, num_tasks: int):
        if self.aux_only:
            return PriGradVacWeighting(num_tasks, beta=self.beta, eps=self.eps)
        from torchjd.aggregation import GradVacWeighting

        return GradVacWeighting(beta=self.beta, eps=self.eps)

    def torchjd_state(self) -> dict[str, Any]:
        if self.aux_only:
            return {"target": self.gramian_weighting.target.clone()}
        phi = self.gramian_weighting._phi_t  # None before the first step
        return {"_phi_t": phi.clone()} if phi is not None else {}

    def load_torchjd_state(self, state: Mapping[str, Any]) -> None:
        if self.aux_only:
            self.gramian_weighting.target = state["target"].clone()
        elif "_phi_t" in state:
            w = self.gramian_weighting
            w._phi_t = state["_phi_t"].clone()
            w._state_key = (w._phi_t.shape[0], w._phi_t.dtype)


class PriGradVacWeighting:
    """PriGradVac's "Gramian -> weights" map, main task first (row 0): see :class:`GradVac`.

    State: ``target[k]``, the moving-average target of the cosine between auxiliary gradient k
    and the main gradient (0 at the start, as in ForkMerge's code).
    """

    def __init__(self, num_tasks: int, beta: float, eps: float = _EPS):
        self.beta, self.eps = beta, eps
        self.target = torch.zeros(num_tasks, dtype=torch.float64)

    def __call__(self, gramian: torch.Tensor) -> torch.Tensor:
        gram = gramian.detach().double().cpu()
        n = gram.shape[0]
        weights = torch.ones(n, dtype=torch.float64)
        norm_main = gram[0, 0].clamp_min(0).sqrt()
        for k in range(1, n):
            norm_k = gram[k, k].clamp_min(0).sqrt()
            phi = gram[k, 0] / (norm_k * norm_main + self.eps)
            target = self.target[k]
            if phi < target:
                move = norm_k * (target * (1 - phi**2).clamp_min(0).sqrt() - phi * (1 - target**2).clamp_min(0).sqrt())
                weights[0] += move / (norm_main * (1 - target**2).clamp_min(0).sqrt() + self.eps)
            self.target[k] = (1 - self.beta) * target + self.beta * phi
        return weights.to(gramian)
