"""The plugin contract kit (auxframe.testing): every built-in plugin passes it; it catches each
mistake plugin authors make, with its message; `auxframe run` catches the same mistakes in its dry
pass, as one line naming the plugin, before anything is written (and the rerun is not refused);
and a third-party package's tests run it over their entry points as a pytest plugin."""

from __future__ import annotations

import pytest

import contract_fixtures as cf
import fixtures_data
from auxframe.cli import main
from auxframe.errors import ContractError
from auxframe.registry import registry
from auxframe.testing import check_backbone, check_dataset, check_head, check_weighting, step_context, task_losses
from auxframe.testing.plugin import installed
from helpers import GIN, REPO, quick_bindings
from plugin_fixtures import make_dist

pytest_plugins = ["pytester"]

#: parameters that keep the checks of the built-ins small (their own tests cover the defaults)
PARAMS = {
    "weightings.auxilearn": {"outer_every": 2},
    "weightings.arml": {"update_every": 2},
    "backbones.segnet": {"filters": (4, 8), "input_shape": (3, 16, 16)},
    "backbones.wrn28_2": {"input_shape": (3, 16, 16)},
}
#: the same code as resnet18 at other depths; checked on the GPU (tests/test_cuda.py)
DEEP = ("backbones.resnet34", "backbones.resnet50")


def builtin(kind):
    return [p for p in installed(kind, ["auxframe"]) if p.qualified_name not in DEEP]


# -- the built-ins pass -----------------------------------------------------------------------------
@pytest.mark.parametrize("plugin", builtin("weightings"), ids=lambda p: p.qualified_name)
def test_every_builtin_weighting_keeps_the_contract(plugin):
    check_weighting(plugin, **PARAMS.get(plugin.qualified_name, {}))


@pytest.mark.parametrize("plugin", builtin("backbones") + builtin("heads"), ids=lambda p: p.qualified_name)
def test_every_builtin_backbone_and_head_keeps_the_contract(plugin):
    check = check_backbone if plugin.kind == "backbones" else check_head
    check(plugin, **PARAMS.get(plugin.qualified_name, {}))


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    return fixtures_data.make_all(tmp_path_factory.mktemp("data"))


@pytest.mark.parametrize("plugin", builtin("datasets"), ids=lambda p: p.qualified_name)
def test_every_builtin_dataset_keeps_the_contract(plugin, roots):
    """On fixtures written in each data set's own format (tests/fixtures_data.py)."""
    params = {"root": str(roots[plugin.name])} if plugin.name in roots else {}
    if plugin.name in ("celeba", "cub", "pacs", "pet"):
        from auxframe.data.transforms import Transforms

        params["transforms"] = Transforms(resize=(16, 16))
    check_dataset(plugin, **params)


# -- the kit catches each mistake -------------------------------------------------------------------
MISTAKES = [
    (cf.ForgetsSuperSetup, "after setup() it has no main_task or aux_tasks: its setup() does not call "
                           "super().setup(info). Call super().setup(info) first in ForgetsSuperSetup.setup."),
    (cf.PerSampleCombine, "combine() returned per-sample losses, a tensor of shape (8,), not one scalar; reduce them"),
    (cf.DetachedCombine, "combine() returned a tensor without gradient (detached from the losses)"),
    (cf.ForgetsItsState, "a run resumed at step 2 from its checkpoint ends with other model parameters than the "
                         "uninterrupted run at step 4"),
]


@pytest.mark.parametrize("weighting, message", MISTAKES, ids=[m[0].__name__ for m in MISTAKES])
def test_check_weighting_names_each_mistake_and_its_fix(weighting, message):
    with pytest.raises(ContractError) as err:
        check_weighting(weighting)
    assert str(err.value).startswith(f"weightings plugin contract_fixtures.{weighting.__name__}: ")
    assert message in str(err.value)


def test_check_backbone_and_dataset_name_their_mistakes():
    with pytest.raises(ContractError, match=r"the backward pass does not reach parameters \['unused.weight', 'unused.bias'\]"):
        check_backbone(cf.UnusedLayerBackbone)
    check_backbone(cf.Backbone)
    with pytest.raises(ContractError, match=r"get_batch\(\) gave images \(3, 1, 8, 8\) float32 for 3 indices; .*\(3, 3, 8, 8\)"):
        check_dataset(cf.declared_shape_differs)


def test_the_builders_give_what_a_step_gives():
    losses = task_losses()
    assert losses.names == ["digit", "parity", "rotation"] and losses.groups == [("digit", "parity"), ("rotation",)]
    assert losses["digit"].shape == (8,) and losses["digit"].requires_grad and losses.features["digit"].shape == (8, 16)
    ctx = step_context()
    assert ctx.aux_set_losses()["digit"].shape == (8,)
    assert set(ctx.train_batch()) == {("digit", "parity"), ("rotation",)}
    assert not ctx.train_losses()["digit"].equal(losses["digit"])  # each draw is a new batch


# -- the dry pass of `auxframe run` -----------------------------------------------------------------
@pytest.fixture
def mistakes(tmp_path, monkeypatch):
    """A package 'auxframe-mistakes' installed (its metadata on sys.path) with the broken plugins."""
    make_dist(tmp_path / "site", "auxframe-mistakes", "0.1", {
        "datasets": {"no_channels": f"{cf.MODULE}:images_without_channels",
                     "wrong_shape": f"{cf.MODULE}:declared_shape_differs"},
        "weightings": {"forgets_setup": f"{cf.MODULE}:ForgetsSuperSetup", "per_sample": f"{cf.MODULE}:PerSampleCombine"},
    })
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    registry.refresh()
    yield
    monkeypatch.undo()
    registry.refresh()


DRY = [
    ("train.weighting = @weightings.forgets_setup()",
     "weightings.forgets_setup (package 'auxframe-mistakes'): after setup() it has no main_task or aux_tasks: its "
     "setup() does not call super().setup(info). Call super().setup(info) first in ForgetsSuperSetup.setup."),
    ("train.weighting = @weightings.per_sample()",
     "weightings.per_sample (package 'auxframe-mistakes'): combine() returned per-sample losses, a tensor of shape "
     "(3,), not one scalar; reduce them, e.g. with losses.mean(task) for each task, so that the trainer can call "
     ".backward() on the result."),
    ("train.dataset = @datasets.no_channels()",
     "plugin datasets.no_channels (package 'auxframe-mistakes') failed while gin built it: ValueError: images must "
     "be (N, C, H, W), got shape (600, 8, 8). It is a mistake in the plugin or in its parameters "
     "(`auxframe describe datasets.no_channels` lists them); nothing was written."),
    ("train.dataset = @datasets.wrong_shape()",
     "datasets.wrong_shape (package 'auxframe-mistakes'): get_batch() gave images (3, 1, 8, 8) float32 for 3 "
     "indices; they must be float32 (B, C, H, W) = (3, 3, 8, 8) as its input_shape (3, 8, 8) says (or set "
     "input_shape to the images' shape)."),
]


@pytest.mark.parametrize("binding, message", DRY, ids=[b.split("@")[1] for b, _ in DRY])
def test_run_refuses_a_broken_plugin_in_one_line_and_writes_nothing(capsys, tmp_path, mistakes, binding, message):
    run_dir = tmp_path / "run"
    args = ["run", "--gin", str(GIN / "experiments/digits_equal_all.gin"), *(a for b in quick_bindings(steps=2) for a in ("--gin-param", b)),
            "--run-dir", str(run_dir)]
    assert main([*args, "--gin-param", binding]) == 2
    assert capsys.readouterr().err == f"auxframe: error: {message}\n"
    assert not run_dir.exists()
    # the rerun with the plugin fixed is not refused
    assert main(args) == 0 and (run_dir / "metrics.json").is_file()


# -- from a third-party package's tests ---------------------------------------------------------------
def test_a_plugin_package_runs_the_contract_tests_over_its_entry_points(tmp_path, monkeypatch, pytester):
    """plugins/auxframe-example's own tests, with the package installed (its metadata on the path),
    run by pytest in this process (pytester)."""
    example = REPO / "plugins" / "auxframe-example"
    make_dist(tmp_path / "site", "auxframe-example", "0.1.0", {
        "backbones": {"example_resnet": "auxframe_example.backbones:ExampleResNet"},
        "weightings": {"aux_anneal": "auxframe_example.weighting:AuxAnneal"}})
    for path in (tmp_path / "site", example):
        monkeypatch.syspath_prepend(str(path))
    registry.refresh()
    try:
        monkeypatch.chdir(example)
        result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-rA", "--rootdir", str(example),
                                              "-c", str(example / "pyproject.toml"), str(example / "tests"))
    finally:
        monkeypatch.undo()
        registry.refresh()
    out = result.stdout.str()
    assert result.ret == 0, out[-3000:]
    for test in ("test_weighting_contract[weightings.aux_anneal]", "test_backbone_contract[backbones.example_resnet]"):
        assert f"PASSED tests/test_auxframe_example.py::{test}" in out
    # only the package's own plugins (auxframe_packages in its pyproject): no built-in, no head or dataset
    assert "weightings.equal" not in out and "got empty parameter set for (auxframe_head)" in out
