"""Hypergradient costs on a small CNN: how to take Hessian-vector products, and what J terms cost.

Setup: four conv layers (3-16-32-32, then a 1x1 conv to 10 + 4 + 2 logits, global average pool),
batch 32 of 8x8 RGB inputs. ``W`` = all conv parameters; ``phi`` = the 3 weights of a linear
combination of three per-sample cross-entropy losses (main 10 classes, two auxiliary tasks with 4
and 2 classes): ``L_T = mean_b sum_k phi_k l_bk``; the outer loss is the main loss on a second
batch (the auxiliary set).

Measured side by side, each variant timed in interleaved rounds (median per call):

(a) one Hessian-vector product: reverse-over-reverse on a retained gradient graph (what
    :class:`auxframe.hypergrad.HessianOperator` does; the graph built once, then one backward per
    product), the same including building that graph (forward + create_graph backward + one
    product), and forward-over-reverse, ``torch.func.jvp(torch.func.grad(f))`` with
    ``functional_call`` (forward + backward + tangents per product). Values are asserted equal.
(b) the whole outer step, ``hypergradient(..., neumann_terms=J)`` for J = 0, 1, 3, 5, including the
    two forward passes it needs, against one plain training step on the combined loss (forward,
    backward, SGD step: the inner step of the same model).
(c) the mixed term alone, given ``p``: one backward through the retained gradient graph
    (``mixed="vjp"``, the default), one first-order backward per phi element (``mixed="jacobian"``),
    and a forward-mode directional derivative of the three task losses along ``p``
    (``torch.func.jvp``; needs the model as a function, so it is not in the module).

Run::

    OMP_NUM_THREADS=1 .venv/bin/python bench/hypergrad_methods.py
    OMP_NUM_THREADS=1 .venv/bin/python bench/hypergrad_methods.py --rounds 9 --calls 20
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, jvp

from auxframe.hypergrad import HessianOperator, hypergradient, mixed_jacobian, mixed_vjp

CLASSES = (10, 4, 2)  # main task, two auxiliary tasks


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, sum(CLASSES), 1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    )


def batch(generator: torch.Generator, size: int = 32):
    x = torch.randn(size, 3, 8, 8, generator=generator)
    ys = [torch.randint(0, c, (size,), generator=generator) for c in CLASSES]
    return x, ys


def per_sample_losses(logits: torch.Tensor, ys) -> torch.Tensor:
    """``(B, 3)``: per-sample cross-entropy of each task."""
    heads = logits.split(CLASSES, dim=1)
    return torch.stack([F.cross_entropy(h, y, reduction="none") for h, y in zip(heads, ys)], dim=1)


def timed(fn: Callable[[], object], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def race(variants: dict[str, Callable[[], object]], rounds: int, calls: int) -> dict[str, float]:
    """Median seconds per call of each variant; rounds interleave variants, order alternating."""
    for fn in variants.values():  # warm-up
        fn()
    samples: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            samples[name].append(timed(variants[name], calls))
    return {name: statistics.median(s) for name, s in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=10, help="calls per variant per round")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    model = small_cnn()
    W = list(model.parameters())
    names = [n for n, _ in model.named_parameters()]
    phi = torch.tensor([1.0, 0.5, 0.5], requires_grad=True)
    (x, ys), (xa, ya) = batch(gen), batch(gen)
    optimizer = torch.optim.SGD(W, lr=1e-2)
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads; small CNN with {sum(p.numel() for p in W):,} "
        f"conv parameters, batch {len(x)}, 8x8 inputs, {args.rounds} rounds x {args.calls} calls"
    )

    def train_loss_of(params: dict) -> torch.Tensor:
        return (per_sample_losses(functional_call(model, params, (x,)), ys) @ phi.detach()).mean()

    def losses() -> tuple[torch.Tensor, torch.Tensor]:
        train = (per_sample_losses(model(x), ys) @ phi).mean()
        outer = F.cross_entropy(model(xa)[:, : CLASSES[0]], ya[0])
        return train, outer

    # (a) Hessian-vector products --------------------------------------------------------------
    v = [torch.randn(p.shape, generator=gen) for p in W]
    operator = HessianOperator(losses()[0], W)
    primals = {n: p.detach() for n, p in zip(names, W)}
    tangents = dict(zip(names, v))

    def reverse_fresh():
        return HessianOperator((per_sample_losses(model(x), ys) @ phi).mean(), W)(v)

    def forward_over_reverse():
        return jvp(grad(train_loss_of), (primals,), (tangents,))[1]

    rr, fr = operator(v), forward_over_reverse()
    for n, a in zip(names, rr):
        torch.testing.assert_close(fr[n], a, rtol=1e-4, atol=1e-5 * a.abs().max().item())
    t = race(
        {"rev-rev (retained graph)": lambda: operator(v), "rev-rev (incl. graph)": reverse_fresh,
         "fwd-rev (func.jvp)": forward_over_reverse},
        args.rounds, args.calls,
    )
    print("\n(a) one Hessian-vector product (values equal: checked)")
    base = t["rev-rev (retained graph)"]
    for name, s in t.items():
        print(f"    {name:28s} {s * 1e3:7.2f} ms   {s / base:5.2f}x")
    print(f"    fwd-rev / rev-rev: {t['fwd-rev (func.jvp)'] / base:.2f} (retained graph), "
          f"{t['fwd-rev (func.jvp)'] / t['rev-rev (incl. graph)']:.2f} (graph built per product)")

    # (b) the whole outer step against a plain training step ------------------------------------
    def plain_step():
        optimizer.zero_grad()
        (per_sample_losses(model(x), ys) @ phi.detach()).mean().backward()
        optimizer.step()

    def outer_step(J: int):
        def run():
            train, outer = losses()
            return hypergradient(train, outer, W, [phi], neumann_terms=J, alpha=1e-2)
        return run

    lr = optimizer.param_groups[0]["lr"]
    optimizer.param_groups[0]["lr"] = 0.0  # time the step, keep the weights (same work per call)
    t = race({"plain step": plain_step, **{f"J={J}": outer_step(J) for J in (0, 1, 3, 5)}},
             args.rounds, args.calls)
    optimizer.param_groups[0]["lr"] = lr
    print("\n(b) outer step (2 forwards + hypergradient) vs one plain training step")
    base = t["plain step"]
    for name, s in t.items():
        print(f"    {name:12s} {s * 1e3:7.2f} ms   {s / base:5.2f}x plain step")
    per_term = (t["J=5"] - t["J=1"]) / 4
    print(f"    each extra Neumann term: {per_term * 1e3:.2f} ms = {per_term / base:.2f}x plain step")

    # (c) the mixed term, given p --------------------------------------------------------------
    p = [torch.randn(q.shape, generator=gen) for q in W]
    train, _ = losses()
    graph = HessianOperator(train, W)

    def by_vjp():
        return mixed_vjp(graph.grads, p, [phi])[0]

    def by_jacobian():
        return mixed_jacobian(train, W, [phi], p)[0]

    p_named = dict(zip(names, p))

    def task_means(params: dict) -> torch.Tensor:
        return per_sample_losses(functional_call(model, params, (x,)), ys).mean(0)

    def mixed_forward():
        return jvp(task_means, (primals,), (p_named,))[1]

    ref = by_vjp()
    torch.testing.assert_close(by_jacobian(), ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(mixed_forward(), ref, rtol=1e-4, atol=1e-6)
    t = race({"vjp (retained graph)": by_vjp, "jacobian (3 backwards)": by_jacobian,
              "forward-mode (func.jvp)": mixed_forward}, args.rounds, args.calls)
    print("\n(c) mixed term given p (values equal: checked)")
    base = t["vjp (retained graph)"]
    for name, s in t.items():
        print(f"    {name:26s} {s * 1e3:7.2f} ms   {s / base:5.2f}x")


if __name__ == "__main__":
    main()
