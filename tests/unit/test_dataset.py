"""Dataset rows: bad input is reported with file and line; the loader is deterministic and resumable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cppo_rl.data.dataset import PromptLoader, load_jsonl


def _write(path, lines):
    path.write_bytes(b"".join(line if isinstance(line, bytes) else (line + "\n").encode() for line in lines))
    return path


@pytest.mark.parametrize(
    ("line", "match"),
    [
        (json.dumps({"answer": "3"}), r"data.jsonl:2: `prompt` is missing or empty"),
        (json.dumps({"prompt": "Compute 1+2.", "answer": ""}), r"data.jsonl:2: `answer` is missing or empty"),
        (json.dumps({"prompt": "   ", "answer": "1"}), r"data.jsonl:2: `prompt` is missing or empty"),
        ("{not json", r"data.jsonl:2: not a JSON object"),
        (b"\xff\xfe\n", r"data.jsonl:2: not valid UTF-8"),
        (json.dumps([1, 2]), r"data.jsonl:2: expected an object"),
    ],
)
def test_bad_rows_name_the_file_and_line(tmp_path, line, match):
    path = _write(tmp_path / "data.jsonl", [json.dumps({"prompt": "Compute 1+1.", "answer": "2"}), line])
    with pytest.raises(ValueError, match=match):
        load_jsonl(path)


def test_wrong_path_or_format(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match=r"expected a \.jsonl file"):
        load_jsonl(_write(tmp_path / "data.parquet", ["x"]))


SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"  # ../shared/data beside the repo


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"the shared datasets are not at {SHARED_DATA}")
@pytest.mark.parametrize(("name", "rows"), [("aime24", 30), ("aime25", 30), ("math500", 500)])
def test_real_datasets_load(name, rows):
    examples = load_jsonl(SHARED_DATA / name / "test.jsonl")
    assert len(examples) == rows and all(e.prompt and e.answer for e in examples)


def test_loader_is_deterministic_and_resumes(tmp_path):
    path = _write(tmp_path / "d.jsonl", [json.dumps({"prompt": f"p{i}", "answer": str(i)}) for i in range(10)])
    examples = load_jsonl(path)
    loader = PromptLoader(examples, 4, seed=1)
    first = [loader.next_batch() for _ in range(3)]  # crosses an epoch boundary
    assert len({e.prompt for e in first[0] + first[1]}) == 8
    state = loader.state_dict()
    following = loader.next_batch()
    resumed = PromptLoader(examples, 4, seed=1)
    resumed.load_state_dict(state)
    assert resumed.next_batch() == following
    again = PromptLoader(examples, 4, seed=1)
    assert [again.next_batch() for _ in range(3)] == first
    with pytest.raises(ValueError, match="at least that many examples"):
        PromptLoader(examples, 11)
