"""Everything that needs no running actor, checked before anything starts.

`compose(overrides)` builds a run's `TrainConfig` from conf/ as `python -m cppo_rl.train` does, refusing
group options that do not exist (optional groups included), keys the schema does not know (typed,
added with `+`, or set by a preset) and values of the wrong type. `preflight(config, run_dir)` then runs
`validate` and the checks that read files: the data (opened and validated, `file:line`, enough rows
for a step), the model (a local path that exists, a hub name found, its context against
`rollout.max_model_len`) and the resume checkpoint (its marker and shards present and readable).
Both raise ConfigError; every message names the user's key or the file and the fix.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path

from cppo_rl.config import ConfigError, TrainConfig, config_keys, config_problems, name_user_keys

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
SCHEMA_KEYS = config_keys(TrainConfig)
DICT_KEYS = tuple(key for key, kind in SCHEMA_KEYS.items() if getattr(kind, "__origin__", None) is dict)


def groups() -> dict[str, list[str]]:
    """The config groups of conf/ and their options (files starting with "_" are internal, not options)."""
    return {
        folder.name: sorted(p.stem for p in folder.glob("*.yaml") if not p.stem.startswith("_"))
        for folder in sorted(CONF_DIR.iterdir())
        if folder.is_dir()
    }


def _suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f"; did you mean {close[0]}?" if close else ""


def _schema_problem(key: str, added: bool) -> str | None:
    """Why a dotted key is not one of the schema's (a key inside a dict-valued key may be added)."""
    if key in SCHEMA_KEYS or key.startswith(tuple(k + "." for k in DICT_KEYS)):
        return None
    section, _, name = key.rpartition(".")
    siblings = [k.rpartition(".")[2] for k in SCHEMA_KEYS if k.rpartition(".")[0] == section]
    where = f"section {section!r}" if section else "the top level"
    if not siblings and section:
        return f"{'+' if added else ''}{key}: there is no config section {section!r}{_suggest(section, list(groups()))}"
    fix = " (a + adds a key only inside a dict-valued key: " + ", ".join(DICT_KEYS) + ")" if added else ""
    return f"{'+' if added else ''}{key}: {where} has no key {name!r}{_suggest(name, siblings)}{fix}"


def check_overrides(overrides: list[str]) -> None:
    """Refuse command-line overrides naming a group option or a key that does not exist."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as error:
        raise ConfigError(f"cannot parse the overrides: {error}") from None
    options, problems = groups(), []
    for override in parsed:
        key = override.key_or_group
        if key == "hydra" or key.startswith("hydra.") or override.is_delete():
            continue
        if key in options:
            values = list(override.sweep_string_iterator()) if override.is_sweep_override() else [override.value()]
            for value in values:
                if value is not None and str(value) not in options[key]:
                    problems.append(
                        f"{key}={value}: no such {key} preset{_suggest(str(value), options[key])} "
                        f"(choose one of {', '.join(options[key])})"
                    )
        else:
            problem = _schema_problem(key, override.is_add())
            if problem:
                problems.append(problem)
    if problems:
        raise ConfigError("invalid overrides:\n  - " + "\n  - ".join(problems))


def compose(overrides: list[str]) -> tuple[TrainConfig, Path]:
    """The run's config, as the Hydra app composes it, and its run directory (hydra.run.dir)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf, open_dict
    from omegaconf.errors import OmegaConfBaseException

    import cppo_rl.train  # noqa: F401  (registers the schema)

    check_overrides(overrides)
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            composed = hydra_compose(config_name="config", overrides=overrides, return_hydra_config=True)
        run_dir = Path(composed.hydra.run.dir)
        with open_dict(composed):
            del composed["hydra"]
        return OmegaConf.to_object(composed), run_dir
    except (HydraException, OmegaConfBaseException, ValueError) as error:
        raise ConfigError(_composition_message(error)) from None


def _composition_message(error: Exception) -> str:
    """Hydra / OmegaConf's error without its internals: what is wrong, the key, where (a preset file)."""
    cause = error.__cause__ or error
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()] or [type(cause).__name__]
    where = lines[0].split(":")[0] if lines[0].endswith("raised while composing config:") else ""  # In 'experiment/x'
    details = [line for line in lines if not line.endswith("composing config:")]
    first = next((line for line in details if not line.startswith(("full_key:", "reference_type", "object_type"))), "")
    key = getattr(cause, "full_key", None) or next(
        (line.removeprefix("full_key: ") for line in details if line.startswith("full_key: ")), None
    )
    if first.startswith("ArithmeticTaskConfig: "):  # the one section that checks itself as it is built
        return name_user_keys(first, "ArithmeticTaskConfig", "data.task")
    message = f"{key}: {first}" if key and key not in first else first
    if "Error merging override" in str(error) or "could not be converted" in first:
        message += " (check the value's type)"
    return f"{message} ({where.removeprefix('In ')})" if where else message


# ------------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------------


def preflight(config: TrainConfig, run_dir: Path) -> None:
    """Every check before anything starts; raises ConfigError listing every problem found."""
    problems = config_problems(config) + model_problems(config) + data_problems(config)
    problems += resume_problems(config, run_dir)
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(dict.fromkeys(problems)))


def model_config_file(path: str) -> tuple[Path | None, str | None]:
    """The model's config.json (its local directory, or the snapshot of a hub name in the local HF cache, as
    `cppo_rl.data.hub.resolve_model_path` finds it for the run), or why it cannot be found. A hub name absent
    from the cache while the hub is online: its config.json alone is fetched (the run downloads the rest)."""
    from cppo_rl.data.hub import ModelNotFound, resolve_model_path

    try:
        local = resolve_model_path(path, download=False)
    except ModelNotFound as error:
        return None, str(error)
    if local is not None:
        return local / "config.json", None
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(path, "config.json")), None
    except Exception as error:  # network, auth, or no such repo: all say the same to the user
        return (
            None,
            f"model.path={path!r}: cannot fetch its config.json from the hub ({type(error).__name__}); check the name",
        )


def model_problems(config: TrainConfig) -> list[str]:
    """A model directory that holds a causal LM, or a hub name found; its context against the lengths."""
    if config.model.path == "tiny":
        from cppo_rl.data.tiny_model import TinyModelConfig

        context, where = TinyModelConfig().max_position_embeddings, "the tiny model"
    elif not config.model.path:
        return []  # validate names it
    else:
        config_file, problem = model_config_file(config.model.path)
        if problem:
            return [problem]
        if not config_file.is_file():
            return [f"model.path={config.model.path!r} has no config.json: not a HF model directory (save_pretrained)"]
        try:
            settings = json.loads(config_file.read_text())
            architectures = settings.get("architectures") or []
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as error:
            return [f"model.path={config.model.path!r}: {config_file} is not a JSON object ({error})"]
        if not any(name.endswith("ForCausalLM") for name in architectures):
            return [
                f"model.path={config.model.path!r}: config.json's architectures {architectures} hold no *ForCausalLM: "
                "not a causal language model"
            ]
        context, where = settings.get("max_position_embeddings"), str(config_file)
    r = config.rollout
    if isinstance(context, int) and r.max_model_len > context:
        return [
            f"rollout.max_model_len={r.max_model_len} exceeds the model's context of {context} tokens "
            f"(max_position_embeddings of {where}); lower rollout.max_model_len (and rollout.max_response_length)"
        ]
    return []


def data_problems(config: TrainConfig) -> list[str]:
    """Every data file opened and validated; enough training rows for one step, at least one to evaluate."""
    from cppo_rl.data.dataset import load_examples

    d, t = config.data, config.trainer
    rows, problems = {}, []
    for split, key in (("train", "data.train_files"), ("test", "data.eval_files")):
        files = getattr(d, key.split(".")[1])
        if not files:
            problems.append(f"{key} is empty; give at least one file (or 'generated')")
            continue
        generated = d.task.train_size if split == "train" else d.task.test_size
        real = [name for name in files if name != "generated"]
        try:
            rows[split] = len(load_examples(real, d, None, split)) + generated * (len(real) < len(files))
        except (ValueError, OSError) as error:
            problems.append(str(error))
    if rows.get("train", t.prompts_per_step) < t.prompts_per_step:
        problems.append(
            f"data.train_files hold {rows['train']} rows; one step needs trainer.prompts_per_step={t.prompts_per_step}"
        )
    if rows.get("test") == 0:
        problems.append("data.eval_files hold no rows; give held-out prompts to evaluate on")
    return problems


def resume_problems(config: TrainConfig, run_dir: Path) -> list[str]:
    """The checkpoint `trainer.resume` names: found, complete, readable, and made by as many ranks."""
    from cppo_rl.controller.trainer import find_resume_checkpoint
    from cppo_rl.learner.checkpoint import verify

    try:
        checkpoint = find_resume_checkpoint(config.trainer.resume, run_dir, clean=False)
    except ConfigError as error:
        return [str(error)]
    if checkpoint is None:
        return []
    return [f"trainer.resume={config.trainer.resume!r}: {problem}" for problem in verify(checkpoint, config)]
