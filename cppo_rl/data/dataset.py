"""Prompt datasets in the formats users bring, validated row by row, and a stateful, resumable prompt loader.

An entry of `data.train_files` / `data.eval_files` is a file (.jsonl read line by line; .json, .parquet,
.arrow through Hugging Face `datasets`), a `save_to_disk` directory, or a Hugging Face dataset name
(`name`, `name:split`, `name:config:split`; from the local cache when HF_HUB_OFFLINE=1). Each row gives a
prompt (`data.prompt_key`: a string, or a list of chat messages as in verl) and a gold answer
(`data.answer_key`, a dotted path into structs allowed; verl's `reward_model.ground_truth` is found by
itself). A bad row raises `DatasetError` naming the file, the line (jsonl, 1-based) or row (0-based), the key
and the fix. `encode_prompts` renders the prompts with the tokenizer's chat template.
"""

from __future__ import annotations

import json
import random
from collections.abc import Collection, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cppo_rl.config import DataConfig

Message = dict[str, str]
"""A chat message: {"role": "user", "content": "..."} (other keys of the source are kept)."""

HF_BUILDERS = {".json": "json", ".parquet": "parquet", ".arrow": "arrow"}
SUFFIXES = (".jsonl", *HF_BUILDERS)
DEFAULT_ANSWER_KEY = "answer"
VERL_ANSWER_KEY = "reward_model.ground_truth"
SAVED_DATASET_MARKERS = ("state.json", "dataset_dict.json")  # written by Dataset(Dict).save_to_disk


class DatasetError(ValueError):
    """A dataset that cannot be used as configured; the message names the file, the row or line and the fix."""


@dataclass(frozen=True)
class Example:
    prompt: str | list[Message]  # problem text, or chat messages used as given
    answer: str
    source: str  # "<file>:<line>" (jsonl, 1-based) or "<file> row <n>" (0-based)


def files_key(split: str) -> str:
    """The config key listing the files of `split`, for error messages."""
    return "data.train_files" if split == "train" else "data.eval_files"


def load_examples(
    names: list[str], data: DataConfig, generated: dict[str, Path] | None = None, split: str = "train"
) -> list[Example]:
    """Every example of `names` (data.train_files with split "train", data.eval_files with "test"), each file
    opened and validated. "generated" reads `generated[split]` with the keys it was written with (`prompt`,
    `answer`); with `generated` None those entries are skipped (a preflight checks the user's files only).
    No tokenizer, model or Ray needed."""
    examples = []
    for name in names:
        if name != "generated":
            examples += load_data(name, data, split)
        elif generated is not None:  # the project's own schema, whatever keys the user's files need
            examples += load_data(generated[split], replace(data, prompt_key="prompt", answer_key="answer"), split)
    return examples


def load_data(name: str | Path, data: DataConfig, split: str = "train") -> list[Example]:
    """The examples of one entry of the file lists (a file, a saved directory or a dataset name)."""
    name = str(name)
    examples = [to_example(row, where, data) for where, row in read_rows(name, data, split)]
    if not examples:
        raise DatasetError(f"{files_key(split)}: dataset {name!r} has no rows")
    return examples


def read_rows(name: str, data: DataConfig, split: str) -> Iterator[tuple[str, dict]]:
    """(where, row) pairs of one entry, `where` naming the file and line or row."""
    path = Path(name)
    if path.is_file() and path.suffix == ".jsonl":
        return jsonl_rows(path)
    if path.is_file() and path.suffix in HF_BUILDERS:
        return dataset_rows(load_file(path), name, data)
    if path.is_file():
        raise DatasetError(f"dataset {name!r}: unknown extension {path.suffix!r}; use one of {', '.join(SUFFIXES)}")
    if path.suffix in SUFFIXES and not path.exists():
        raise DatasetError(f"dataset {name!r} does not exist; check {files_key(split)}")
    return dataset_rows(load_named(name, split), name, data)


def jsonl_rows(path: Path) -> Iterator[tuple[str, dict]]:
    """One JSON object per line; a line that is not one raises DatasetError naming `file:line` (1-based)."""
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            where = f"{path}:{number}"
            try:
                row = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as error:
                raise DatasetError(f"{where}: not valid UTF-8 ({error.reason}); re-encode the file as UTF-8") from None
            except json.JSONDecodeError as error:
                raise DatasetError(f"{where}: not a JSON object ({error.msg}); one JSON object per line") from None
            if not isinstance(row, dict):
                raise DatasetError(f"{where}: expected an object with a prompt and an answer, got {type(row).__name__}")
            yield where, row


def load_file(path: Path):
    """A .json / .parquet / .arrow file as a `datasets.Dataset` (cached under HF_HOME)."""
    import datasets

    try:
        return datasets.load_dataset(HF_BUILDERS[path.suffix], data_files=str(path), split="train")
    except (datasets.exceptions.DatasetGenerationError, OSError, ValueError) as error:
        raise DatasetError(f"dataset {str(path)!r}: not readable as {path.suffix} ({error})") from error


def load_named(name: str, split: str):
    """A `save_to_disk` directory or a Hugging Face dataset (`name`, `name:split`, `name:config:split`; `split`
    when none is given) as a `datasets.Dataset`."""
    import datasets

    path, config, chosen = parse_dataset_name(name, split)
    try:
        if any((Path(path) / marker).is_file() for marker in SAVED_DATASET_MARKERS):
            saved = datasets.load_from_disk(path)
            return saved[chosen] if isinstance(saved, datasets.DatasetDict) else saved
        return datasets.load_dataset(path, config, split=chosen)
    except (datasets.exceptions.DatasetGenerationError, OSError, ValueError, KeyError) as error:
        raise DatasetError(
            f"{files_key(split)}: {name!r} is not a file ({', '.join(SUFFIXES)}) and not loadable as a Hugging Face "
            f"dataset (split {chosen!r}): {error}. Check the path; a hub dataset must be in the local cache when "
            "HF_HUB_OFFLINE=1 (load it once online)"
        ) from error


def parse_dataset_name(name: str, split: str) -> tuple[str, str | None, str]:
    """`name`, `name:split` or `name:config:split` -> (name, config or None, split)."""
    parts = name.split(":")
    if len(parts) > 3:
        raise DatasetError(f"{files_key(split)}: {name!r}: expected `name`, `name:split` or `name:config:split`")
    return parts[0], parts[1] if len(parts) == 3 else None, parts[-1] if len(parts) > 1 else split


def dataset_rows(dataset, source: str, data: DataConfig) -> Iterator[tuple[str, dict]]:
    """The rows of a `datasets.Dataset` as dicts, `where` = "<source> row <n>" (0-based); a missing column
    raises DatasetError listing the columns there are."""
    columns = dataset.column_names
    for key, setting in ((data.prompt_key, "data.prompt_key"), (answer_key(columns, data), "data.answer_key")):
        if key.split(".")[0] not in columns:
            raise DatasetError(
                f"dataset {source!r}: no column `{key}` (columns: {', '.join(columns)}); set {setting} to the "
                "column to use (a dotted path reaches into a struct, e.g. reward_model.ground_truth)"
            )
    return ((f"{source} row {index}", row) for index, row in enumerate(dataset))


def answer_key(columns: Collection[str], data: DataConfig) -> str:
    """`data.answer_key`, or verl's `reward_model.ground_truth` when the key is the default `answer`, which
    `columns` lacks, and `columns` has `reward_model`."""
    verl = data.answer_key == DEFAULT_ANSWER_KEY and DEFAULT_ANSWER_KEY not in columns and "reward_model" in columns
    return VERL_ANSWER_KEY if verl else data.answer_key


def lookup(row: dict, key: str) -> Any:
    """row[key], following a dotted key into nested dicts (`reward_model.ground_truth`); None when absent."""
    value: Any = row
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def to_example(row: dict, where: str, data: DataConfig) -> Example:
    """The row's prompt and answer, validated; errors name `where`, the key and the setting to fix."""
    key = answer_key(row, data)
    prompt = prompt_value(lookup(row, data.prompt_key), where, data.prompt_key)
    return Example(prompt=prompt, answer=scalar_text(lookup(row, key), where, key, "data.answer_key"), source=where)


def prompt_value(value: Any, where: str, key: str) -> str | list[Message]:
    """A string prompt, or a non-empty list of chat messages with string `role` and `content`."""
    if not isinstance(value, list):
        return scalar_text(value, where, key, "data.prompt_key")
    if not value or not all(is_message(m) for m in value):
        raise DatasetError(
            f"{where}: `{key}` is a list but not of chat messages; expected a non-empty list of "
            "{role: ..., content: ...} objects with string role and content"
        )
    return [{k: v for k, v in m.items() if v is not None} for m in value]  # arrow fills absent keys with None


def is_message(value: Any) -> bool:
    return isinstance(value, dict) and isinstance(value.get("role"), str) and isinstance(value.get("content"), str)


def scalar_text(value: Any, where: str, key: str, setting: str) -> str:
    """A non-empty string or number as text."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise DatasetError(
            f"{where}: `{key}` is missing or empty; every row needs a non-empty `{key}` (or set {setting} to the "
            "column that holds it)"
        )
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        raise DatasetError(f"{where}: `{key}` must be a string or a number, got {type(value).__name__} {value!r:.80}")
    return str(value)


def prompt_text(example: Example) -> str:
    """The prompt for display: the string, or the last chat message's content."""
    return example.prompt if isinstance(example.prompt, str) else example.prompt[-1]["content"]


def chat(example: Example, template: str) -> list[Message]:
    """The example's chat: a string prompt becomes one user turn, `template` with "{prompt}" replaced (a plain
    replace: the template may hold other braces, e.g. \\boxed{}); chat messages are used as given."""
    if isinstance(example.prompt, str):
        return [{"role": "user", "content": template.replace("{prompt}", example.prompt)}]
    return example.prompt


def encode_prompts(tokenizer, examples: list[Example], data: DataConfig) -> list[list[int]]:
    """Token ids of each example's chat (`chat` with `data.prompt_template`) through the tokenizer's chat template,
    ending in the opened assistant turn; `data.chat_template_kwargs` are the template's extra variables."""
    return [
        tokenizer.apply_chat_template(
            chat(example, data.prompt_template), add_generation_prompt=True, **data.chat_template_kwargs
        )["input_ids"]
        for example in examples
    ]


class PromptLoader:
    """Endless batches of examples: shuffled each epoch (seeded), resumable from `state_dict()`."""

    def __init__(self, examples: list[Example], batch_size: int, *, shuffle: bool = True, seed: int = 0) -> None:
        if batch_size > len(examples):
            raise ValueError(
                f"PromptLoader: a batch of {batch_size} prompts needs at least that many examples, got {len(examples)}"
            )
        self.examples, self.batch_size, self.shuffle, self.seed = examples, batch_size, shuffle, seed
        self.epoch, self.cursor = 0, 0
        self._order = self._epoch_order()

    def _epoch_order(self) -> list[int]:
        order = list(range(len(self.examples)))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return order

    def next_batch(self) -> list[Example]:
        if self.cursor + self.batch_size > len(self._order):
            self.epoch, self.cursor = self.epoch + 1, 0
            self._order = self._epoch_order()
        batch = [self.examples[i] for i in self._order[self.cursor : self.cursor + self.batch_size]]
        self.cursor += self.batch_size
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self._order = self._epoch_order()
