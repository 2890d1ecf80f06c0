"""Per-task gradients through the backbone by one reverse pass with the tasks folded into the batch.

Given the backbone's output ``z`` (batch ``B``) and K cotangents ``r_k`` of the shape of ``z``,
:func:`batched_vjp` returns ``(dz/dW)^T r_k`` for every k and every parameter ``W`` at once. It
walks the autograd graph that the trainer's forward pass already recorded (so nothing is run
forward again, and the activations, pooling indices and dropout masks are the ones that were
used) and applies, node by node, a hand-written rule that treats the K cotangents as one batch of
``K * B`` samples, with ordinary (non-vmapped) tensor operations:

* convolution: the input gradient by one ``convolution_backward`` at batch ``K * B``; the weight
  gradient of all K tasks by one call with the tasks folded into the output channels
  (``(B, g * K * C_out/g, ...)`` against a weight of ``K * C_out`` channels, ``groups=g``);
* BatchNorm in train mode: the per-group formula
  ``dx = gamma * rstd * (G - mean(G) - xhat * mean(G * xhat))`` with the means over each task's
  own B samples, vectorised over K; in eval mode the affine map of the running statistics;
* ReLU, LeakyReLU, threshold, dropout (the saved mask), elementwise products: masks broadcast
  over K; max pooling: one ``scatter_add`` of all K gradients into the saved indices;
  average and adaptive average pooling, mean, sum, view/reshape/flatten, transpose, add
  (skip connections), ``addmm``/``mm`` (Linear): their adjoints with a leading K dimension.

Only the part of the graph that leads to the requested parameters is visited (no gradient for
the input images). A node without a rule, a graph whose saved tensors were freed, or a gradient
whose shape disagrees with the graph's own metadata raises :class:`Unsupported`, naming the node;
the caller then falls back to one backward per task.

Example::

    rows = torch.stack([dL_k_dz for k in tasks])             # (K, *z.shape)
    grads = batched_vjp(z, rows, list(backbone.parameters()))
    # grads[i]: (K, *params[i].shape), or None where the parameter is not reached
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

aten = torch.ops.aten


class Unsupported(RuntimeError):
    """The autograd graph has a node without a batched rule (its name is the message).

    ``transient`` is True where the failure belongs to this graph, not to the model (its saved
    tensors were freed, or there is no graph): another step's graph may well fold.
    """

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.transient = transient


Rule = Callable[[object, list, list, int], list]
RULES: dict[str, Rule] = {}


def rule(*names: str) -> Callable[[Rule], Rule]:
    """Register ``fn(node, grads, need, k) -> grads of the node's inputs`` for autograd nodes of
    these type names; ``grads`` and the results carry a leading K dimension, ``need[i]`` says
    whether the i-th input leads to a requested parameter (None where it does not)."""

    def register(fn: Rule) -> Rule:
        for name in names:
            RULES[name] = fn
        return fn

    return register


def batched_vjp(
    output: torch.Tensor, rows: torch.Tensor, params: Sequence[torch.Tensor], chunk: int | None = None
) -> list[torch.Tensor | None]:
    """``(d output/d p)^T rows[k]`` for every row k and parameter p, by one batched reverse pass.

    Args:
        output: a tensor with a live autograd graph (saved tensors not yet freed).
        rows: ``(K, *output.shape)`` cotangents.
        params: leaf tensors; their gradients are returned in this order.
        chunk: fold at most this many rows into one pass (None: all K); on CPUs a few rows at a
            time keep the activations' gradients in the cache.

    Returns:
        one ``(K, *p.shape)`` tensor per parameter, None where ``output`` does not depend on it.

    Raises:
        Unsupported: a node of the graph has no batched rule (or its saved tensors are gone).
    """
    if output.grad_fn is None:
        raise Unsupported("the output has no autograd graph", transient=True)
    targets = {id(p): i for i, p in enumerate(params)}
    order, relevant = _relevant_nodes(output.grad_fn, targets)
    if output.grad_fn not in relevant:
        return [None] * len(params)
    # Without gradient: the rules' arithmetic on saved tensors (parameters among them) must not
    # record a graph of its own; the results are plain gradients, as autograd.grad returns them.
    with torch.no_grad():
        if chunk is None or chunk >= rows.shape[0]:
            return _reverse_pass(output, rows, order, relevant, targets, len(params))
        parts = [_reverse_pass(output, r, order, relevant, targets, len(params)) for r in rows.split(chunk)]
        return [None if g[0] is None else torch.cat(g) for g in zip(*parts)]


def _reverse_pass(output, rows, order, relevant, targets, n: int) -> list[torch.Tensor | None]:
    """One pass of the rules over ``order`` at batch ``len(rows) * B``."""
    k = rows.shape[0]
    pending: dict[object, list] = {output.grad_fn: [None] * _num_inputs(output.grad_fn)}
    pending[output.grad_fn][output.output_nr] = rows
    result: list[torch.Tensor | None] = [None] * n
    for node in order:
        grads = pending.pop(node, None)
        if grads is None:
            continue
        name = type(node).__name__
        if name == "AccumulateGrad":
            i = targets[id(node.variable)]
            result[i] = grads[0] if result[i] is None else result[i] + grads[0]
            continue
        _check_shapes(node, grads, k)
        fn = RULES.get(name)
        if fn is None:
            raise Unsupported(name)
        edges = node.next_functions
        need = [nxt is not None and nxt in relevant for nxt, _ in edges]
        try:
            outs = fn(node, grads, need, k)
        except Unsupported:
            raise
        except (RuntimeError, AttributeError) as err:  # freed saved tensors, an unexpected variant
            freed = isinstance(err, RuntimeError) and "freed" in str(err)
            raise Unsupported(f"{name} ({str(err).splitlines()[0]})", transient=freed) from err
        for (nxt, nr), needed, g in zip(edges, need, outs):
            if not needed or g is None:
                continue
            slots = pending.setdefault(nxt, [None] * _num_inputs(nxt))
            slots[nr] = g if slots[nr] is None else slots[nr] + g
    return result


def _relevant_nodes(root, targets: dict[int, int]) -> tuple[list, set]:
    """Nodes from which a target parameter is reachable, in an order where every node comes
    after all nodes that feed it a gradient (reverse topological order of the forward)."""
    post: list = []
    relevant: set = set()
    visited: set = set()
    stack = [(root, False)]
    while stack:
        node, done = stack.pop()
        if done:
            post.append(node)
            if type(node).__name__ == "AccumulateGrad":
                if id(node.variable) in targets:
                    relevant.add(node)
            elif any(nxt in relevant for nxt, _ in node.next_functions if nxt is not None):
                relevant.add(node)
            continue
        if node in visited:
            continue
        visited.add(node)
        stack.append((node, True))
        for nxt, _ in node.next_functions:
            if nxt is not None and nxt not in visited:
                stack.append((nxt, False))
    # A depth-first post-order lists every node after its inputs' producers; reversed, every node
    # comes before the nodes it sends gradients to.
    return [n for n in reversed(post) if n in relevant], relevant


def _num_inputs(node) -> int:
    return max(1, len(node._input_metadata)) if hasattr(node, "_input_metadata") else 1


def _check_shapes(node, grads: list, k: int) -> None:
    meta = getattr(node, "_input_metadata", None)
    if meta is None:
        return
    for g, m in zip(grads, meta):
        if g is not None and tuple(g.shape) != (k, *m.shape):
            raise Unsupported(f"{type(node).__name__} (gradient of shape {tuple(g.shape)[1:]}, expected {tuple(m.shape)})")


def _sum_to(g: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Sum a ``(K, *broadcast)`` gradient down to ``(K, *shape)`` (the adjoint of broadcasting)."""
    shape = tuple(shape)
    if tuple(g.shape[1:]) == shape:
        return g
    lead = g.dim() - 1 - len(shape)
    if lead:
        g = g.sum(dim=tuple(range(1, 1 + lead)))
    dims = tuple(i + 1 for i, n in enumerate(shape) if n == 1 and g.shape[i + 1] != 1)
    return g.sum(dim=dims, keepdim=True) if dims else g


def _target_shape(node, i: int) -> tuple[int, ...]:
    nxt, nr = node.next_functions[i]
    if type(nxt).__name__ == "AccumulateGrad":
        return tuple(nxt.variable.shape)
    return tuple(nxt._input_metadata[nr].shape)


def _fold(g: torch.Tensor) -> torch.Tensor:
    """``(K, B, ...)`` -> ``(K * B, ...)``."""
    return g.reshape(g.shape[0] * g.shape[1], *g.shape[2:])


# -- convolution -----------------------------------------------------------------------------------
@rule("ConvolutionBackward0")
def _convolution(node, grads, need, k):
    if node._saved_transposed:
        raise Unsupported("ConvolutionBackward0 (transposed convolution)")
    g, x, w = grads[0], node._saved_input, node._saved_weight
    stride, padding, dilation = list(node._saved_stride), list(node._saved_padding), list(node._saved_dilation)
    groups, spatial = node._saved_groups, w.dim() - 2
    b, c_out = x.shape[0], w.shape[0]
    out: list = [None, None, None]
    if need[0]:
        template = g.new_empty(1).expand(k * b, *x.shape[1:])
        dx = aten.convolution_backward(
            _fold(g), template, w, None, stride, padding, dilation, False, [0] * spatial, groups, (True, False, False)
        )[0]
        out[0] = dx.view(k, *x.shape)
    if need[1]:
        # Tasks into the output channels, in the group order (B, g, K, C_out/g).
        sp = g.shape[3:]
        go = g.reshape(k, b, groups, c_out // groups, *sp).transpose(0, 1).transpose(1, 2)
        go = go.reshape(b, groups * k * c_out // groups, *sp)
        template = g.new_empty(1).expand(k * c_out, *w.shape[1:])
        dw = aten.convolution_backward(
            go, x, template, None, stride, padding, dilation, False, [0] * spatial, groups, (False, True, False)
        )[1]
        out[1] = dw.view(groups, k, c_out // groups, *w.shape[1:]).transpose(0, 1).reshape(k, *w.shape)
    if len(need) > 2 and need[2]:
        out[2] = g.sum(dim=(1, *range(3, g.dim())))
    return out


# -- BatchNorm -------------------------------------------------------------------------------------
@rule("NativeBatchNormBackward0", "CudnnBatchNormBackward0", "MiopenBatchNormBackward0")
def _batch_norm(node, grads, need, k):
    g, x = grads[0], node._saved_input
    w = node._saved_weight
    training = bool(node._saved_training)
    eps = float(getattr(node, "_saved_eps", getattr(node, "_saved_epsilon", None)))
    reduce = (0, *range(2, x.dim()))
    view = (1, x.shape[1], *([1] * (x.dim() - 2)))
    if training:
        if type(node).__name__ == "NativeBatchNormBackward0":
            mean, rstd = node._saved_result1, node._saved_result2
        else:  # the batch statistics again: the saved ones are named and defined per backend
            var, mean = torch.var_mean(x, dim=reduce, unbiased=False)
            rstd = (var + eps).rsqrt()
    else:
        mean, rstd = node._saved_running_mean, (node._saved_running_var + eps).rsqrt()
    xhat = (x - mean.view(view)) * rstd.view(view)
    per_task = tuple(d + 1 for d in reduce)
    scale = rstd if w is None else w * rstd
    out: list = [None, None, None]
    need_bias = len(need) > 2 and need[2]
    sum_gx = (g * xhat).sum(dim=per_task) if (need[1] or (need[0] and training)) else None
    sum_g = g.sum(dim=per_task) if need_bias or (need[0] and training) else None
    if need[0]:
        if training:
            # dx = scale * (g - mean(g) - xhat * mean(g * xhat)), in two passes over the K * B batch
            n = x.numel() // x.shape[1]
            kview = (k, *view)
            dx = torch.addcmul((sum_g * (-scale / n)).view(kview), xhat, (sum_gx * (-scale / n)).view(kview))
            out[0] = dx.addcmul_(g, scale.view(view))
        else:
            out[0] = g * scale.view(view)
    if need[1]:
        out[1] = sum_gx
    if need_bias:
        out[2] = sum_g
    return out


# -- activations and masks -------------------------------------------------------------------------
@rule("ReluBackward0")
def _relu(node, grads, need, k):
    return [aten.threshold_backward(grads[0], node._saved_result, 0)]  # broadcasts over K


@rule("ThresholdBackward0")
def _threshold(node, grads, need, k):
    return [aten.threshold_backward(grads[0], node._saved_self, node._saved_threshold)]


@rule("ThresholdBackward1")
def _threshold_inplace(node, grads, need, k):
    return [aten.threshold_backward(grads[0], node._saved_result, node._saved_threshold)]


@rule("LeakyReluBackward0", "LeakyReluBackward1")
def _leaky_relu(node, grads, need, k):
    saved = node._saved_self if type(node).__name__ == "LeakyReluBackward0" else node._saved_result
    return [torch.where(saved > 0, grads[0], grads[0] * node._saved_negative_slope)]


@rule("NativeDropoutBackward0")
def _dropout(node, grads, need, k):
    p = node._saved_p  # F.dropout reaches native_dropout (CUDA) only in train mode
    scale = 0.0 if p == 1 else 1.0 / (1.0 - p)
    return [grads[0] * (node._saved_result1 * scale)]


@rule("MulBackward0")
def _mul(node, grads, need, k):
    g = grads[0]
    out: list = [None, None]
    if need[0]:
        out[0] = _sum_to(g * node._saved_other, _target_shape(node, 0))
    if need[1]:
        out[1] = _sum_to(g * node._saved_self, _target_shape(node, 1))
    return out


@rule("MulBackward1")
def _mul_scalar(node, grads, need, k):
    return [grads[0] * node._saved_other]


# -- pooling and reductions ------------------------------------------------------------------------
@rule("MaxPool2DWithIndicesBackward0", "MaxPool3DWithIndicesBackward0")
def _max_pool(node, grads, need, k):
    x, idx, g = node._saved_self, node._saved_result1, grads[0]
    b, c = x.shape[:2]
    dx = g.new_zeros(k, b, c, x[0, 0].numel())
    dx.scatter_add_(3, idx.reshape(1, b, c, -1).expand(k, -1, -1, -1), g.reshape(k, b, c, -1))
    return [dx.view(k, *x.shape)]


@rule("AvgPool2DBackward0")
def _avg_pool(node, grads, need, k):
    x, g = node._saved_self, grads[0]
    template = g.new_empty(1).expand(k * x.shape[0], *x.shape[1:])
    dx = aten.avg_pool2d_backward(
        _fold(g), template, node._saved_kernel_size, node._saved_stride, node._saved_padding,
        node._saved_ceil_mode, node._saved_count_include_pad, node._saved_divisor_override,
    )
    return [dx.view(k, *x.shape)]


@rule("AdaptiveAvgPool2DBackward0")
def _adaptive_avg_pool(node, grads, need, k):
    x, g = node._saved_self, grads[0]
    template = g.new_empty(1).expand(k * x.shape[0], *x.shape[1:])
    return [aten._adaptive_avg_pool2d_backward(_fold(g), template).view(k, *x.shape)]


def _reduced_back(g: torch.Tensor, sizes: Sequence[int], dims, keepdim: bool) -> torch.Tensor:
    n = len(sizes)
    dims = sorted(d % n for d in dims) if dims else list(range(n))  # dim=() reduces everything
    if not keepdim:
        for d in dims:
            g = g.unsqueeze(d + 1)
    return g.expand(g.shape[0], *sizes)


@rule("MeanBackward1")
def _mean(node, grads, need, k):
    sizes = list(node._saved_self_sym_sizes)
    g = _reduced_back(grads[0], sizes, node._saved_dim, node._saved_keepdim)
    return [g * (grads[0].numel() / g.numel())]


@rule("MeanBackward0")
def _mean_all(node, grads, need, k):
    sizes = list(node._saved_self_sym_sizes)
    g = _reduced_back(grads[0], sizes, (), False)
    return [g / max(1, g[0].numel())]


@rule("SumBackward1")
def _sum(node, grads, need, k):
    return [_reduced_back(grads[0], list(node._saved_self_sym_sizes), node._saved_dim, node._saved_keepdim)]


@rule("SumBackward0")
def _sum_all(node, grads, need, k):
    return [_reduced_back(grads[0], list(node._saved_self_sym_sizes), (), False)]


# -- shapes ----------------------------------------------------------------------------------------
@rule("ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0", "AsStridedBackward0")
def _view(node, grads, need, k):
    if type(node).__name__ == "AsStridedBackward0":
        raise Unsupported("AsStridedBackward0")
    return [grads[0].reshape(k, *node._saved_self_sym_sizes)]


@rule("ExpandBackward0")
def _expand(node, grads, need, k):
    return [_sum_to(grads[0], list(node._saved_self_sym_sizes))]


@rule("TBackward0")
def _t(node, grads, need, k):
    g = grads[0]
    return [g.transpose(1, 2) if g.dim() == 3 else g]


@rule("TransposeBackward0")
def _transpose(node, grads, need, k):
    g = grads[0]
    n = g.dim() - 1
    return [g.transpose(node._saved_dim0 % n + 1, node._saved_dim1 % n + 1)]


@rule("PermuteBackward0")
def _permute(node, grads, need, k):
    dims = [d % (grads[0].dim() - 1) for d in node._saved_dims]
    inverse = [0] * len(dims)
    for i, d in enumerate(dims):
        inverse[d] = i
    return [grads[0].permute(0, *(d + 1 for d in inverse))]


@rule("CloneBackward0", "AliasBackward0", "AddBackward1", "SubBackward1", "ContiguousBackward0")
def _identity(node, grads, need, k):
    return [grads[0]]


# -- sums and matrix products ----------------------------------------------------------------------
@rule("AddBackward0", "SubBackward0")
def _add(node, grads, need, k):
    g, alpha = grads[0], node._saved_alpha
    sign = -1 if type(node).__name__ == "SubBackward0" else 1
    out: list = [None, None]
    if need[0]:
        out[0] = _sum_to(g, _target_shape(node, 0))
    if need[1]:
        other = g if alpha * sign == 1 else g * (alpha * sign)
        out[1] = _sum_to(other, _target_shape(node, 1))
    return out


@rule("AddmmBackward0")
def _addmm(node, grads, need, k):
    g, alpha, beta = grads[0], node._saved_alpha, node._saved_beta
    out: list = [None, None, None]
    if need[0]:
        out[0] = _sum_to(g if beta == 1 else g * beta, _target_shape(node, 0))
    if need[1]:
        out[1] = torch.matmul(g, node._saved_mat2.t()) * alpha if alpha != 1 else torch.matmul(g, node._saved_mat2.t())
    if need[2]:
        dw = torch.einsum("bi,kbo->kio", node._saved_mat1, g)
        out[2] = dw if alpha == 1 else dw * alpha
    return out


@rule("MmBackward0")
def _mm(node, grads, need, k):
    g = grads[0]
    out: list = [None, None]
    if need[0]:
        out[0] = torch.matmul(g, node._saved_mat2.t())
    if need[1]:
        out[1] = torch.einsum("bi,kbo->kio", node._saved_self, g)
    return out


@rule("MaxUnpool2DBackward0")
def _max_unpool(node, grads, need, k):
    idx, g = node._saved_indices, grads[0]
    b, c = idx.shape[:2]
    dx = g.reshape(k, b, c, -1).gather(3, idx.reshape(1, b, c, -1).expand(k, -1, -1, -1))
    return [dx.view(k, *idx.shape)]
