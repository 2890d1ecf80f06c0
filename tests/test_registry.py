"""The plugin registry: finding without importing, loading with clear errors, gin names, and the CLI.

Unit tests feed real ``importlib.metadata.EntryPoint`` objects to ``Registry(entry_points=...)``;
they point at small objects in ``tests/plugin_fixtures.py``. Entry points with a distribution come
from ``.dist-info`` folders written by ``plugin_fixtures.make_dist`` and read by importlib.metadata.

Integration tests (marked ``slow``) install ``plugins/auxframe-example`` and
``plugins/auxframe-broken`` for real with pip into a temporary folder, once per session, and run
``python -m auxframe`` with that folder on ``PYTHONPATH``.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import gin
import pytest

import plugin_fixtures as fx
from auxframe.errors import PluginError, PluginLoadError
from auxframe.registry import KINDS, _dist_of, plugin_parameters

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


def unique(prefix: str) -> str:
    """A plugin name no other test registers in gin's process-wide registry."""
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


# ============================================================================ finding vs loading


@pytest.fixture
def exploding_module(tmp_path, monkeypatch) -> str:
    """The name of an importable module that raises ImportError when imported."""
    name = unique("exploding_plugin")
    fx.write_exploding_module(tmp_path, name)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(fx.IMPORT_ATTEMPTS, "exploding", 0)
    return name


def test_find_imports_nothing_and_a_broken_plugin_fails_alone(tmp_path, exploding_module):
    dist = fx.make_dist(tmp_path / "site", "auxframe-fixture", "1.2.3", {
        "backbones": {"exploding": f"{exploding_module}:Backbone", "tiny": f"{fx.MODULE}:TinyBackbone"},
    })
    reg = fx.registry_over(dists=[dist], register_in_gin=False)

    found = reg.find("backbones")
    assert [(p.name, p.value, p.dist, p.version) for p in found] == [
        ("exploding", f"{exploding_module}:Backbone", "auxframe-fixture", "1.2.3"),
        ("tiny", f"{fx.MODULE}:TinyBackbone", "auxframe-fixture", "1.2.3"),
    ]
    assert fx.IMPORT_ATTEMPTS["exploding"] == 0
    assert exploding_module not in sys.modules

    with pytest.raises(PluginLoadError) as caught:
        reg.get("backbones", "exploding")
    err = caught.value
    assert fx.IMPORT_ATTEMPTS["exploding"] == 1
    assert isinstance(err.cause, ImportError) and err.__cause__ is err.cause
    assert (err.kind, err.name, err.dist, err.value) == (
        "backbones", "exploding", "auxframe-fixture", f"{exploding_module}:Backbone")
    message = str(err)
    assert "package 'auxframe-fixture'" in message
    assert f"'exploding = {exploding_module}:Backbone' in group 'auxframe.backbones'" in message
    assert "ImportError: this plugin needs the package 'missing-dependency'" in message
    assert "Fix or uninstall 'auxframe-fixture'" in message

    # The failure is remembered (no second import), and the other plugin still loads.
    with pytest.raises(PluginLoadError) as again:
        reg.get("backbones", "exploding")
    assert again.value is err and fx.IMPORT_ATTEMPTS["exploding"] == 1
    assert reg.get("backbones", "tiny") is fx.TinyBackbone

    results = {info.name: (obj, error) for info, obj, error in reg.load_all("backbones")}
    assert results["tiny"] == (fx.TinyBackbone, None)
    assert results["exploding"] == (None, err)


def test_entry_point_without_a_distribution_shows_unknown_package():
    ep = fx.entry_point("backbones", "orphan", "NotAModule")
    assert getattr(ep, "dist", None) is None  # EntryPoint(name, value, group) carries no dist
    assert _dist_of(ep) == ("<unknown package>", "?")

    reg = fx.registry_over([ep], register_in_gin=False)
    [info] = reg.find("backbones")
    assert (info.dist, info.version, info.entry_point) == ("<unknown package>", "?", ep)
    with pytest.raises(PluginLoadError, match="of package '<unknown package>'"):
        reg.get("backbones", "orphan")


def test_distribution_name_and_version_come_from_its_metadata(tmp_path):
    dist = fx.make_dist(tmp_path, "Auxframe-Fancy", "2.0.1", {"weightings": {"tiny": f"{fx.MODULE}:TinyWeighting"}})
    [ep] = dist.entry_points
    assert _dist_of(ep) == ("Auxframe-Fancy", "2.0.1")
    assert fx.registry_over(dists=[dist]).info("weightings", "tiny").qualified_name == "weightings.tiny"


def test_find_without_kind_covers_every_kind_and_sorts_by_name():
    reg = fx.registry_over([
        fx.entry_point("weightings", "zeta", "TinyWeighting"),
        fx.entry_point("weightings", "alpha", "TinyWeighting"),
        fx.entry_point("losses", "l1", "tiny_loss"),
    ])
    assert [(p.kind, p.name) for p in reg.find()] == [
        ("weightings", "alpha"), ("weightings", "zeta"), ("losses", "l1")]
    assert reg.names("weightings") == ["alpha", "zeta"]
    assert reg.find("heads") == []


# ============================================================================ unknown names and kinds


def test_unknown_name_lists_what_exists_and_the_closest_match():
    reg = fx.registry_over([
        fx.entry_point("backbones", "tiny_backbone", "TinyBackbone"),
        fx.entry_point("backbones", "resnet", "tiny_backbone_factory"),
    ])
    with pytest.raises(PluginError) as caught:
        reg.get("backbones", "tiny_bakbone")
    message = str(caught.value)
    assert not isinstance(caught.value, PluginLoadError)
    assert "unknown backbones plugin 'tiny_bakbone'" in message
    assert "Did you mean 'tiny_backbone'?" in message
    assert "Available backbones: resnet, tiny_backbone." in message
    assert "auxframe list backbones" in message

    with pytest.raises(PluginError) as far:
        reg.info("backbones", "transformer")
    assert "Did you mean" not in str(far.value) and "resnet, tiny_backbone" in str(far.value)

    with pytest.raises(PluginError, match=r"Available heads: \(none installed\)"):
        reg.get("heads", "linear")


def test_load_referenced_adds_where_the_name_was_written():
    reg = fx.registry_over([fx.entry_point("backbones", "tiny", "TinyBackbone"),
                            fx.entry_point("backbones", "wrong", "NotAModule")])
    with pytest.raises(PluginError, match=r"^exp\.gin:12: unknown backbones plugin 'tinny'\. Did you mean 'tiny'"):
        reg.load_referenced([("backbones", "tiny", "exp.gin:3"), ("backbones", "tinny", "exp.gin:12")])
    with pytest.raises(PluginLoadError, match=r"^plugin backbones\.wrong "):  # load errors pass unchanged
        reg.load_referenced([("backbones", "wrong", "exp.gin:4")])


@pytest.mark.parametrize("call", [
    lambda reg: reg.find("backbone"),
    lambda reg: reg.names("backbone"),
    lambda reg: reg.get("backbone", "tiny"),
])
def test_unknown_kind_names_the_kinds_and_the_closest(call):
    reg = fx.registry_over([fx.entry_point("backbones", "tiny", "TinyBackbone")])
    with pytest.raises(PluginError) as caught:
        call(reg)
    message = str(caught.value)
    assert "unknown plugin kind 'backbone'" in message
    assert "Did you mean 'backbones'?" in message
    assert ", ".join(KINDS) in message


# ============================================================================ type checks per kind


@pytest.mark.parametrize("kind, attr, reason", [
    ("backbones", "NotAModule", "not a backbone: NotAModule is a class but not a torch.nn.Module"),
    ("backbones", "NOT_CALLABLE", "42 is not callable"),
    ("heads", "NotAModule", "not a head: NotAModule is a class but not a torch.nn.Module"),
    ("auxnets", "NOT_CALLABLE", "42 is not callable"),
    ("weightings", "NotAModule", "not a weighting: NotAModule does not subclass auxframe.weighting.Weighting"),
    ("weightings", "TinyBackbone", "TinyBackbone does not subclass auxframe.weighting.Weighting"),
    ("metrics", "MetricWithoutCompute", "not a metric: MetricWithoutCompute lacks method(s) compute"),
    ("losses", "NOT_CALLABLE", "42 is not callable"),
    ("datasets", "NOT_CALLABLE", "42 is not callable"),
    ("signals", "NOT_CALLABLE", "42 is not callable"),
])
def test_an_object_of_the_wrong_type_is_a_load_error(kind, attr, reason):
    reg = fx.registry_over([fx.entry_point(kind, "wrong", attr), fx.entry_point(kind, "other", "tiny_loss")],
                           register_in_gin=False)
    with pytest.raises(PluginLoadError) as caught:
        reg.get(kind, "wrong")
    assert reason in str(caught.value)
    assert isinstance(caught.value.cause, str)  # a reason, not an exception: the import went fine
    assert f"'wrong = {fx.MODULE}:{attr}' in group 'auxframe.{kind}'" in str(caught.value)
    assert reg.get(kind, "other") is fx.tiny_loss  # only that plugin is broken (a function passes every kind)


@pytest.mark.parametrize("kind, attr", [
    ("backbones", "TinyBackbone"),
    ("backbones", "tiny_backbone_factory"),
    ("heads", "TinyHead"),
    ("weightings", "TinyWeighting"),
    ("metrics", "TinyMetric"),
    ("losses", "tiny_loss"),
])
def test_an_object_of_the_right_type_loads(kind, attr):
    reg = fx.registry_over([fx.entry_point(kind, "right", attr)], register_in_gin=False)
    obj = reg.get(kind, "right")
    assert obj is getattr(fx, attr)
    assert reg.get(kind, "right") is obj  # loaded once, then cached


# ============================================================================ same name, two packages


def test_same_name_from_two_packages_is_an_error_naming_both(tmp_path):
    one = fx.make_dist(tmp_path / "a", "auxframe-one", "1.0", {"weightings": {"anneal": f"{fx.MODULE}:TinyWeighting"}})
    two = fx.make_dist(tmp_path / "b", "auxframe-two", "0.3", {
        "weightings": {"anneal": f"{fx.MODULE}:TinyWeighting"},
        "backbones": {"tiny": f"{fx.MODULE}:TinyBackbone"},
    })
    reg = fx.registry_over(dists=[two, one])

    assert [(p.name, p.dist) for p in reg.find("weightings")] == [("anneal", "auxframe-one"), ("anneal", "auxframe-two")]
    assert reg.names("weightings") == ["anneal"]
    for call in (reg.info, reg.get):
        with pytest.raises(PluginError) as caught:
            call("weightings", "anneal")
        message = str(caught.value)
        assert not isinstance(caught.value, PluginLoadError)
        assert "weightings.anneal is declared by more than one package" in message
        assert f"'auxframe-one' ({fx.MODULE}:TinyWeighting) and 'auxframe-two' ({fx.MODULE}:TinyWeighting)" in message
        assert "Uninstall one of them" in message
    assert reg.get("backbones", "tiny") is fx.TinyBackbone  # the rest of package two is fine


def test_one_package_visible_twice_on_the_path_is_not_a_clash(tmp_path):
    declared = {"weightings": {"anneal": f"{fx.MODULE}:TinyWeighting"}}
    first = fx.make_dist(tmp_path / "site1", "auxframe-one", "1.0", declared)
    second = fx.make_dist(tmp_path / "site2", "auxframe-one", "1.0", declared)
    reg = fx.registry_over(dists=[first, second])
    assert len(reg.find("weightings")) == 1
    assert reg.get("weightings", "anneal") is fx.TinyWeighting


# ============================================================================ gin names


def test_a_loaded_plugin_is_nameable_in_gin_as_kind_dot_name():
    import auxframe.experiment  # noqa: F401 - registers `train`, whose `backbone` parameter we bind

    name = unique("gin_cnn")
    reg = fx.registry_over([fx.entry_point("backbones", name, "TinyBackbone")])
    with pytest.raises(ValueError, match=f"No configurable matching reference '@backbones.{name}'"):
        gin.parse_config(f"train.backbone = @backbones.{name}")

    assert reg.get("backbones", name) is fx.TinyBackbone
    gin.parse_config([f"train.backbone = @backbones.{name}", f"backbones.{name}.width = 7"])
    reference = gin.query_parameter("train.backbone")
    assert reference.configurable.wrapped is fx.TinyBackbone
    assert reference.configurable.selector == f"backbones.{name}"
    assert gin.get_configurable(f"backbones.{name}")((1, 8, 8)).width == 7
    assert fx.TinyBackbone((1, 8, 8)).width == 4  # gin.register leaves the class itself unchanged


def test_register_in_gin_false_leaves_gin_alone():
    name = unique("no_gin")
    reg = fx.registry_over([fx.entry_point("weightings", name, "TinyWeighting")], register_in_gin=False)
    assert reg.get("weightings", name) is fx.TinyWeighting
    with pytest.raises(ValueError, match=f"Could not find weightings.{name} in the Gin registry"):
        gin.get_configurable(f"weightings.{name}")


def test_plugin_parameters_are_what_gin_can_set():
    assert plugin_parameters(fx.TinyBackbone) == [("input_shape", inspect.Parameter.empty), ("width", 4)]
    assert plugin_parameters(fx.tiny_backbone_factory) == [("input_shape", inspect.Parameter.empty), ("width", 4)]


# ============================================================================ installed for real

PLUGINS = REPO / "plugins"
QUICK_RUN = [
    "--gin", "experiments/digits_equal_all.gin",
    "--gin-param", "train.steps=30",
    "--gin-param", "train.batch_size=16",
    "--gin-param", "train.log_every=10",
    "--gin-param", "train.eval_every=0",
    "--gin-param", "train.checkpoint_every=0",
    "--gin-param", "train.progress=False",
    "--gin-param", "train.device='cpu'",
]
USE_RESNET = ["--gin-param", "train.backbone=@backbones.example_resnet",
              "--gin-param", "backbones.example_resnet.width=8",
              "--gin-param", "backbones.example_resnet.blocks=1"]


def _pip_install_target(target: Path, packages: list[Path]) -> None:
    """``pip install --target``: offline, no dependencies, built with the venv's setuptools."""
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
           "--no-index", "--no-cache-dir", "--disable-pip-version-check", "--target", str(target),
           *map(str, packages)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"pip install failed:\n{done.stdout}\n{done.stderr}"


@pytest.fixture(scope="session")
def installed(tmp_path_factory) -> dict[str, Path]:
    """Site folders holding the plugin packages as pip installs them: ``both`` and ``example`` alone.

    The sources are copied first, because setuptools writes ``build/`` and ``*.egg-info`` into the
    folder it builds from.
    """
    root = tmp_path_factory.mktemp("plugins")
    ignore = shutil.ignore_patterns("build", "*.egg-info", "__pycache__", "tests")
    example = shutil.copytree(PLUGINS / "auxframe-example", root / "src" / "auxframe-example", ignore=ignore)
    broken = shutil.copytree(PLUGINS / "auxframe-broken", root / "src" / "auxframe-broken", ignore=ignore)
    sites = {"both": root / "site-both", "example": root / "site-example"}
    _pip_install_target(sites["both"], [example, broken])
    # The example package alone: with the broken one, '@weightings.aux_anneal' is ambiguous.
    _pip_install_target(sites["example"], [example])
    return sites


def auxframe(site: Path, *args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run ``python -m auxframe ARGS`` with ``site`` first on PYTHONPATH."""
    # One thread: these models are tiny, and torch's threads thrash when other processes share the CPUs.
    env = dict(os.environ, WANDB_MODE="disabled", WANDB_SILENT="true", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "auxframe", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=180)


def list_rows(stdout: str, last: str = "STATUS") -> dict[tuple[str, str], dict[str, str]]:
    """``auxframe list [--check]`` output as {(name, package): {kind, version, status or target}}."""
    lines = stdout.strip().splitlines()
    assert re.split(r"\s{2,}", lines[0].strip()) == ["NAME", "KIND", "PACKAGE", "VERSION", last]
    rows = {}
    for line in lines[1:]:
        name, kind, package, version, status = re.split(r"\s{2,}", line.strip(), maxsplit=4)
        rows[(name, package)] = {"kind": kind, "version": version, last.lower(): status}
    return rows


@pytest.mark.slow
def test_list_reads_metadata_only_and_names_clashes(installed):
    """Without --check nothing is imported: broken plugins are listed with their targets like the others."""
    done = auxframe(installed["both"], "list")
    assert done.returncode == 0, done.stderr
    rows = list_rows(done.stdout, last="TARGET")
    assert rows[("broken_import", "auxframe-broken")]["target"].startswith("auxframe_broken.broken_import:")
    assert rows[("example_resnet", "auxframe-example")] == {
        "kind": "backbones", "version": "0.1.0", "target": "auxframe_example.backbones:ExampleResNet"}
    assert "weightings.aux_anneal is declared by more than one package" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_list_check_shows_installed_plugins_with_their_package_and_status(installed):
    done = auxframe(installed["both"], "list", "--check")
    assert done.returncode == 0, done.stderr
    rows = list_rows(done.stdout)

    assert rows[("example_resnet", "auxframe-example")] == {"kind": "backbones", "version": "0.1.0", "status": "ok"}
    broken_import = rows[("broken_import", "auxframe-broken")]
    assert broken_import["version"] == "0.0.1"
    assert broken_import["status"].startswith("broken: auxframe_broken.broken_import needs the package "
                                              "'auxframe-missing-dependency'")
    assert rows[("not_a_module", "auxframe-broken")]["status"] == (
        "broken: not a backbone: NotAModule is a class but not a torch.nn.Module")
    for package in ("auxframe-example", "auxframe-broken"):
        status = rows[("aux_anneal", package)]["status"]
        assert status.startswith("broken: weightings.aux_anneal is declared by more than one package")
        assert "'auxframe-broken'" in status and "'auxframe-example'" in status
    assert rows[("aux_anneal", "auxframe-example")]["version"] == "0.1.0"

    builtins = {name: row for (name, package), row in rows.items() if package == "auxframe"}
    assert {"small_cnn", "mlp", "classification", "digits", "rotation", "equal", "fixed", "stl"} <= set(builtins)
    assert all(row["status"] == "ok" for row in builtins.values()), builtins


@pytest.mark.slow
def test_list_kind_shows_only_that_kind(installed):
    done = auxframe(installed["both"], "list", "backbones", "--check")
    assert done.returncode == 0, done.stderr
    rows = list_rows(done.stdout)
    assert {row["kind"] for row in rows.values()} == {"backbones"}
    assert {name for name, _ in rows} == {"broken_import", "example_resnet", "mlp", "not_a_module", "small_cnn",
                                          "resnet18", "resnet34", "resnet50", "segnet", "wrn28_2"}


@pytest.mark.slow
def test_describe_shows_docstring_and_parameters(installed):
    done = auxframe(installed["both"], "describe", "backbones.example_resnet")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert out.startswith("backbones.example_resnet  (auxframe_example.backbones:ExampleResNet, "
                          "package auxframe-example 0.1.0)")
    assert "gin: @backbones.example_resnet" in out
    assert "A tiny residual CNN" in out
    assert re.search(r"Parameters:\n  input_shape \(required\)\n  width = 32\n  blocks = 2\n", out), out


@pytest.mark.slow
def test_a_plugin_package_ships_a_recipe(installed, tmp_path):
    """auxframe-example declares its recipe folder in group auxframe.recipes: listed, and it runs by package path."""
    done = auxframe(installed["example"], "ls", "auxframe_example/", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[1].startswith("auxframe_example/configs/resnet_anneal.gin  The quickstart with")
    done = auxframe(installed["example"], "validate", "--gin", "auxframe_example/configs/resnet_anneal.gin",
                    "--gin-param", "train.steps=2", "--gin-param", "train.device='cpu'", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "train.backbone = @backbones.example_resnet" in done.stdout and "weighting AuxAnneal" in done.stdout
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_run_with_the_plugin_backbone(installed, tmp_path):
    run_dir = tmp_path / "run"
    done = auxframe(installed["both"], "run", *QUICK_RUN, *USE_RESNET, "--run-dir", str(run_dir))
    assert done.returncode == 0, done.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["steps"] == 30 and 0.0 <= metrics["test"] <= 1.0
    operative = (run_dir / "operative_config.gin").read_text()
    assert "train.backbone = @backbones.example_resnet" in operative
    assert "example_resnet.width = 8" in operative  # gin shortens names that are unique


@pytest.mark.slow
def test_a_name_declared_by_two_packages_stops_the_run(installed, tmp_path):
    run_dir = tmp_path / "run"
    done = auxframe(installed["both"], "run", *QUICK_RUN, "--gin-param", "train.weighting=@weightings.aux_anneal()",
                    "--run-dir", str(run_dir))
    assert done.returncode == 2, done.stdout + done.stderr
    assert "weightings.aux_anneal is declared by more than one package" in done.stderr
    assert "'auxframe-broken' (auxframe_broken.weighting:DuplicateAuxAnneal)" in done.stderr
    assert "'auxframe-example' (auxframe_example.weighting:AuxAnneal)" in done.stderr
    assert "Traceback" not in done.stderr
    assert not run_dir.exists()


@pytest.mark.slow
def test_run_with_the_plugin_weighting(installed, tmp_path):
    run_dir = tmp_path / "run"
    done = auxframe(installed["example"], "run", *QUICK_RUN, *USE_RESNET,
                    "--gin-param", "train.weighting=@weightings.aux_anneal()",
                    "--gin-param", "weightings.aux_anneal.end=0.25",
                    "--run-dir", str(run_dir))
    assert done.returncode == 0, done.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["weights"] == {"digit": 1.0, "rotation": 0.25, "parity": 0.25, "ge5": 0.25}
    logged = [json.loads(line) for line in (run_dir / "scalars.jsonl").read_text().splitlines()]
    rotation = [row["weight/rotation"] for row in logged if "weight/rotation" in row]
    assert len(rotation) == 3 and rotation == sorted(rotation, reverse=True) and rotation[0] < 1.0
