"""Prompt datasets: jsonl rows with `prompt` and `answer`, validated with line numbers, and a
stateful, resumable prompt loader."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str
    source: str  # "<file>:<line>"


def load_jsonl(path: str | Path) -> list[Example]:
    """Read a jsonl dataset; a bad row raises ValueError naming the file, the line and the fix."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset {str(path)!r} does not exist; check data.train_files / data.eval_files")
    if path.suffix != ".jsonl":
        raise ValueError(f"dataset {str(path)!r}: expected a .jsonl file (one JSON object per line)")
    examples = []
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            where = f"{path}:{number}"
            try:
                row = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as error:
                raise ValueError(f"{where}: not valid UTF-8 ({error.reason}); re-encode the file as UTF-8") from None
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: not a JSON object ({error.msg}); one JSON object per line") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected an object with `prompt` and `answer`, got {type(row).__name__}")
            for key in ("prompt", "answer"):
                value = row.get(key)
                if not isinstance(value, str | int | float) or isinstance(value, bool) or str(value).strip() == "":
                    raise ValueError(f"{where}: `{key}` is missing or empty; every row needs a non-empty `{key}`")
            examples.append(Example(prompt=str(row["prompt"]), answer=str(row["answer"]), source=where))
    if not examples:
        raise ValueError(f"dataset {str(path)!r} has no rows")
    return examples


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
