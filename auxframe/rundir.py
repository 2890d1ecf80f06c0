"""The run directory: one run per directory, checked before any work, locked while training.

Layout::

    <run_dir>/config.gin            the parsed gin config (compared on --resume)
    <run_dir>/operative_config.gin  what the run actually used (gin.operative_config_str)
    <run_dir>/run.json              provenance (command line, git commit, versions, host, device),
                                    the configuration's group name, start time, W&B run id
    <run_dir>/scalars.jsonl         every logged scalar, one JSON object per line
    <run_dir>/metrics.json          final validation and test metrics
    <run_dir>/checkpoints/          step_<N>.pt, the newest few
    <run_dir>/wandb/                the W&B run (offline unless you asked for online)

``run.json`` records where a run came from (:func:`provenance`): the command line, the working
directory, the git commit of the repository it ran in (and of auxframe's own checkout, when that is
another one) with a ``dirty`` flag for uncommitted changes to tracked files, the auxframe, torch,
CUDA, cuDNN and Python versions, the host, and the device. Each ``--resume`` appends the same record
under ``resumes``. It also records the run's ``group`` (:func:`auxframe.runconfig.group_name`): one name per
configuration, the same for every seed of it, which W&B uses as the run's group.
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from auxframe.errors import RunDirError

CONFIG_FILE = "config.gin"
OPERATIVE_FILE = "operative_config.gin"
RUN_FILE = "run.json"
LOCK_FILE = ".lock"
# Bindings that may change between the original run and a resumed one.
RESUMABLE_CHANGES = ("train.steps", "train.progress", "train.log_every", "train.eval_every")


def _comparable(config: str) -> list[str]:
    return [ln for ln in config.splitlines() if ln.strip() and not ln.startswith(RESUMABLE_CHANGES)]


class RunDir:
    """Checks and owns one run directory.

    Args:
        path: the directory.
        resume: whether the run continues an earlier one in ``path``.
        config: the gin config text of this run (``gin.config_str()``).

    Raises:
        RunDirError: the directory holds another run (or a different config on resume), is not an
            auxframe run directory, has nothing to resume, or is in use by another process.
    """

    def __init__(self, path: str | os.PathLike, resume: bool, config: str):
        self.path = Path(path)
        self.resume = resume
        self.config = config
        self._lock_fd: int | None = None
        saved = self.path / CONFIG_FILE
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"run directory {self.path} is a file; choose a directory with --run-dir.")
        if saved.is_file():
            if not resume:
                raise RunDirError(
                    f"run directory {self.path} already holds a run. Pass --resume to continue it, or "
                    f"choose another --run-dir."
                )
            self._check_same_config(saved.read_text())
            self._lock()
        elif self.path.is_dir() and any(p.name != LOCK_FILE for p in self.path.iterdir()):
            raise RunDirError(
                f"{self.path} is not empty and is not an auxframe run directory (no {CONFIG_FILE}); "
                f"choose a new or empty --run-dir."
            )
        elif resume:
            raise RunDirError(f"nothing to resume in {self.path}: it holds no run. Drop --resume to start one.")

    def _check_same_config(self, saved: str) -> None:
        old, new = _comparable(saved), _comparable(self.config)
        if old != new:
            removed = [ln for ln in old if ln not in new][:5]
            added = [ln for ln in new if ln not in old][:5]
            raise RunDirError(
                f"--resume: the config differs from the one {self.path} was started with "
                f"(only {', '.join(RESUMABLE_CHANGES)} may change). Was: {removed}; now: {added}. "
                f"Resume with the original gin files, or start a new --run-dir."
            )

    def _lock(self) -> None:
        if self._lock_fd is not None:
            return
        fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunDirError(
                f"another auxframe process is training in {self.path}; wait for it to finish or choose "
                f"another --run-dir."
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    def create(self, device: Any = None, world_size: int = 1) -> None:
        """Create the directory (after everything was built and validated) and write the config and
        ``run.json`` (on resume: append this start's provenance to ``resumes``).

        Args:
            device: the training device (a ``torch.device`` or its name), recorded with its model.
            world_size: the number of processes training together (torchrun).
        """
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock()
        record = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **provenance(device, world_size)}
        if self.resume:
            self._write_run_json({"resumes": [*self._read_run_json().get("resumes", []), record]})
            return
        if (self.path / CONFIG_FILE).exists():
            raise RunDirError(f"run directory {self.path} was taken by another run meanwhile; choose another.")
        _write_atomic(self.path / CONFIG_FILE, self.config)
        self._write_run_json({"auxframe_version": _version(), "group": self.group, **record})

    @property
    def group(self) -> str:
        """The name of this run's configuration (:func:`group_name`)."""
        from auxframe.runconfig import group_name

        return group_name(self.config)

    def resume_state(self) -> dict[str, Any] | None:
        """The latest checkpoint's state when resuming (None when starting, or none was written)."""
        if not self.resume:
            return None
        from auxframe.checkpoint import latest_checkpoint, load_checkpoint

        path = latest_checkpoint(self.path)
        return load_checkpoint(path) if path is not None else None

    def wandb_id(self) -> str | None:
        return self._read_run_json().get("wandb_id")

    def record_wandb_id(self, run_id: str | None) -> None:
        if run_id:
            self._write_run_json({"wandb_id": run_id})

    def write_operative_config(self) -> None:
        import gin

        _write_atomic(self.path / OPERATIVE_FILE, gin.operative_config_str())

    def release(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def _read_run_json(self) -> dict[str, Any]:
        return read_run_json(self.path)

    def _write_run_json(self, values: dict[str, Any]) -> None:
        _write_atomic(self.path / RUN_FILE, json.dumps({**self._read_run_json(), **values}, indent=2) + "\n")


def read_run_json(run_dir: str | os.PathLike) -> dict[str, Any]:
    """A run directory's ``run.json`` ({} if it has none)."""
    f = Path(run_dir) / RUN_FILE
    return json.loads(f.read_text()) if f.is_file() else {}


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _version() -> str:
    from auxframe import __version__

    return __version__


# -- provenance -------------------------------------------------------------------------------------
def provenance(device: Any = None, world_size: int = 1) -> dict[str, Any]:
    """Where and how a run started: command line, git, versions, host and device (see the module doc)."""
    import torch

    versions = {"auxframe": _version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
                "python": platform.python_version()}
    out: dict[str, Any] = {"command": command_line(), "cwd": os.getcwd()}
    here, package = git_state(Path.cwd()), git_state(Path(__file__).resolve().parent)
    if here is not None:
        out["git"] = here
    if package is not None and (here is None or package["root"] != here["root"]):
        out["auxframe_git"] = package
    out.update(versions=versions, host=socket.gethostname(), platform=platform.platform(),
               device=_device_record(device, world_size))
    return out


def provenance_of(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The provenance ``run.json`` recorded when the run started, flattened for W&B's run config:
    ``command``, ``git_commit``, ``git_dirty``, ``auxframe``/``torch``/``cuda`` versions, ``host``, ``device``."""
    info = read_run_json(run_dir)
    git = info.get("git") or info.get("auxframe_git") or {}
    device = info.get("device") or {}
    return {"group": info.get("group"), "command": " ".join(info.get("command", [])), "git_commit": git.get("commit"),
            "git_dirty": git.get("dirty"), **(info.get("versions") or {}), "host": info.get("host"),
            "device": f"{device.get('type', '?')}: {device.get('name', '?')} x{device.get('processes', 1)}"}


def command_line(argv: list[str] | None = None) -> list[str]:
    """The command as typed: ``auxframe ...``, ``python -m auxframe ...``, or the script and its arguments."""
    argv = list(sys.argv if argv is None else argv)
    if not argv:
        return []
    first = Path(argv[0])
    if first.name == "__main__.py" and first.parent.name == "auxframe":
        return ["python", "-m", "auxframe", *argv[1:]]
    if first.name == "auxframe":
        return ["auxframe", *argv[1:]]
    return argv


def git_state(folder: Path) -> dict[str, Any] | None:
    """``{"commit", "dirty", "root"}`` of the git repository holding ``folder``, or None (not in one,
    or no git). ``dirty``: tracked files differ from the commit (untracked files do not count)."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=10,
                                  env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"})
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if not commit:
        return None
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None,
            "root": git("rev-parse", "--show-toplevel")}


def _device_record(device: Any, world_size: int) -> dict[str, Any]:
    import torch

    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda" and torch.cuda.is_available():
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        name = torch.cuda.get_device_name(index)
    else:
        name = _cpu_model()
    return {"type": dev.type, "name": name, "processes": world_size, "threads": torch.get_num_threads()}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
