"""Loading a backbone's weights from a local file the user names (auxframe never downloads weights).

The file is anything ``torch.save`` wrote holding a state dict: the state dict itself, or a
checkpoint dict with the state dict under ``'state_dict'`` or ``'model'`` (as many training scripts
save it). Keys written by ``nn.DataParallel`` (``'module.'`` prefix) are accepted. Keys of layers
the backbone does not have on purpose (a classifier such as ResNet's ``fc``) are dropped by prefix;
any other mismatch is an error that lists the keys, so a wrong file is never half-loaded.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn

from auxframe.errors import ConfigError

_WRAPPERS = ("state_dict", "model")
_SHOWN = 5


def load_weights(module: nn.Module, path: str | Path, what: str, skip_prefixes: Sequence[str] = ()) -> None:
    """Load a state dict from ``path`` into ``module`` (strictly, after dropping ``skip_prefixes``).

    Args:
        module: the network to load into (its own parameter names are the expected keys).
        path: a local file written by ``torch.save``.
        what: the gin name of the setting, e.g. ``'backbones.resnet18.weights_path'``, for messages.
        skip_prefixes: key prefixes of the file to ignore (layers the backbone drops on purpose).

    Raises:
        ConfigError: the file is missing or unreadable, holds no state dict, or its keys or
            shapes do not match ``module``.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"{what} = '{path}': no such file. Give the path of a local file holding a state dict "
            f"(saved with `torch.save(model.state_dict(), path)`), or unset it for random initialisation; "
            f"auxframe does not download weights."
        )
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"{what}: cannot read '{path}' as a torch file ({type(exc).__name__}: {exc}).") from exc
    state = _unwrap(loaded, path, what)
    state = {k: v for k, v in state.items() if not any(k.startswith(p) for p in skip_prefixes)}
    _check_match(module.state_dict(), state, path, what)
    module.load_state_dict(state, strict=True)


def _unwrap(loaded: object, path: Path, what: str) -> dict[str, torch.Tensor]:
    if isinstance(loaded, Mapping):
        for key in _WRAPPERS:
            if key in loaded and isinstance(loaded[key], Mapping):
                loaded = loaded[key]
                break
    if not isinstance(loaded, Mapping) or not loaded or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise ConfigError(
            f"{what}: '{path}' does not hold a state dict (a mapping of parameter names to tensors, "
            f"possibly under 'state_dict' or 'model'); it holds {type(loaded).__name__}. Save the "
            f"backbone with `torch.save(model.state_dict(), path)`."
        )
    if all(k.startswith("module.") for k in loaded):
        return {k[len("module."):]: v for k, v in loaded.items()}
    return dict(loaded)


def _check_match(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor], path: Path, what: str) -> None:
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [
        f"{k} {tuple(given[k].shape)} (backbone: {tuple(expected[k].shape)})"
        for k in expected if k in given and given[k].shape != expected[k].shape
    ]
    problems = [
        f"{label}: {', '.join(keys[:_SHOWN])}{' ...' if len(keys) > _SHOWN else ''} ({len(keys)} in all)"
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", shapes))
        if keys
    ]
    if problems:
        raise ConfigError(
            f"{what}: the weights in '{path}' do not fit this backbone: {'; '.join(problems)}. Use weights "
            f"saved from the same architecture with the same settings (e.g. input channels, small_images)."
        )
