"""The per-task gradient engine: what gradient-based weightings pay, measured side by side.

Model: the quickstart's small CNN (32-64-64, BatchNorm) on 8x8 single-channel inputs, batch 64,
with one main head (10 classes) and K binary auxiliary heads - K = 39 is the CelebA setting of the
ARML paper (one attribute the main task, the 39 others auxiliary). Every variant starts from the
same forward pass on the same batch, so the ratios compare only what differs.

Sections:

1. **Per-task gradients**, for K = 1, 5, 10, 39:
   * ``plain``: forward + backward of the summed loss + SGD step (one ordinary training step);
   * ``param fold``: forward + the (K+1) x P Jacobian by one batched reverse pass with the
     tasks folded into the batch (the opt-in ``batched='fold'``,
     :mod:`auxframe.weighting.batched_backward`; on a CPU 4 tasks per pass) + its Gramian;
   * ``param vmap``: the same with one vmapped backward (``is_grads_batched``, the public path
     ``batched='auto'`` takes on GPUs) instead;
   * ``param loop``: forward + one backward per task + Gramian;
   * ``repr step``: a whole training step that uses representation-space gradients: forward, the
     Gramian of dL_k/dz (one heads-only backward), then the update ``sum_k c_k g_k`` by
     :meth:`TaskGradients.backward` and the SGD step.
   Goals at K = 39: ``repr step / plain <= 1.5``; ``param fold / param loop <= 1`` on CPU and
   ``<= 0.5`` on a GPU.
2. **ARML's weight step**, K = 2, 5, 39: the engine's ``fused`` pass (what ARML uses: one
   backbone backward with a graph gives d, one pass through it every inner product), and d by a
   backward followed by the inner products in forward mode (``fwd-mode``) or by a double backward
   over the losses (``dbl-bwd``, what runs under torchrun), against ``reference``
   (the official code's form: the objective built by a backward with ``create_graph`` and
   differentiated in w by a second backward). Values are compared first. Goal: constant in K and
   ``ours / reference <= 1.0`` at every K.
3. **The per-task Gramian against LibMTL's per-task loop**, K = 39 (``--libmtl-ks``): auxframe's
   default (``TaskGradients(...).gramian``, ``batched='auto'``: the loop on CPUs, one vmapped
   backward on GPUs) and the opt-in fold, against LibMTL's ``AbsWeighting._compute_grad`` in its
   default ``mode='backward'`` as its code documents it, reimplemented here: per task a
   ``backward(retain_graph=True)`` of that task's loss through the whole model, the shared
   parameters' ``.grad`` copied into a host (CPU) vector (``_grad2vec``) and that vector into row
   k of a device matrix, then the shared gradients zeroed; the Gramian ``G = J J^T`` of the rows.
   Same model, same forward pass; the Gramians are compared first. Goals: auxframe / LibMTL
   ``<= 0.5`` on a GPU, ``<= 1.0`` on a CPU.
4. **OL_AUX's and GradNorm's steps**, K = 5, 39 (``--step-ks``), each a whole step (forward,
   what the method reads, the update into ``.grad``) computed two ways, values compared first:
   OL_AUX's Gramian row ``<g_main, g_k>`` from the full Gramian (``gramian(tasks)[0, 1:]``, the
   previous computation) against :meth:`TaskGradients.gramian_row` (one backward for g_main and
   one forward-mode pass along it); GradNorm in ``space='shared'`` with its update by a backward
   of the weighted loss after the norms (previous) against the engine's ``w @ J``.

Run::

    OMP_NUM_THREADS=1 .venv/bin/python bench/gradient_engine.py            # CPU, ~2 min
    .venv/bin/python bench/gradient_engine.py --device cuda
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
import warnings
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from auxframe.models.backbones import SmallCNN
from auxframe.models.heads import ClassificationHead
from auxframe.models.multitask import MultiTaskModel
from auxframe.weighting.base import StepContext, TaskLosses
from auxframe.weighting.gradients import TaskGradients


class Setting:
    """A model with a main head and K binary heads, and one fixed batch."""

    def __init__(self, k: int, device: torch.device, batch: int = 64):
        torch.manual_seed(0)
        backbone = SmallCNN(input_shape=(1, 8, 8), channels=(32, 64, 64))
        self.names = ["main", *[f"attr{i}" for i in range(k)]]
        heads = {n: ClassificationHead((backbone.out_features,), 10 if n == "main" else 2) for n in self.names}
        self.model = MultiTaskModel(backbone, heads).to(device)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-4)
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(batch, 1, 8, 8, generator=g).to(device)
        self.y = {n: torch.randint(0, 10 if n == "main" else 2, (batch,), generator=g).to(device) for n in self.names}

    def losses(self) -> tuple[TaskLosses, StepContext]:
        out, feats = self.model(self.x, tasks=self.names, return_features=True)
        values = {n: F.cross_entropy(out[n], self.y[n], reduction="none") for n in self.names}
        losses = TaskLosses(values, "main", self.names[1:], [self.names], features=feats,
                            inputs={n: self.x for n in self.names})
        ctx = StepContext(0, self.model, self.model.shared_parameters(), train_losses=None)
        return losses, ctx

    # -- section 1 -------------------------------------------------------------------------------
    def plain(self) -> None:
        losses, _ = self.losses()
        self.opt.zero_grad(set_to_none=True)
        sum(losses.mean(n) for n in self.names).backward()
        self.opt.step()

    def param_jacobian(self, batched: bool | str) -> torch.Tensor:
        losses, ctx = self.losses()
        return TaskGradients(losses, ctx, batched=batched).gramian(self.names)

    # -- section 4 -------------------------------------------------------------------------------
    def ol_aux_step(self, row_only: bool) -> torch.Tensor:
        losses, ctx = self.losses()
        engine = TaskGradients(losses, ctx)
        if row_only:
            row = engine.gramian_row(self.names[0], self.names[1:])
        else:
            row = engine.gramian(self.names)[0, 1:]
        self.opt.zero_grad(set_to_none=True)
        w = dict(zip(self.names, torch.linspace(1.0, 0.5, len(self.names))))
        engine.backward(w, w)
        return row

    def gradnorm_step(self, by_engine: bool) -> list[torch.Tensor]:
        losses, ctx = self.losses()
        engine = TaskGradients(losses, ctx)
        engine.norms(self.names)
        self.opt.zero_grad(set_to_none=True)
        w = torch.linspace(1.0, 0.5, len(self.names))
        if by_engine:
            engine.backward(dict(zip(self.names, w)), dict(zip(self.names, w)))
        else:
            sum(w[i] * losses.mean(t) for i, t in enumerate(self.names)).backward()
        return [p.grad.clone() for p in self.model.parameters()]

    # -- section 3 -------------------------------------------------------------------------------
    def libmtl_gramian(self) -> torch.Tensor:
        """LibMTL's ``_compute_grad(losses, mode='backward')`` then ``G = J J^T`` (see the module docs)."""
        losses, ctx = self.losses()
        shared = ctx.shared_parameters
        sizes = [p.numel() for p in shared]
        device = self.x.device
        grads = torch.zeros(len(self.names), sum(sizes)).to(device)
        for k, name in enumerate(self.names):
            losses.mean(name).backward(retain_graph=k + 1 != len(self.names))
            row = torch.zeros(sum(sizes))  # on the host, as _grad2vec allocates it
            offset = 0
            for p, n in zip(shared, sizes):
                if p.grad is not None:
                    row[offset:offset + n] = p.grad.data.view(-1)
                offset += n
            grads[k] = row
            for p in shared:  # zero_grad_share_params
                p.grad = None
        self.model.zero_grad(set_to_none=True)  # (the heads' gradients, accumulated by every backward)
        return grads @ grads.T

    def repr_step(self) -> None:
        losses, ctx = self.losses()
        engine = TaskGradients(losses, ctx, space="representation")
        gram = engine.gramian(self.names)
        coeffs = (gram[0] >= 0).float()  # any coefficients (GCS-like); the cost is what is measured
        self.opt.zero_grad(set_to_none=True)
        engine.backward(dict(zip(self.names, coeffs)))
        self.opt.step()

    # -- section 2 -------------------------------------------------------------------------------
    def arml_ours(self, mode: str) -> torch.Tensor:
        """ARML's weight gradient by the engine: ``'fused'`` (one backbone pass with a graph and one
        through it), or d by a backward then the inner products by ``'forward'`` / ``'reverse'``."""
        losses, ctx = self.losses()
        engine = TaskGradients(losses, ctx, jvp="reverse" if mode == "reverse" else "forward")
        w = torch.ones(len(self.names) - 1, device=self.x.device)
        coefficients = {"main": 1.0, **{n: -w[i] for i, n in enumerate(self.names[1:])}}
        _, inner = engine.gradient_and_inner_products(coefficients, self.names[1:], fused=mode == "fused")
        return -2 * inner

    def arml_reference(self) -> torch.Tensor:
        losses, ctx = self.losses()
        w = torch.ones(len(self.names) - 1, device=self.x.device, requires_grad=True)
        combined = losses.mean("main") - sum(w[i] * losses.mean(n) for i, n in enumerate(self.names[1:]))
        d = torch.autograd.grad(combined, ctx.shared_parameters, create_graph=True)
        objective = sum((g * g).sum() for g in d)
        (grad,) = torch.autograd.grad(objective, w)
        return grad


def race(variants: dict[str, Callable[[], object]], rounds: int, calls: int, sync: Callable[[], None]) -> dict[str, float]:
    """Median seconds per call of each variant, the variants interleaved round by round."""
    for fn in variants.values():  # warm-up
        fn()
    sync()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(rounds):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        for k in order:
            sync()
            t0 = time.perf_counter()
            for _ in range(calls):
                variants[k]()
            sync()
            times[k].append((time.perf_counter() - t0) / calls)
    return {k: statistics.median(v) for k, v in times.items()}


def verdict(value: float, goal: float) -> str:
    return "meets" if value <= goal else "MISSES"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calls", type=int, default=5)
    p.add_argument("--ks", default="1,5,10,39")
    p.add_argument("--arml-ks", default="2,5,39")
    p.add_argument("--libmtl-ks", default="39")
    p.add_argument("--step-ks", default="5,39")
    p.add_argument("--sections", default="1,2,3,4", help="comma-separated subset of 1,2,3,4")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    print(f"# gradient engine on {device} ({platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads)")

    gpu_goal = 0.5 if device.type == "cuda" else 1.0
    sections = set(args.sections.split(","))
    if "1" in sections:
        print("\n## 1. per-task gradients (ms per call, medians; ratios of medians)")
        print(f"{'K':>3} {'plain':>8} {'param fold':>14} {'param vmap':>11} {'param loop':>11} {'repr step':>10} "
              f"{'fold/loop':>13} {'vmap/loop':>10} {'repr/plain':>11}")
        for k in [int(x) for x in args.ks.split(",")]:
            s = Setting(k, device)
            with warnings.catch_warnings():  # a fallback to the loop would make the comparison moot
                warnings.simplefilter("error", RuntimeWarning)
                loop = s.param_jacobian("loop")
                torch.testing.assert_close(s.param_jacobian("fold"), loop, rtol=1e-3, atol=1e-5)
                torch.testing.assert_close(s.param_jacobian("vmap"), loop, rtol=1e-3, atol=1e-5)
            t = race({"plain": s.plain, "batched": lambda: s.param_jacobian("fold"), "vmap": lambda: s.param_jacobian("vmap"),
                      "loop": lambda: s.param_jacobian("loop"), "repr": s.repr_step}, args.rounds, args.calls, sync)
            bl, vl, rp = t["batched"] / t["loop"], t["vmap"] / t["loop"], t["repr"] / t["plain"]
            print(f"{k:>3} {1e3 * t['plain']:>8.2f} {1e3 * t['batched']:>14.2f} {1e3 * t['vmap']:>11.2f} "
                  f"{1e3 * t['loop']:>11.2f} {1e3 * t['repr']:>10.2f} {bl:>13.2f} {vl:>10.2f} {rp:>11.2f}")
            if k == 39:
                print(f"    K=39 goals: repr step/plain {rp:.2f} <= 1.5 {verdict(rp, 1.5)}; "
                      f"fold/loop {bl:.2f} <= {gpu_goal} {verdict(bl, gpu_goal)}")

    if "2" in sections:
        print("\n## 2. ARML weight step (ms per call; engine / reference)")
        print(f"{'K':>3} {'reference':>10} {'fused':>7} {'fwd-mode':>9} {'dbl-bwd':>8} {'fused/ref':>10} "
              f"{'fwd/ref':>8} {'dbl/ref':>8}  max rel diff")
        modes = ("fused", "forward", "reverse")
        for k in [int(x) for x in args.arml_ks.split(",")]:
            s = Setting(k, device)
            ref = s.arml_reference()
            diff = max(float(((s.arml_ours(m) - ref).abs() / ref.abs().clamp_min(1e-8)).max()) for m in modes)
            t = race({"ref": s.arml_reference, **{m: (lambda m=m: s.arml_ours(m)) for m in modes}},
                     args.rounds, args.calls, sync)
            print(f"{k:>3} {1e3 * t['ref']:>10.2f} {1e3 * t['fused']:>7.2f} {1e3 * t['forward']:>9.2f} "
                  f"{1e3 * t['reverse']:>8.2f} {t['fused'] / t['ref']:>10.2f} {t['forward'] / t['ref']:>8.2f} "
                  f"{t['reverse'] / t['ref']:>8.2f}  {diff:.1e}")
        print("    goal: ours/reference <= 1.0 at every K, and ours constant in K")

    if "3" in sections:
        print("\n## 3. per-task Gramian: auxframe against LibMTL's per-task loop (_compute_grad, mode='backward')")
        print(f"{'K':>3} {'LibMTL':>8} {'default':>8} {'fold':>8} {'default/LibMTL':>15} {'fold/LibMTL':>12}  max rel diff")
        for k in [int(x) for x in args.libmtl_ks.split(",")]:
            s = Setting(k, device)
            ref = s.libmtl_gramian()
            diff = max(float(((s.param_jacobian(b) - ref).abs().max() / ref.abs().max())) for b in ("auto", "fold"))
            t = race({"libmtl": s.libmtl_gramian, "auto": lambda: s.param_jacobian("auto"),
                      "fold": lambda: s.param_jacobian("fold")}, args.rounds, args.calls, sync)
            ratio = t["auto"] / t["libmtl"]
            print(f"{k:>3} {1e3 * t['libmtl']:>8.2f} {1e3 * t['auto']:>8.2f} {1e3 * t['fold']:>8.2f} {ratio:>15.2f} "
                  f"{t['fold'] / t['libmtl']:>12.2f}  {diff:.1e}")
            print(f"    K={k} goal: default/LibMTL {ratio:.2f} <= {gpu_goal} {verdict(ratio, gpu_goal)}")

    if "4" in sections:
        print("\n## 4. OL_AUX's Gramian row and GradNorm's update (ms per whole step; new / previous)")
        print(f"{'K':>3} {'OL_AUX gramian':>15} {'OL_AUX row':>11} {'row/gramian':>12} {'GradNorm bwd':>13} "
              f"{'GradNorm w@J':>13} {'w@J/bwd':>8}  max rel diff")
        for k in [int(x) for x in args.step_ks.split(",")]:
            s = Setting(k, device)
            old, new = s.ol_aux_step(False), s.ol_aux_step(True)
            diff = float((new - old).abs().max() / old.abs().max())
            for a, b in zip(s.gradnorm_step(False), s.gradnorm_step(True)):
                diff = max(diff, float((a - b).abs().max() / a.abs().max().clamp_min(1e-30)))
            t = race({"gram": lambda: s.ol_aux_step(False), "row": lambda: s.ol_aux_step(True),
                      "bwd": lambda: s.gradnorm_step(False), "wj": lambda: s.gradnorm_step(True)},
                     args.rounds, args.calls, sync)
            print(f"{k:>3} {1e3 * t['gram']:>15.2f} {1e3 * t['row']:>11.2f} {t['row'] / t['gram']:>12.2f} "
                  f"{1e3 * t['bwd']:>13.2f} {1e3 * t['wj']:>13.2f} {t['wj'] / t['bwd']:>8.2f}  {diff:.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
