"""Contract checks of plugins: ``check_weighting``, ``check_dataset``, ``check_backbone``, ``check_head``.

Each check builds the plugin, runs it as a run would (on CUDA when present), and raises one
:class:`~auxframe.errors.ContractError` naming the plugin, what is wrong and the fix. They cover:

- **weightings**: ``setup`` calls ``super().setup(info)``; ``tasks_needed`` and ``inner_parameters``
  are lists that fit the tasks; ``combine`` returns one differentiable scalar; ``backward`` gives the
  main task's head finite gradients; weights, logs and state are finite and on the model's device;
  two runs give the same parameters (determinism); the state survives ``torch.save`` /
  ``torch.load(weights_only=True)`` unchanged, and a run resumed from it ends exactly where an
  uninterrupted one does (exact resume).
- **datasets**: fields, main field and image shape; batches of the declared shapes and dtypes
  with labels in range; seeded training batches that repeat; the two-stage batch on the device;
  two builds that give the same data.
- **backbones** and **heads**: an ``nn.Module`` whose output has the batch first and is finite;
  the backward pass reaches every parameter; evaluation is deterministic and does not mix the
  examples of a batch; a ``state_dict`` round trip gives the same outputs; it runs on the device.

The light checks that cost nothing (the setup contract, a scalar ``combine``, a dataset's shapes)
also run in ``auxframe run``'s dry pass, before the run directory is created
(:func:`auxframe.experiment.train`).

Example:
    >>> from auxframe.testing import check_weighting
    >>> check_weighting(MyWeighting)                    # or "weightings.my_weighting", or an instance
    >>> check_weighting("weightings.auxilearn", outer_every=2)
"""

from __future__ import annotations

import copy
import inspect
import io
import math
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn as nn

from auxframe.errors import ContractError
from auxframe.testing.builders import TinyRun, default_device
from auxframe.weighting.base import Weighting, WeightingSetup

#: image shapes a backbone is checked on when none is given: small colour images, then digits
BACKBONE_SHAPES = ((3, 32, 32), (1, 8, 8))
#: feature shapes a head is checked on when none is given: a vector, then a feature map
HEAD_FEATURES = ((16,), (8, 8, 8))


# -- naming plugins --------------------------------------------------------------------------------
def plugin_label(kind: str, obj: Any) -> str:
    """``kind.name (package 'dist')`` for a plugin object found among the installed entry points,
    else its qualified name."""
    from auxframe.registry import registry

    target = obj if inspect.isclass(obj) or inspect.isfunction(obj) else type(obj)
    value = f"{getattr(target, '__module__', '?')}:{getattr(target, '__qualname__', type(target).__name__)}"
    try:
        found = [p for p in registry.find(kind) if p.value == value]
    except Exception:  # noqa: BLE001 - naming must never fail
        found = []
    if found:
        return f"{kind}.{found[0].name} (package '{found[0].dist}')"
    return f"{kind} plugin {value.replace(':', '.')}"


def _resolve(kind: str, plugin: Any, params: Mapping[str, Any]) -> tuple[str, Callable[..., Any]]:
    """A plugin given as ``"kind.name"``, ``"name"``, a PluginInfo, a factory or an instance, as
    ``(its label, a factory of fresh ones)``."""
    from auxframe.registry import PluginInfo, registry

    if isinstance(plugin, PluginInfo):
        plugin = plugin.name
    if isinstance(plugin, str):
        name = plugin.split(".", 1)[1] if plugin.startswith(f"{kind}.") else plugin
        info = registry.info(kind, name)
        obj = registry.get(kind, name)
        label = f"{kind}.{name} (package '{info.dist}')"
    else:
        obj, label = plugin, plugin_label(kind, plugin)
    if callable(obj) and (inspect.isclass(obj) or inspect.isfunction(obj) or inspect.ismethod(obj)):
        return label, lambda **kw: obj(**{**params, **kw})
    if params:
        raise ContractError(f"{label}: parameters {sorted(params)} were given for an object that is already built.")
    return label, lambda **kw: copy.deepcopy(obj)


def _fail(label: str, problem: str | None) -> None:
    if problem:
        raise ContractError(f"{label}: {problem}")


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and torch.equal(a.detach().cpu(), b.detach().cpu()))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def _differs(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    keys = list(dict.fromkeys([*a, *b]))
    return [str(k) for k in keys if k not in a or k not in b or not _same(a[k], b[k])]


def _tensors(obj: Any, prefix: str = ""):
    if isinstance(obj, torch.Tensor):
        yield prefix or "(state)", obj
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}[{i}]")


# -- the light checks (also run before a run writes anything) ---------------------------------------
def weighting_setup_problem(weighting: Weighting, info: WeightingSetup) -> str | None:
    """What is wrong with a weighting right after ``setup(info)``, or None."""
    missing = [a for a in ("main_task", "aux_tasks") if not hasattr(weighting, a)]
    if missing:
        return (f"after setup() it has no {' or '.join(missing)}: its setup() does not call super().setup(info). "
                f"Call super().setup(info) first in {type(weighting).__name__}.setup.")
    if weighting.main_task != info.main_task or list(weighting.aux_tasks) != list(info.aux_tasks):
        return (f"after setup() its tasks are {weighting.main_task!r} and {list(weighting.aux_tasks)}, but the run's are "
                f"{info.main_task!r} and {list(info.aux_tasks)}; keep what super().setup(info) sets.")
    return None


def combine_problem(total: Any, batch: int | None = None) -> str | None:
    """What is wrong with what ``combine`` returned (it must be one differentiable scalar), or None."""
    if not isinstance(total, torch.Tensor):
        return (f"combine() returned {type(total).__name__}, not a tensor; return the weighted sum of the "
                f"mean losses, e.g. sum(w[t] * losses.mean(t) for t in losses.names).")
    if total.ndim != 0:
        per_sample = batch is not None and total.ndim >= 1 and total.shape[0] == batch
        what = "per-sample losses, a tensor" if per_sample else "a tensor"
        return (f"combine() returned {what} of shape {tuple(total.shape)}, not one scalar; reduce them, e.g. "
                f"with losses.mean(task) for each task, so that the trainer can call .backward() on the result.")
    if not total.is_floating_point():
        return f"combine() returned a {total.dtype} tensor; the combined loss must be floating point."
    if not total.requires_grad:
        return ("combine() returned a tensor without gradient (detached from the losses); build it from "
                "losses.mean(task) or losses[task] without .detach() or .item().")
    return None


def dataset_problem(dataset: Any, batch: int = 3) -> str | None:
    """What is wrong with a built dataset's declared fields and shapes and its batches, or None."""
    from auxframe.data.base import FIELD_KINDS, LabelField

    for attr in ("fields", "main_field", "input_shape", "get_batch", "__len__"):
        if not hasattr(dataset, attr):
            return (f"the dataset ({type(dataset).__name__}) has no `{attr}`; return an "
                    f"auxframe.data.ImageDataset (TensorImageDataset for data in memory).")
    fields = dataset.fields
    if not isinstance(fields, Mapping) or not fields or not all(isinstance(f, LabelField) for f in fields.values()):
        return "its `fields` must be a non-empty dict of label field name -> auxframe.data.LabelField."
    if dataset.main_field not in fields:
        return f"its main_field {dataset.main_field!r} is not one of its fields {sorted(fields)}."
    shape = tuple(dataset.input_shape)
    if len(shape) != 3 or not all(isinstance(s, int) and s > 0 for s in shape):
        return f"its input_shape {shape} is not (channels, height, width) of positive integers."
    n = len(dataset)
    if n < 1:
        return "it is empty (len 0)."
    take = torch.arange(min(batch, n))
    images, labels = dataset.get_batch(take)
    return batch_problem(images, labels, fields, shape, len(take), "get_batch") or (
        None if all(f.kind in FIELD_KINDS for f in fields.values()) else "a field has an unknown kind.")


def batch_problem(images: Any, labels: Any, fields: Mapping[str, Any], shape: tuple, b: int, where: str) -> str | None:
    """What is wrong with one batch ``(images, labels)`` against the declared fields and image shape."""
    if not isinstance(images, torch.Tensor) or images.dtype != torch.float32 or tuple(images.shape) != (b, *shape):
        got = (f"{tuple(images.shape)} {str(images.dtype).replace('torch.', '')}" if isinstance(images, torch.Tensor)
               else type(images).__name__)
        return (f"{where}() gave images {got} for {b} indices; they must be float32 (B, C, H, W) = {(b, *shape)} "
                f"as its input_shape {shape} says (or set input_shape to the images' shape).")
    if not isinstance(labels, Mapping) or set(labels) != set(fields):
        got = sorted(labels) if isinstance(labels, Mapping) else type(labels).__name__
        return f"{where}() gave labels {got}, but its fields are {sorted(fields)}; give one label tensor per field."
    for name, field in fields.items():
        y = labels[name]
        want = {"class": (b,), "dense_class": (b, *shape[1:])}.get(field.kind)
        if want is None:  # regression: channels per image or per pixel
            ok_shapes = [(b, field.channels), (b, field.channels, *shape[1:])]
        else:
            ok_shapes = [want]
        if not isinstance(y, torch.Tensor) or tuple(y.shape) not in ok_shapes or y.dtype != field.dtype:
            got = f"{tuple(y.shape)} {str(y.dtype).replace('torch.', '')}" if isinstance(y, torch.Tensor) else type(y).__name__
            return (f"{where}() gave labels '{name}' of {got}; a '{field.kind}' field takes "
                    f"{' or '.join(map(str, ok_shapes))} {str(field.dtype).replace('torch.', '')}.")
        if field.kind != "regression" and y.numel() and (int(y.min()) < -1 or int(y.max()) >= field.num_classes):
            return (f"{where}() gave labels '{name}' in [{int(y.min())}, {int(y.max())}], outside "
                    f"[0, {field.num_classes}) (and -1 for a missing label); fix the labels or the field's num_classes.")
    if not torch.isfinite(images).all():
        return f"{where}() gave images with NaN or infinite values."
    return None


# -- weightings ------------------------------------------------------------------------------------
def check_weighting(plugin: Any, *, device: torch.device | str | None = None, steps: int | None = None,
                    **params: Any) -> None:
    """Check a weighting plugin's contract (see the module docstring).

    Args:
        plugin: ``"weightings.NAME"``, a PluginInfo, a Weighting subclass or factory, or an instance
            (copied for every run).
        device: where to run (default: CUDA when present, else the CPU).
        steps: training steps per run (default: 4, and at least two outer steps' worth).
        **params: the plugin's parameters, as gin would pass them (e.g. ``outer_every=2``).

    Raises:
        ContractError: the first broken rule, naming the plugin and the fix.
    """
    label, factory = _resolve("weightings", plugin, params)

    def make() -> Weighting:
        w = factory()
        if not isinstance(w, Weighting):
            raise ContractError(f"{label}: it made {type(w).__name__}, not an auxframe.weighting.Weighting subclass.")
        return w

    def on_setup(w: Weighting, info: WeightingSetup) -> None:
        _fail(label, weighting_setup_problem(w, info))
        needed = w.tasks_needed()
        if not isinstance(needed, list) or info.main_task not in needed or not set(needed) <= {info.main_task, *info.aux_tasks}:
            _fail(label, f"tasks_needed() returned {needed!r}; return a list with the main task and any of the "
                         f"auxiliary tasks ({[info.main_task, *info.aux_tasks]}).")
        inner = w.inner_parameters()
        if not isinstance(inner, list) or not all(isinstance(p, torch.Tensor) and p.requires_grad for p in inner):
            _fail(label, "inner_parameters() must return a list of tensors that require grad (not a generator).")
        wrong = [i for i, p in enumerate(inner) if p.device != info.device]
        if wrong:
            _fail(label, f"inner_parameters() {wrong} are on {inner[wrong[0]].device}, the model on {info.device}; "
                         f"create them with device=info.device in setup().")

    device = torch.device(device) if device is not None else default_device()
    probe = TinyRun(make, device, on_setup=on_setup)
    every = probe.weighting.outer_every
    steps = steps or max(4, 2 * every + 1 if every else 4)
    _check_first_step(label, probe)

    first, second = TinyRun(make, device), TinyRun(make, device)
    for run in (first, second):
        for _ in range(steps):
            run.train_step()
    _check_state(label, first.weighting, device)
    if not _same(first.model.state_dict(), second.model.state_dict()) or not _same(
            first.weighting.state_dict(), second.weighting.state_dict()):
        _fail(label, f"two runs from the same seed differ after {steps} steps; draw randomness from torch's seeded "
                     f"generators (or the StepContext), not from time, Python's set order or an unseeded generator.")

    at = max(1, steps // 2)
    before = TinyRun(make, device)
    for _ in range(at):
        before.train_step()
    saved = _round_trip(label, before.state_dict())
    resumed = TinyRun(make, device)
    resumed.load_state_dict(saved)
    state = resumed.weighting.state_dict()
    changed = _differs(saved["weighting"], state)
    if changed:
        _fail(label, f"load_state_dict(state) then state_dict() changes {changed[:3]}; load_state_dict must restore "
                     f"exactly what state_dict returned.")
    for _ in range(steps - at):
        resumed.train_step()
    if not _same(resumed.model.state_dict(), first.model.state_dict()):
        _fail(label, f"a run resumed at step {at} from its checkpoint ends with other model parameters than the "
                     f"uninterrupted run at step {steps}; state_dict() must hold everything its steps depend on "
                     f"(step counters, running averages, its own optimizer's state), and load_state_dict() must "
                     f"update inner_parameters() in place (the model's optimizer holds them).")
    changed = _differs(first.weighting.state_dict(), resumed.weighting.state_dict())
    if changed:
        _fail(label, f"a run resumed at step {at} ends with another weighting state ({changed[:3]}) than the "
                     f"uninterrupted run; state_dict() must hold everything its updates depend on.")


def _check_first_step(label: str, run: TinyRun) -> None:
    w = run.weighting
    overrides = {m: getattr(type(w), m) is not getattr(Weighting, m) for m in ("combine", "backward")}
    if not overrides["combine"] and not overrides["backward"]:
        _fail(label, "it defines neither combine(losses, ctx) nor backward(losses, ctx); define combine.")

    def before(losses, ctx):
        if overrides["combine"] and not overrides["backward"]:
            _fail(label, combine_problem(w.combine(losses, ctx), batch=8))

    def after(total):
        if not isinstance(total, torch.Tensor) or total.ndim != 0 or not torch.isfinite(total).all():
            _fail(label, f"backward() returned {total!r}; return the combined loss, a finite scalar tensor (detached).")
        main = run.model.head_parameters(run.setup.main_task)
        if any(p.grad is None for p in main):
            _fail(label, "after backward() the main task's head has no gradient; the main task's loss must be trained.")
        bad = [n for n, p in run.model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
        if bad:
            _fail(label, f"backward() left non-finite gradients in {bad[:3]}.")

    run.train_step(before, after)


def _check_state(label: str, w: Weighting, device: torch.device) -> None:
    weights, logs = w.weights(), w.log_values()
    for what, values in (("weights()", weights), ("log_values()", logs)):
        if not isinstance(values, Mapping) or not all(isinstance(k, str) for k in values):
            _fail(label, f"{what} must return a dict of str -> float.")
        bad = {k: v for k, v in values.items() if not isinstance(v, (int, float)) or not math.isfinite(v)}
        if bad:
            _fail(label, f"{what} holds values that are not finite Python numbers: {bad}; return float(...) of each.")
    state = w.state_dict()
    if not isinstance(state, Mapping):
        _fail(label, f"state_dict() returned {type(state).__name__}; return a dict.")
    for name, t in _tensors(state):
        if t.device != device and t.numel() > 1:
            _fail(label, f"its state '{name}' is on {t.device} while the model is on {device}; create tensors with "
                         f"device=info.device in setup() (it breaks on a GPU).")
        if t.is_floating_point() and not torch.isfinite(t).all():
            _fail(label, f"its state '{name}' is not finite after a few steps.")


def _round_trip(label: str, state: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint as the trainer writes and reads it: torch.save, then torch.load(weights_only=True)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    try:
        return torch.load(buf, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickling errors have no common type
        raise ContractError(f"{label}: its state_dict() cannot be loaded back with torch.load(weights_only=True), as "
                            f"checkpoints are ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); keep it to "
                            f"tensors, numbers, strings, lists and dicts.") from exc


# -- datasets -----------------------------------------------------------------------------------------
def check_dataset(plugin: Any, *, device: torch.device | str | None = None, **params: Any) -> None:
    """Check a dataset plugin's contract (see the module docstring).

    Args:
        plugin: ``"datasets.NAME"``, a PluginInfo, a factory, or a built dataset.
        device: where the second stage of a batch runs (default: CUDA when present).
        **params: the factory's parameters (e.g. ``root=...``).

    Raises:
        ContractError: the first broken rule, naming the plugin and the fix.
        DataError: the dataset cannot be built (e.g. its files are missing).
    """
    label, factory = _resolve("datasets", plugin, params)
    data = factory()
    _fail(label, dataset_problem(data))
    n, shape = len(data), tuple(data.input_shape)
    take = torch.arange(min(4, n))
    main = data.fields[data.main_field]
    if main.kind == "class":
        targets = data.targets(data.main_field)
        if len(targets) != n:
            _fail(label, f"targets({data.main_field!r}) has {len(targets)} entries for {n} examples.")
    first, again = data.get_train_batch(take, 7), data.get_train_batch(take, 7)
    _fail(label, batch_problem(*first, data.fields, shape, len(take), "get_train_batch"))
    if not _same(first, again):
        _fail(label, "get_train_batch(indices, seed) gave two different batches for the same seed; draw its "
                     "augmentation from a generator seeded by `seed` (resumed runs must see the same batches).")
    device = torch.device(device) if device is not None else default_device()
    images, labels = data.fetch_batch(take, 7)
    finished = data.finish_batch(images.to(device), {k: v.to(device) for k, v in labels.items()}, 7)
    _fail(label, batch_problem(*finished, data.fields, shape, len(take), "finish_batch"))
    if finished[0].device.type != device.type:
        _fail(label, f"finish_batch() moved the batch to {finished[0].device}; it runs on the training device ({device}).")
    if not _same(data.get_batch(take), factory().get_batch(take)):
        _fail(label, "two datasets built with the same parameters give different examples; seed what the factory draws.")


# -- backbones and heads -----------------------------------------------------------------------------
def check_backbone(plugin: Any, *, input_shape: Sequence[int] | None = None, device: torch.device | str | None = None,
                   **params: Any) -> None:
    """Check a backbone plugin's contract: ``factory(input_shape, **params) -> nn.Module`` mapping
    ``(B, C, H, W)`` images to features with the batch first.

    Args:
        plugin: ``"backbones.NAME"``, a PluginInfo or a factory.
        input_shape: the images' shape (default: the first of :data:`BACKBONE_SHAPES` it accepts).
        device: where to run (default: CUDA when present).
        **params: the factory's parameters.

    Raises:
        ContractError: the first broken rule, naming the plugin and the fix.
    """
    label, factory = _resolve("backbones", plugin, params)
    shapes = [tuple(input_shape)] if input_shape is not None else list(BACKBONE_SHAPES)
    build = _first_accepted(label, shapes, lambda s: factory(input_shape=s), "input_shape")
    _check_module(label, build, device)


def check_head(plugin: Any, *, feature_shape: Sequence[int] | None = None, num_outputs: int | None = None,
               device: torch.device | str | None = None, **params: Any) -> None:
    """Check a head plugin's contract: ``factory(feature_shape, num_outputs, **params) -> nn.Module``
    mapping features ``(B, *feature_shape)`` to ``num_outputs`` outputs per example (or per pixel).

    Args:
        plugin: ``"heads.NAME"``, a PluginInfo or a factory.
        feature_shape: the backbone's feature shape (default: the first of :data:`HEAD_FEATURES` it accepts).
        num_outputs: what the head is asked for (default: the first of 5, 3, 1 it accepts, as a
            head for classes, surface normals or depth).
        device: where to run (default: CUDA when present).
        **params: the factory's parameters.

    Raises:
        ContractError: the first broken rule, naming the plugin and the fix.
    """
    label, factory = _resolve("heads", plugin, params)
    shapes = [tuple(feature_shape)] if feature_shape is not None else list(HEAD_FEATURES)
    outputs = [num_outputs] if num_outputs is not None else [5, 3, 1]
    build = _first_accepted(label, [(f, k) for k in outputs for f in shapes],
                            lambda s: factory(feature_shape=s[0], num_outputs=s[1]), "(feature_shape, num_outputs)")
    num_outputs = build[0][1]
    out = _check_module(label, ((build[0][0]), build[1]), device)
    binary_logit = num_outputs == 2 and out.shape[1] == 1
    if out.ndim < 2 or (out.shape[1] != num_outputs and not binary_logit):
        _fail(label, f"asked for num_outputs={num_outputs}, it gives outputs of shape {tuple(out.shape)}; honour "
                     f"num_outputs (output (B, num_outputs) or (B, num_outputs, H, W)).")


def _first_accepted(label: str, shapes: list[tuple], make: Callable[[tuple], Any], what: str):
    """``(shape, a factory of modules for it)`` for the first shape the plugin builds for."""
    refused = []
    for shape in shapes:
        try:
            make(shape)
        except (ValueError, TypeError) as exc:  # a plugin that cannot take this shape says so
            refused.append(f"{shape}: {exc}")
            continue
        except Exception as exc:  # noqa: BLE001 - an AuxframeError refusal is a refusal too
            from auxframe.errors import AuxframeError

            if isinstance(exc, AuxframeError):
                refused.append(f"{shape}: {exc}")
                continue
            raise
        return shape, lambda: make(shape)
    raise ContractError(f"{label}: it cannot be built for any {what} tried ({'; '.join(refused)[:400]}); give "
                        f"{what}=... to the check.")


def _check_module(label: str, build: tuple[tuple, Callable[[], Any]], device) -> torch.Tensor:
    shape, make = build
    device = torch.device(device) if device is not None else default_device()
    torch.manual_seed(0)
    net = make()
    if not isinstance(net, nn.Module):
        _fail(label, f"it made {type(net).__name__}, not a torch.nn.Module.")
    net = net.to(device)
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(0)).to(device)
    net.train()
    out = net(x)
    if not isinstance(out, torch.Tensor):
        _fail(label, f"forward() returned {type(out).__name__}; return one tensor.")
    if out.ndim < 1 or out.shape[0] != 3:
        _fail(label, f"forward() of a batch of 3 returned shape {tuple(out.shape)}; keep the batch as the first dimension.")
    if not out.is_floating_point() or not torch.isfinite(out).all():
        _fail(label, f"forward() returned {str(out.dtype).replace('torch.', '')} values that are not all finite floats.")
    if out.device.type != device.type:
        _fail(label, f"forward() returned its output on {out.device} for inputs on {device}.")
    out.float().square().mean().backward()
    unused = [n for n, p in net.named_parameters() if p.requires_grad and p.grad is None]
    if unused:
        _fail(label, f"the backward pass does not reach parameters {unused[:3]}{' ...' if len(unused) > 3 else ''}; "
                     f"remove layers the forward pass does not use (or set requires_grad=False).")
    net.eval()
    with torch.no_grad():
        first, second, alone = net(x), net(x), net(x[:1])
        if not torch.equal(first, second):
            _fail(label, "two evaluation forwards of the same batch differ; evaluation (eval mode) must be deterministic.")
        if not torch.allclose(alone, first[:1], rtol=1e-4, atol=1e-5):
            _fail(label, "in eval mode an example's output depends on the other examples of its batch (e.g. batch "
                         "statistics used in evaluation); outputs must be per example.")
        torch.manual_seed(1)
        other = make().to(device)
        other.load_state_dict(net.state_dict())
        other.eval()
        if not torch.allclose(other(x), first, rtol=1e-5, atol=1e-6):
            _fail(label, "a fresh module loaded with its state_dict() gives other outputs; keep every tensor the "
                         "forward pass uses in parameters or registered buffers.")
    return first
