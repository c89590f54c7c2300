"""`model.path` as a local directory: a model directory as given, a hub name (org/name) as its snapshot in the HF cache.

The driver resolves a hub name once (`resolve_model_path`) and hands the snapshot directory to every role (the
vLLM engines, the DeepSpeed learner ranks, the tokenizer), so none of them looks the name up again: they load the
same commit whatever the hub's `main` does meanwhile, and the roles' own environment (HF_HUB_OFFLINE, HF_HOME)
no longer matters. The cache is read first (`snapshot_download(local_files_only=True)`, which also refuses a
snapshot it knows to be incomplete); a model absent from it is downloaded when the hub is online and refused with
the fix when HF_HUB_OFFLINE=1. On a multi-node cluster the snapshot directory must exist at the same path on every
node (a shared HF cache, or the same download on each node): docs/training.md.
"""

from __future__ import annotations

import os
from pathlib import Path

_TRUE = {"1", "ON", "YES", "TRUE"}  # huggingface_hub.constants.ENV_VARS_TRUE_VALUES


class ModelNotFound(ValueError):
    """`model.path` names no model this machine can load; the message names the key and the fix."""


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as huggingface_hub reads it, from the environment now."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.upper() in _TRUE


def is_hub_name(path: str) -> bool:
    """org/name that is not an existing or explicitly local path."""
    return not (Path(path).expanduser().exists() or path.startswith(("/", "./", "../", "~")) or path.count("/") != 1)


def hub_cache_dir() -> str:
    """Where huggingface_hub keeps downloaded repositories (HF_HUB_CACHE, else $HF_HOME/hub)."""
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def resolve_model_path(path: str, *, download: bool = True) -> Path | None:
    """The local directory of `model.path`: a directory as given (`~` expanded); a hub name's snapshot directory
    in the local HF cache, downloaded first when it is absent and the hub is online (`download=False`: None
    instead, for a check that must not fetch gigabytes). Raises ModelNotFound naming model.path and the fix."""
    if not is_hub_name(path):
        local = Path(path).expanduser()
        if not local.is_dir():
            what = "is not a directory" if local.exists() else "does not exist"
            raise ModelNotFound(
                f"model.path={path!r} {what}; give an HF model directory (save_pretrained) or a hub name org/name"
            )
        return local
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import IncompleteSnapshotError, LocalEntryNotFoundError

    incomplete = ""
    try:
        return Path(snapshot_download(path, local_files_only=True))
    except IncompleteSnapshotError:
        incomplete = " (its snapshot there is incomplete)"
    except LocalEntryNotFoundError:
        pass
    except ValueError as error:  # an invalid repo id (huggingface_hub's HFValidationError)
        raise ModelNotFound(f"model.path={path!r} is not a valid hub name org/name ({error})") from None
    if hub_offline():
        raise ModelNotFound(
            f"model.path={path!r} is not in the local HF cache ({hub_cache_dir()}){incomplete} and "
            f"HF_HUB_OFFLINE=1 forbids downloading it; download it first (hf download {path}, with the same "
            "HF_HOME), or unset HF_HUB_OFFLINE to let the run download it, or point model.path at a model directory"
        )
    if not download:
        return None
    try:
        return Path(snapshot_download(path))
    except Exception as error:  # network, auth, or no such repo: all say the same to the user
        raise ModelNotFound(
            f"model.path={path!r}: cannot download it from the hub ({type(error).__name__}: {error}); check the "
            "name, your access (HF_TOKEN) and the network, or point model.path at a model directory"
        ) from None
