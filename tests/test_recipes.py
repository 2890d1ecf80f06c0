"""Shipped recipes: `auxframe ls` lists them, `auxframe cp` copies one to edit, packages ship their own."""

from __future__ import annotations

import sys
import uuid

import gin
import pytest

import plugin_fixtures as fx
from auxframe import config, recipes
from auxframe.cli import main
from helpers import GIN, quick_bindings


def cli(capsys, *args):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def ls_rows(out: str) -> dict[str, str]:
    lines = out.splitlines()
    assert lines[0].split() == ["RECIPE", "DESCRIPTION"]
    return {line.split("  ", 1)[0]: line.split("  ", 1)[1].strip() for line in lines[1:]}


def test_ls_lists_every_shipped_recipe_once_with_its_opening_sentence(capsys):
    code, out, _ = cli(capsys, "ls")
    assert code == 0
    rows = ls_rows(out)
    shipped = {p.relative_to(GIN).as_posix() for p in GIN.rglob("*.gin")}
    assert set(rows) == shipped and len(out.splitlines()) == len(shipped) + 1
    assert next(iter(rows)) == "quickstart.gin"  # top-level files first
    assert rows["quickstart.gin"].startswith("Quickstart: the digit as main task with 5 labels per class")
    assert rows["base/train.gin"] == "Training schedule shared by every digits experiment"


def test_description_is_the_first_sentence_of_the_opening_comment(tmp_path):
    f = tmp_path / "x.gin"
    f.write_text("# ARML (Shi et al., NeurIPS 2020) on digits, e.g. with\n# rotation. More text.\ninclude 'a.gin'\n# later\n")
    assert recipes.description(f) == "ARML (Shi et al., NeurIPS 2020) on digits, e.g. with rotation"
    f.write_text("train.steps = 1\n")
    assert recipes.description(f) == ""


def test_ls_prefix(capsys):
    code, out, _ = cli(capsys, "ls", "weightings/")
    rows = ls_rows(out)
    assert code == 0 and "weightings/arml.gin" in rows and all(r.startswith("weightings/") for r in rows)
    code, out, _ = cli(capsys, "ls", "nothing/")
    assert code == 0 and out.strip() == "no recipes starting with 'nothing/'"


def test_cp_copies_refuses_to_overwrite_and_the_copy_parses_anywhere(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, _ = cli(capsys, "cp", "experiments/digits_arml.gin", "mine.gin")
    assert code == 0 and "auxframe run --gin mine.gin" in out
    assert (tmp_path / "mine.gin").read_text() == (GIN / "experiments/digits_arml.gin").read_text()
    (tmp_path / "mine.gin").write_text("# edited\n")
    code, _, err = cli(capsys, "cp", "experiments/digits_arml.gin", "mine.gin")
    assert code == 2 and "mine.gin already exists; pass --force" in err
    assert (tmp_path / "mine.gin").read_text() == "# edited\n"
    assert cli(capsys, "cp", "experiments/digits_arml", "mine.gin", "--force")[0] == 0  # '.gin' may be left out
    config.parse([tmp_path / "mine.gin"], quick_bindings(steps=1))  # its includes read the shipped recipes
    assert gin.query_parameter("train.steps") == 1

    (tmp_path / "mine").mkdir()
    code, _, _ = cli(capsys, "cp", "quickstart.gin", "mine")  # into a folder, under the recipe's name
    assert code == 0 and (tmp_path / "mine" / "quickstart.gin").is_file()
    code, _, err = cli(capsys, "cp", "experiments/digits_armll.gin", "x.gin")
    assert code == 2 and "no recipe named 'experiments/digits_armll.gin'" in err and "auxframe ls" in err
    assert not (tmp_path / "x.gin").exists()
    assert not list(tmp_path.glob(".tmp-*")) and not list((tmp_path / "mine").glob(".tmp-*"))


@pytest.fixture
def recipe_package(tmp_path, monkeypatch):
    """A package with recipes, declared in group auxframe.recipes, on sys.path; its name."""
    name = f"recipes_{uuid.uuid4().hex[:8]}"
    site = tmp_path / "site"
    configs = site / name / "configs"
    configs.mkdir(parents=True)
    (site / name / "__init__.py").write_text("")
    (configs / "__init__.py").write_text("")
    (configs / "piece.gin").write_text("# A piece.\nLowDataSplit.labels_per_class = 7\n")
    (configs / "exp.gin").write_text(
        f"# The quickstart with 7 labels per class. Shipped by a package.\n"
        f"include 'quickstart.gin'\ninclude '{name}/configs/piece.gin'\n"
    )
    fx.make_dist(site, "auxframe-recipes-fixture", "0.3.0", {"recipes": {"fixture": f"{name}.configs",
                                                                          "gone": f"{name}_missing.configs"}})
    monkeypatch.syspath_prepend(str(site))
    return name


def test_a_package_ships_recipes_through_an_entry_point(capsys, recipe_package, tmp_path, monkeypatch):
    name = recipe_package
    monkeypatch.chdir(tmp_path)
    code, out, err = cli(capsys, "ls")
    rows = ls_rows(out)
    assert code == 0 and rows[f"{name}/configs/exp.gin"] == "The quickstart with 7 labels per class"
    assert "quickstart.gin" in rows  # auxframe's own stay
    assert f"'gone = {name}_missing.configs' of package 'auxframe-recipes-fixture' is not an installed package" in err
    assert name not in sys.modules  # listed without importing the package
    found = [r for r in recipes.recipes(name) if r.name.endswith("exp.gin")]
    assert found[0].dist == "auxframe-recipes-fixture"

    config.parse([f"{name}/configs/exp.gin"], quick_bindings(steps=1))  # --gin and include by package path
    assert gin.query_parameter("LowDataSplit.labels_per_class") == 7
    assert cli(capsys, "cp", f"{name}/configs/exp.gin", "exp.gin")[0] == 0 and (tmp_path / "exp.gin").is_file()


def test_package_paths_are_found_without_importing(recipe_package):
    assert recipes.package_resource(f"{recipe_package}/configs/piece.gin").name == "piece.gin"
    assert recipes.package_resource(f"{recipe_package}/configs/nope.gin") is None
    assert recipes.package_resource("auxframe/configs/base/train.gin") == GIN / "base" / "train.gin"
    assert recipes.find("gin_configs/quickstart.gin") == GIN / "quickstart.gin"  # the old folder's name
    assert recipe_package not in sys.modules
