"""auxframe as a user gets it: the wheel installed in a fresh venv, used from a folder outside the
repository. `auxframe ls`, `auxframe cp`, and a few steps of a copied recipe.

The wheel is built from a copy of the sources with ``pip wheel --no-deps`` (the running
environment's setuptools when it is new enough, else pip's isolated build). The test venv has no pip
and none of the repository: the wheel is installed into it with the running pip's ``--python``, and
the dependencies (torch, gin, ...) are the running interpreter's own site folders, listed in a
``.pth`` file. Folders listed in a ``.pth`` file are put on ``sys.path`` without their own ``.pth``
files being run, so an editable install of auxframe there stays invisible; the venv's own
site-packages comes first, so its auxframe (and its metadata) is the one found.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from helpers import REPO

pytestmark = pytest.mark.slow


def _setuptools_can_build() -> bool:
    try:
        import setuptools
    except ImportError:
        return False
    return int(setuptools.__version__.split(".")[0]) >= 77  # pyproject.toml's build requirement


def _dependency_folders() -> list[str]:
    """The running interpreter's site folders (where torch, gin, ... are): none of the repository's
    own folders, but the site-packages of a venv inside it (CI's .venv), where auxframe is only an
    editable install whose .pth is not run."""
    folders = [*site.getsitepackages(), sysconfig.get_paths()["purelib"],
               *(p for p in sys.path if p.endswith(("site-packages", "dist-packages")))]
    out = []
    for f in folders:
        path = Path(f).resolve()
        outside = REPO not in (path, *path.parents)
        if path.is_dir() and (outside or REPO / ".venv" in path.parents) and str(path) not in out:
            out.append(str(path))
    return out


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path, dict[str, str]]:
    """``(venv's bin folder, a work folder outside the repository, environment)``."""
    root = tmp_path_factory.mktemp("wheel")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(WANDB_MODE="disabled", WANDB_SILENT="true", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PIP_DISABLE_PIP_VERSION_CHECK="1")
    src = root / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "auxframe", src / "auxframe", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    isolation = ["--no-build-isolation", "--no-index"] if _setuptools_can_build() else []
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", *isolation, "-w", str(root / "dist"), str(src)],
         cwd=root, env=env)
    wheel = next((root / "dist").glob("auxframe-*.whl"))
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=root, env=env)
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps", "--no-index",
          str(wheel)], cwd=root, env=env)
    purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=root, env=env)
    Path(purelib.stdout.strip(), "_auxframe_test_deps.pth").write_text("\n".join(_dependency_folders()) + "\n")
    work = root / "work"
    work.mkdir()
    return venv / "bin", work, env


def test_the_installed_package_is_the_wheel_not_the_repository(installed):
    bin_, work, env = installed
    done = _run([str(bin_ / "python"), "-c", "import auxframe, auxframe.configs, importlib.metadata as m, json; "
                 "print(json.dumps([auxframe.__file__, m.distribution('auxframe').read_text('direct_url.json')]))"],
                cwd=work, env=env)
    module, direct_url = json.loads(done.stdout)
    assert Path(module).is_relative_to(bin_.parent) and not Path(module).is_relative_to(REPO)
    assert direct_url is None or '"editable": true' not in direct_url


def test_ls_cp_and_a_copied_recipe_runs(installed):
    bin_, work, env = installed
    auxframe = str(bin_ / "auxframe")
    listed = _run([auxframe, "ls"], cwd=work, env=env).stdout
    names = [line.split()[0] for line in listed.splitlines()[1:]]
    assert {"quickstart.gin", "base/train.gin", "experiments/digits_arml.gin", "weightings/arml.gin"} <= set(names)

    done = _run([auxframe, "cp", "quickstart.gin", "mine.gin"], cwd=work, env=env)
    assert "auxframe run --gin mine.gin" in done.stdout
    again = subprocess.run([auxframe, "cp", "quickstart.gin", "mine.gin"], cwd=work, env=env, capture_output=True,
                           text=True, timeout=60)
    assert again.returncode == 2 and "already exists; pass --force" in again.stderr
    with open(work / "mine.gin", "a") as f:
        f.write("\n# my edit\nLowDataSplit.labels_per_class = 5\n")

    quick = ["train.steps=3", "train.batch_size=16", "train.log_every=1", "train.progress=False", "train.device='cpu'",
             "backbones.small_cnn.channels=(8, 8)"]
    params = [a for b in quick for a in ("--gin-param", b)]
    done = _run([auxframe, "run", "--gin", "mine.gin", *params, "--run-dir", "runs/mine"], cwd=work, env=env)
    assert "main task 'digit': test accuracy = " in done.stdout and "after 3 steps" in done.stdout
    run_dir = work / "runs" / "mine"
    assert json.loads((run_dir / "metrics.json").read_text())["steps"] == 3
    assert "LowDataSplit.labels_per_class = 5" in (run_dir / "operative_config.gin").read_text()
    assert sorted(p.name for p in work.iterdir()) == ["mine.gin", "runs"]  # nothing else written
