"""The gradient engine and every weighting on a GPU, against the same computation on the CPU.

Skipped without CUDA. On a GPU machine, run it with the end-to-end tests moved there too, and
AuxiLearn's outer steps replayed from CUDA graphs wherever they apply (scripts/gpu_session.sh)::

    AUXFRAME_TEST_DEVICE=cuda AUXFRAME_TEST_CUDA_GRAPH=auto pytest tests

Numerical comparisons with the CPU turn TF32 off (``train.tf32 = False``): it rounds fp32 products
to 10 bits of mantissa.
"""

from __future__ import annotations

import gin
import pytest
import torch

from auxframe import config
from auxframe.experiment import train
from auxframe.registry import Registry
from auxframe.weighting.gradients import TaskGradients
from helpers import GIN, quick_bindings
from test_gradients import TASKS, make_step

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_engine_on_gpu_equals_cpu():
    _, cpu_losses, cpu_ctx = make_step(seed=3)
    _, gpu_losses, gpu_ctx = make_step(seed=3, device="cuda")
    cpu, gpu = TaskGradients(cpu_losses, cpu_ctx), TaskGradients(gpu_losses, gpu_ctx)
    assert gpu.batched == "vmap" and not cpu.batched  # 'auto': the vmapped pass on the GPU, the loop on the CPU
    torch.testing.assert_close(gpu.gramian(TASKS).cpu(), cpu.gramian(TASKS), rtol=1e-3, atol=1e-5)
    c = {"main": 1.0, "a": -0.5, "b": 2.0, "rot": -1.0}
    d_cpu, i_cpu = cpu.gradient_and_inner_products(c, TASKS[1:])
    _, i_gpu = gpu.gradient_and_inner_products(c, TASKS[1:])
    torch.testing.assert_close(i_gpu.cpu(), i_cpu, rtol=1e-3, atol=1e-5)
    v = [x.cuda() for x in d_cpu]
    torch.testing.assert_close(gpu.inner_products(TASKS, v).cpu(), cpu.inner_products(TASKS, d_cpu),
                               rtol=1e-3, atol=1e-5)


def test_the_opt_in_fold_and_the_gramian_row_on_gpu_equal_cpu():
    import warnings

    _, cpu_losses, cpu_ctx = make_step(seed=4)
    expected = TaskGradients(cpu_losses, cpu_ctx).gramian(TASKS)
    for seed_step in range(2):  # the first use is checked against the public path, the second trusted
        _, gpu_losses, gpu_ctx = make_step(seed=4, device="cuda")
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # no mismatch, no missing rule
            got = TaskGradients(gpu_losses, gpu_ctx, batched="fold").gramian(TASKS)
        torch.testing.assert_close(got.cpu(), expected, rtol=1e-3, atol=1e-5)
    _, gpu_losses, gpu_ctx = make_step(seed=4, device="cuda")
    row = TaskGradients(gpu_losses, gpu_ctx).gramian_row("main", TASKS[1:])
    torch.testing.assert_close(row.cpu(), expected[0, 1:], rtol=1e-3, atol=1e-5 * float(expected.abs().max()))


WEIGHTINGS = sorted(Registry().names("weightings"))
NEEDS = {"auxilearn": {"weightings.auxilearn.outer_every": 3}}


@pytest.mark.parametrize("name", WEIGHTINGS)
def test_every_weighting_trains_on_gpu_like_on_cpu(tmp_path, name):
    results = {}
    for device in ("cpu", "cuda"):
        gin.clear_config()
        bindings = {"train.device": f"'{device}'", "train.weighting": f"@weightings.{name}()", "train.tf32": "False",
                    **NEEDS.get(name, {})}
        config.parse([GIN / "experiments/digits_equal_all.gin"], quick_bindings(steps=6, **bindings))
        results[device] = train(run_dir=tmp_path / device)
    for task, w in results["cpu"]["weights"].items():
        assert results["cuda"]["weights"][task] == pytest.approx(w, rel=1e-2, abs=1e-3), (task, name)
    assert abs(results["cuda"]["test"] - results["cpu"]["test"]) < 0.05


def test_auxilearn_outer_steps_replayed_from_a_cuda_graph_equal_eager_ones(tmp_path):
    import warnings

    results, said = {}, []
    for graph in (False, True):
        gin.clear_config()
        bindings = {"train.device": "'cuda'", "train.weighting": "@weightings.auxilearn()",
                    "weightings.auxilearn.outer_every": 3, "weightings.auxilearn.mixed": "'vjp'",
                    "weightings.auxilearn.cuda_graph": str(graph)}
        config.parse([GIN / "experiments/digits_equal_all.gin"], quick_bindings(steps=12, **bindings))
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            results[graph] = train(run_dir=tmp_path / str(graph))
        said += [str(w.message) for w in record if str(w.message).startswith("AuxiLearn")]
    assert not said  # the graph applied and was captured
    for task, w in results[False]["weights"].items():
        assert results[True]["weights"][task] == pytest.approx(w, rel=1e-3, abs=1e-4), task
    assert results[True]["test"] == pytest.approx(results[False]["test"], abs=0.02)


# -- the data path on the GPU ---------------------------------------------------------------------
def test_batches_arrive_on_the_gpu_augmented_there_from_pinned_memory(tmp_path):
    import albumentations as A
    import numpy as np

    import fixtures_data as fx
    from auxframe.data.loader import BatchStream, EvalBatches, PoolLoader
    from auxframe.data.signals import Exemplar
    from auxframe.data.torchvision_sets import cifar10
    from auxframe.data.transforms import Transforms

    fx.make_cifar10(tmp_path, train_per_class=8)
    ds = cifar10(str(tmp_path), transforms=Transforms(augment=[A.PadIfNeeded(36, 36, border_mode=4), A.RandomCrop(32, 32),
                                                               A.HorizontalFlip(), A.GaussNoise(std_range=(0.1, 0.1))]))
    cuda = torch.device("cuda")
    stream = BatchStream({"x": PoolLoader(ds, np.arange(80), 16, seed=0)}, cuda, num_workers=2)
    assert stream.pin_memory
    images, labels = next(stream)["x"]
    assert images.device.type == "cuda" and labels["label"].device.type == "cuda" and images.shape == (16, 3, 32, 32)
    again = BatchStream({"x": PoolLoader(ds, np.arange(80), 16, seed=0)}, cuda)  # inline: the same CUDA draws
    assert torch.equal(next(again)["x"][0], images)
    stream.close()
    evaluation = list(EvalBatches(ds, cuda, num_workers=1)(np.arange(40), 16))
    cpu = [ds.get_batch(torch.arange(i, min(i + 16, 40))) for i in range(0, 40, 16)]
    for (x, _), (xc, _) in zip(evaluation, cpu):  # evaluation's finishing (normalising) on the GPU
        assert x.device.type == "cuda"
        torch.testing.assert_close(x.cpu(), xc, rtol=0, atol=1e-6)
    views, ids = Exemplar(n_views=4)(images, torch.Generator(device=cuda).manual_seed(0))
    assert views.device.type == "cuda" and views.shape == (64, 3, 32, 32) and ids.device.type == "cuda"


# -- precision and speed options on the GPU (tests/test_precision.py on the CPU) --------------------
def test_every_reduced_precision_path_matches_fp32_on_the_gpu():
    from test_precision import TOL, reduced_precision_paths, rel

    reference = reduced_precision_paths("fp32", device="cuda")
    for precision in ("bf16", "fp16"):
        low = reduced_precision_paths(precision, device="cuda")
        errors = {name: rel(low[name], ref) for name, ref in reference.items()}
        assert all(e < TOL[precision] for e in errors.values()), (precision, errors)
        assert errors["model gradient"] > 1e-4, (precision, errors)


def _run(run_dir, steps, resume=False, **bindings):
    gin.clear_config()
    config.parse([GIN / "experiments/digits_equal_all.gin"], quick_bindings(steps=steps, **{"train.device": "'cuda'", **bindings}))
    return train(run_dir=run_dir, resume=resume)


def test_quickstart_in_bf16_and_fp16_on_the_gpu_trains_like_fp32():
    results = {p: _run(None, 80, **{"train.precision": f"'{p}'", "train.tf32": "False"}) for p in ("fp32", "bf16", "fp16")}
    for precision in ("bf16", "fp16"):
        loss = results[precision]["metrics"]["test/digit/loss"]
        assert abs(loss - results["fp32"]["metrics"]["test/digit/loss"]) < 0.02, precision
        assert abs(results[precision]["test"] - results["fp32"]["test"]) <= 0.03, precision


def test_deterministic_runs_resume_bit_exactly_on_the_gpu(tmp_path):
    from auxframe.checkpoint import latest_checkpoint, load_checkpoint

    extra = {"train.deterministic": "True", "train.checkpoint_every": 4, "train.precision": "'bf16'",
             "train.channels_last": "True"}
    _run(tmp_path / "straight", 8, **extra)
    _run(tmp_path / "split", 4, **extra)
    _run(tmp_path / "split", 8, resume=True, **extra)
    a, b = (load_checkpoint(latest_checkpoint(tmp_path / d)) for d in ("straight", "split"))
    assert a["step"] == b["step"] == 8
    for name, value in a["model"].items():
        assert torch.equal(value, b["model"][name]), name
    assert not torch.are_deterministic_algorithms_enabled()  # put back after the run


def test_tf32_and_cudnn_benchmark_hold_during_the_run_and_are_put_back():
    from auxframe.weighting.fixed import Equal

    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark)
    seen = []

    class Probe(Equal):
        def combine(self, losses, ctx):
            seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark))
            return super().combine(losses, ctx)

    gin.register(Probe, module="test_cuda")
    _run(None, 2, **{"train.weighting": "@test_cuda.Probe()", "train.tf32": "True"})
    assert seen[1:] == [(True, True), (True, True)]  # seen[0]: the dry pass's combine (auxframe.testing.dry)
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark) == before


def test_compiled_inner_steps_on_the_gpu_give_the_eager_losses(tmp_path):
    import json

    rows = {}
    for compiled in (False, True):
        _run(tmp_path / str(compiled), 6, **{"train.log_every": 1, "train.tf32": "False",
                                            "train.compile": str(compiled)})
        rows[compiled] = [json.loads(line)["train/digit/loss"] for line in
                          (tmp_path / str(compiled) / "scalars.jsonl").read_text().splitlines()
                          if "train/digit/loss" in line]
    assert rows[True] == pytest.approx(rows[False], rel=1e-4, abs=1e-5)


def test_auxilearn_cuda_graph_auto_applies_on_the_gpu_and_equals_eager(tmp_path):
    import warnings

    results = {}
    for graph in ("False", "'auto'"):
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            results[graph] = _run(tmp_path / graph.strip("'"), 12, **{
                "train.weighting": "@weightings.auxilearn()", "weightings.auxilearn.outer_every": 3,
                "weightings.auxilearn.mixed": "'vjp'", "weightings.auxilearn.cuda_graph": graph, "train.tf32": "False"})
        assert not [w for w in record if str(w.message).startswith("AuxiLearn")], graph
    for task, w in results["False"]["weights"].items():
        assert results["'auto'"]["weights"][task] == pytest.approx(w, rel=1e-3, abs=1e-4), task


# -- the contract kit on the GPU: device placement is where plugins break -----------------------------
def _builtin(kind):
    from auxframe.testing.plugin import installed

    return installed(kind, ["auxframe"])


@pytest.mark.parametrize("plugin", _builtin("weightings") + _builtin("backbones") + _builtin("heads"),
                         ids=lambda p: p.qualified_name)
def test_every_builtin_plugin_keeps_its_contract_on_cuda(plugin):
    from auxframe.testing import check_backbone, check_head, check_weighting

    from test_contracts import PARAMS

    check = {"weightings": check_weighting, "backbones": check_backbone, "heads": check_head}[plugin.kind]
    check(plugin, device="cuda", **PARAMS.get(plugin.qualified_name, {}))


def test_the_kit_catches_state_left_on_the_cpu():
    from auxframe.errors import ContractError
    from auxframe.testing import check_weighting

    import contract_fixtures as cf

    with pytest.raises(ContractError, match=r"its state 'running' is on cpu while the model is on cuda"):
        check_weighting(cf.StateOnTheCpu, device="cuda")


def test_run_json_names_the_gpu(tmp_path):
    from auxframe.rundir import read_run_json

    config.parse([GIN / "experiments/digits_equal_all.gin"], quick_bindings(steps=2, **{"train.device": "'cuda'"}))
    train(run_dir=tmp_path / "run")
    device = read_run_json(tmp_path / "run")["device"]
    assert device["type"] == "cuda" and device["name"] == torch.cuda.get_device_name(0)
    assert read_run_json(tmp_path / "run")["versions"]["cuda"] == torch.version.cuda
