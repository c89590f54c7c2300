"""The checkpoint directory protocol: a checkpoint is either complete or invisible.

Layout under a run's checkpoint root:
    step_000010/            a complete checkpoint (renamed into place only when fully written)
        deepspeed/          DeepSpeed shards: model, optimizer, scheduler, client state (each rank)
        hf/                 a consolidated HF model directory (vLLM and transformers load it)
        rollouts/           batches generated ahead of the learner (trainer.max_staleness > 0), one file each
        complete.json       written last, before the rename: step and metadata
    .staging-step_000010/   a checkpoint being written (ignored; removed by `clean_staging`)
    latest                  the name of the newest complete checkpoint (replaced atomically)

A crash at any point leaves either the previous `latest` or the new one, never a half checkpoint.
Multi-node runs need the root on a filesystem every learner rank can write.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

MARKER = "complete.json"
ROLLOUTS_DIR = "rollouts"
LATEST = "latest"


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


def staging_dir(root: str | Path, step: int) -> Path:
    """Where checkpoint `step` is written before it is complete."""
    return Path(root) / f".staging-{checkpoint_name(step)}"


def finalize(root: str | Path, step: int, metadata: dict) -> Path:
    """Mark the staged checkpoint complete, rename it into place and point `latest` at it."""
    root = Path(root)
    staged, final = staging_dir(root, step), root / checkpoint_name(step)
    (staged / MARKER).write_text(json.dumps({"step": step, **metadata}, indent=2))
    if final.exists():  # an earlier run wrote this step; the new one replaces it
        shutil.rmtree(final)
    os.rename(staged, final)
    pointer = root / f".{LATEST}.tmp"
    pointer.write_text(final.name)
    os.replace(pointer, root / LATEST)
    return final


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under `root`, or None. Falls back to scanning when the
    `latest` pointer is missing or names something incomplete."""
    root = Path(root)
    pointer = root / LATEST
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if (candidate / MARKER).is_file():
            return candidate
    complete = sorted(p for p in root.glob("step_*") if (p / MARKER).is_file()) if root.is_dir() else []
    return complete[-1] if complete else None


def read_marker(checkpoint: str | Path) -> dict:
    """The metadata a complete checkpoint was finalised with (its step included)."""
    return json.loads((Path(checkpoint) / MARKER).read_text())


def prune(root: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints (never the one `latest` names); returns
    what was deleted. `keep` <= 0 keeps everything."""
    root = Path(root)
    if keep <= 0 or not root.is_dir():
        return []
    complete = sorted(p for p in root.glob("step_*") if (p / MARKER).is_file())
    newest = latest_checkpoint(root)
    removed = [p for p in complete[:-keep] if p != newest]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def clean_staging(root: str | Path) -> list[Path]:
    """Remove half-written checkpoints left by a crash; returns what was removed."""
    removed = sorted(Path(root).glob(".staging-*")) if Path(root).is_dir() else []
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def verify(checkpoint: str | Path, config=None) -> list[str]:
    """Why a complete checkpoint cannot be resumed, read from its files alone (no shard is loaded): a
    marker that is not JSON, missing or empty DeepSpeed shards (one optimizer shard per learner rank
    with ZeRO >= 1) or HF weights, or `config` (a TrainConfig) asking for another number of ranks."""
    checkpoint = Path(checkpoint)
    try:
        marker = read_marker(checkpoint)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        return [f"{checkpoint / MARKER} is damaged ({error}); resume from an earlier checkpoint of that run"]
    saved = marker.get("trainer", {}).get("config", {}).get("learner", {})
    shards = checkpoint / "deepspeed" / "state"
    problems = [
        f"{path} is missing or empty"
        for path in (checkpoint / "hf" / "model.safetensors", checkpoint / "hf" / "config.json")
        if not (path.is_file() and path.stat().st_size > 0)
    ]
    model_states = sorted(shards.glob("*model_states.pt")) if shards.is_dir() else []
    optim_states = sorted(shards.glob("*optim_states.pt")) if shards.is_dir() else []
    unreadable = [p for p in model_states + optim_states if p.stat().st_size == 0 or not os.access(p, os.R_OK)]
    if not model_states:
        problems.append(f"{shards} holds no DeepSpeed model shard (*model_states.pt)")
    problems += [f"{path} is empty or unreadable" for path in unreadable]
    ranks = saved.get("world_size")
    if saved.get("zero_stage", 0) >= 1 and ranks and len(optim_states) != ranks:
        problems.append(f"{shards} holds {len(optim_states)} optimizer shards, but {ranks} learner ranks wrote it")
    if problems:
        problems[-1] += "; resume from an earlier checkpoint of that run (trainer.resume=<its step_* folder>)"
    if config is not None and ranks and config.learner.world_size != ranks:
        problems.append(
            f"it was written by {ranks} learner ranks (ZeRO shards are per rank); "
            f"resume with learner.world_size={ranks}"
        )
    return problems
