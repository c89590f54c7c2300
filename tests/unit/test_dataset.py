"""Dataset rows in every supported format and schema: bad input is reported with file, line or row and the key
to fix; prompts are encoded through the chat template; the loader is deterministic and resumable."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cppo_rl.config import DataConfig
from cppo_rl.data.dataset import DatasetError, Example, PromptLoader, encode_prompts, load_data, load_examples
from cppo_rl.data.tokenizer import CHAT_TEMPLATE, build_tokenizer

DATA = DataConfig()


@pytest.fixture(autouse=True)
def offline_datasets_cache(tmp_path, monkeypatch) -> Path:
    """The `datasets` cache in tmp_path, and no hub access (as under the Makefile's HF_HUB_OFFLINE=1)."""
    cache = tmp_path / "hf_datasets"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    return cache


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def _write_json(path: Path, rows: list[dict]) -> None:
    path.write_text(json.dumps(rows))  # a JSON array of objects


def _write_parquet(path: Path, rows: list[dict]) -> None:
    pq.write_table(pa.Table.from_pylist(rows), path)


def _write_arrow(path: Path, rows: list[dict]) -> None:
    table = pa.Table.from_pylist(rows)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)


WRITERS = {".jsonl": _write_jsonl, ".json": _write_json, ".parquet": _write_parquet, ".arrow": _write_arrow}
HF_SUFFIXES = [".json", ".parquet", ".arrow"]


def _write(path: Path, rows: list[dict]) -> Path:
    WRITERS[path.suffix](path, rows)
    return path


def _sources(path: Path, count: int) -> list[str]:
    """jsonl names 1-based lines, the other formats 0-based rows."""
    return [f"{path}:{i + 1}" if path.suffix == ".jsonl" else f"{path} row {i}" for i in range(count)]


def verl_row(index: int, question: str, answer: str, split: str = "train") -> dict:
    """A row in verl's RL parquet schema."""
    return {
        "data_source": "arithmetic",
        "prompt": [{"role": "user", "content": question}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": answer},
        "extra_info": {"split": split, "index": index},
    }


# -- formats and schemas ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", list(WRITERS))
def test_every_format_reads_string_prompts(tmp_path, suffix):
    rows = [{"prompt": f"Compute {i}+1.", "answer": str(i + 1), "data_source": "arithmetic"} for i in range(3)]
    path = _write(tmp_path / f"data{suffix}", rows)
    expected = [Example(r["prompt"], r["answer"], s) for r, s in zip(rows, _sources(path, 3), strict=True)]
    assert load_data(path, DATA) == expected


@pytest.mark.parametrize("suffix", list(WRITERS))
def test_verl_schema_is_detected(tmp_path, suffix):
    rows = [verl_row(i, f"Compute {i}+2.", str(i + 2)) for i in range(3)]
    path = _write(tmp_path / f"train{suffix}", rows)
    examples = load_data(path, DATA)
    assert [e.prompt for e in examples] == [[{"role": "user", "content": f"Compute {i}+2."}] for i in range(3)]
    assert [e.answer for e in examples] == ["2", "3", "4"]
    assert [e.source for e in examples] == _sources(path, 3)


def test_chat_messages_keep_every_turn(tmp_path):
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Compute 2+2."}]
    path = _write(tmp_path / "chat.parquet", [{"prompt": chat, "answer": "4"}])
    assert load_data(path, DATA)[0].prompt == chat


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_prompt_and_answer_keys_map_columns(tmp_path, suffix):
    rows = [{"question": "Compute 1+1.", "label": 2, "meta": {"gold": "two"}}]
    path = _write(tmp_path / f"data{suffix}", rows)
    keys = dataclasses.replace(DATA, prompt_key="question", answer_key="label")
    assert load_data(path, keys)[0] == Example("Compute 1+1.", "2", _sources(path, 1)[0])
    dotted = dataclasses.replace(DATA, prompt_key="question", answer_key="meta.gold")
    assert load_data(path, dotted)[0].answer == "two"


def test_an_explicit_answer_key_wins_over_the_default_column(tmp_path):
    row = {**verl_row(0, "Compute 3+3.", "6"), "answer": "not this"}
    path = _write(tmp_path / "both.parquet", [row])
    assert load_data(path, DATA)[0].answer == "not this"
    assert load_data(path, dataclasses.replace(DATA, answer_key="reward_model.ground_truth"))[0].answer == "6"


def test_save_to_disk_directory_with_splits(tmp_path):
    splits = {s: datasets.Dataset.from_list([verl_row(0, f"Compute {s}.", s, s)]) for s in ("train", "test")}
    datasets.DatasetDict(splits).save_to_disk(tmp_path / "saved")
    assert load_data(tmp_path / "saved", DATA, "test")[0].answer == "test"
    assert load_data(f"{tmp_path / 'saved'}:train", DATA, "test")[0].answer == "train"


def _cache_hub_dataset(cache: Path, repo_id: str, splits: dict[str, list[dict]], work: Path) -> None:
    """Lay `splits` out in the datasets cache as a download of hub dataset `repo_id` leaves them
    (`<namespace>___<name>/default/0.0.0/<commit>/<name>-<split>.arrow`), for offline loading."""
    from datasets.data_files import DataFilesDict
    from datasets.packaged_modules.parquet.parquet import Parquet

    namespace, name = repo_id.split("/")
    files = {split: [str(_write(work / f"{split}.parquet", rows))] for split, rows in splits.items()}
    commit = "0" * 40
    builder = Parquet(
        cache_dir=str(work / "build"), dataset_name=name, hash=commit, data_files=DataFilesDict.from_patterns(files)
    )
    builder.download_and_prepare()
    target = cache / f"{namespace}___{name}" / "default" / "0.0.0" / commit
    target.parent.mkdir(parents=True)
    shutil.move(builder.cache_dir, target)


def test_hub_names_load_from_the_local_cache(tmp_path, offline_datasets_cache):
    splits = {
        s: [verl_row(i, f"Compute {i}+{i}.", str(2 * i), s) for i in range(n)] for s, n in (("train", 3), ("test", 2))
    }
    _cache_hub_dataset(offline_datasets_cache, "toy/arith", splits, tmp_path)
    test = load_examples(["toy/arith"], DATA, split="test")
    assert [e.answer for e in test] == ["0", "2"] and test[1].source == "toy/arith row 1"
    assert len(load_data("toy/arith:train", DATA, "test")) == 3
    assert len(load_data("toy/arith:default:train", DATA)) == 3
    with pytest.raises(DatasetError, match=r"data.train_files: 'toy/arith:validation' .* Unknown split"):
        load_data("toy/arith:validation", DATA)


def test_a_hub_name_not_in_the_cache_says_how_to_get_it():
    with pytest.raises(DatasetError, match=r"data.train_files: 'openai/gsm8k' is not a file .*HF_HUB_OFFLINE=1"):
        load_data("openai/gsm8k", DATA)


def test_load_examples_reads_generated_and_user_files(tmp_path):
    generated = {s: _write(tmp_path / f"gen_{s}.jsonl", [{"prompt": s, "answer": "1"}]) for s in ("train", "test")}
    user = str(_write(tmp_path / "user.parquet", [verl_row(0, "Compute 1+1.", "2")]))
    examples = load_examples(["generated", user], DATA, generated, "test")
    assert [(e.prompt, e.answer) for e in examples] == [
        ("test", "1"),
        ([{"role": "user", "content": "Compute 1+1."}], "2"),
    ]
    assert [e.answer for e in load_examples(["generated", user], DATA, None, "test")] == ["2"]  # a preflight's check


def test_generated_entries_keep_their_own_keys_when_the_user_files_use_others(tmp_path):
    from dataclasses import replace

    generated = {s: _write(tmp_path / f"gen_{s}.jsonl", [{"prompt": s, "answer": "1"}]) for s in ("train", "test")}
    user = _write(tmp_path / "user.jsonl", [{"question": "q", "gold": "2"}])
    data = replace(DATA, prompt_key="question", answer_key="gold")
    examples = load_examples(["generated", user], data, generated, "train")
    assert [(e.prompt, e.answer) for e in examples] == [("train", "1"), ("q", "2")]


def test_hydra_overrides_reach_the_new_keys():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import cppo_rl.train  # registers the schema

    overrides = ["data.answer_key=reward_model.ground_truth", "+data.chat_template_kwargs.enable_thinking=false"]
    with initialize_config_dir(config_dir=str(Path(cppo_rl.train.CONF_DIR)), version_base=None):
        data = OmegaConf.to_object(compose(config_name="config", overrides=overrides)).data
    assert (data.answer_key, data.chat_template_kwargs) == ("reward_model.ground_truth", {"enable_thinking": False})


# -- bad input --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "match"),
    [
        (json.dumps({"answer": "3"}), r"data.jsonl:2: `prompt` is missing or empty"),
        (json.dumps({"prompt": "Compute 1+2.", "answer": ""}), r"data.jsonl:2: `answer` is missing or empty"),
        (json.dumps({"prompt": "   ", "answer": "1"}), r"data.jsonl:2: `prompt` is missing or empty"),
        (json.dumps({"prompt": "Compute 1+2.", "answer": [3]}), r"data.jsonl:2: `answer` must be a string or a number"),
        (
            json.dumps({"prompt": "Compute 1+2.", "answer": True}),
            r"data.jsonl:2: `answer` must be a string or a number",
        ),
        (
            json.dumps({"prompt": [{"role": "user"}], "answer": "3"}),
            r"data.jsonl:2: `prompt` is a list but not of chat",
        ),
        (json.dumps({"prompt": [], "answer": "3"}), r"data.jsonl:2: `prompt` is a list but not of chat"),
        (json.dumps(verl_row(1, "Compute 1+2.", "")), r"data.jsonl:2: `reward_model.ground_truth` is missing or empty"),
        ("{not json", r"data.jsonl:2: not a JSON object"),
        (b"\xff\xfe\n", r"data.jsonl:2: not valid UTF-8"),
        (json.dumps([1, 2]), r"data.jsonl:2: expected an object"),
    ],
)
def test_bad_jsonl_lines_name_the_file_and_line(tmp_path, line, match):
    first = json.dumps({"prompt": "Compute 1+1.", "answer": "2"}) + "\n"
    path = tmp_path / "data.jsonl"
    path.write_bytes(first.encode() + (line if isinstance(line, bytes) else (line + "\n").encode()))
    with pytest.raises(DatasetError, match=match):
        load_data(path, DATA)


GOOD = {"prompt": "Compute 1+1.", "answer": "2"}


@pytest.mark.parametrize("suffix", HF_SUFFIXES)
@pytest.mark.parametrize(
    ("rows", "match"),
    [
        (
            [{"question": "Compute 1+1.", "answer": "2"}],
            r"no column `prompt` \(columns: question, answer\); set data.prompt_key",
        ),
        (
            [{"prompt": "Compute 1+1.", "label": "2"}],
            r"no column `answer` \(columns: prompt, label\); set data.answer_key",
        ),
        ([GOOD, {"prompt": "Compute 1+2.", "answer": " "}], r"row 1: `answer` is missing or empty"),
        ([GOOD, {"prompt": None, "answer": "3"}], r"row 1: `prompt` is missing or empty; .*set data.prompt_key"),
        ([{"prompt": "Compute 1+1.", "answer": ["2"]}], r"row 0: `answer` must be a string or a number, got list"),
        ([{"prompt": ["Compute", "1+1."], "answer": "2"}], r"row 0: `prompt` is a list but not of chat messages"),
        (
            [verl_row(0, "Compute 1+1.", "2"), verl_row(1, "Compute 1+2.", None)],
            r"row 1: `reward_model.ground_truth` is missing",
        ),
    ],
)
def test_bad_rows_name_the_file_row_and_key(tmp_path, suffix, rows, match):
    path = _write(tmp_path / f"data{suffix}", rows)
    with pytest.raises(DatasetError, match=match) as error:
        load_data(path, DATA)
    assert str(path) in str(error.value)


def test_a_non_default_answer_key_turns_off_verl_detection(tmp_path):
    path = _write(tmp_path / "verl.parquet", [verl_row(0, "Compute 1+1.", "2")])
    with pytest.raises(DatasetError, match=r"no column `label`"):
        load_data(path, dataclasses.replace(DATA, answer_key="label"))


def test_wrong_path_extension_or_content(tmp_path):
    with pytest.raises(DatasetError, match=r"'.*nope.parquet' does not exist; check data.train_files"):
        load_examples([str(tmp_path / "nope.parquet")], DATA)
    with pytest.raises(DatasetError, match=r"does not exist; check data.eval_files"):
        load_examples([str(tmp_path / "nope.jsonl")], DATA, split="test")
    (tmp_path / "data.csv").write_text("prompt,answer\nx,1\n")
    with pytest.raises(DatasetError, match=r"unknown extension '.csv'; use one of .jsonl, .json, .parquet, .arrow"):
        load_data(tmp_path / "data.csv", DATA)
    (tmp_path / "garbage.parquet").write_bytes(b"not parquet")
    with pytest.raises(DatasetError, match=r"garbage.parquet': not readable as .parquet"):
        load_data(tmp_path / "garbage.parquet", DATA)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DatasetError, match=r"data.train_files: dataset '.*empty.jsonl' has no rows"):
        load_data(tmp_path / "empty.jsonl", DATA)


# -- the real datasets ------------------------------------------------------------------------------------------

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"  # ../shared/data beside the repo
needs_shared_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"the shared datasets are not at {SHARED_DATA}")


@needs_shared_data
@pytest.mark.parametrize(
    ("name", "rows"),
    [
        ("aime24/test", 30),
        ("aime25/test", 30),
        ("aime26/test", 30),
        ("math500/test", 500),
        ("gsm8k/test", 1319),
        ("gsm8k/train", 7473),
    ],
)
def test_real_datasets_load(name, rows):
    examples = load_data(SHARED_DATA / f"{name}.jsonl", DATA)
    assert len(examples) == rows and all(isinstance(e.prompt, str) and e.prompt and e.answer for e in examples)


@needs_shared_data
def test_real_verl_parquet_matches_its_jsonl_conversion():
    """DAPO-Math-17k's verl parquet: prompt = prompt[0].content, answer = reward_model.ground_truth (its README)."""
    parquet = load_data(SHARED_DATA / "dapo_math_17k" / "original" / "dapo_math_17k.parquet", DATA)
    converted = load_data(SHARED_DATA / "dapo_math_17k" / "train.jsonl", DATA)
    assert len(parquet) == len(converted) == 17917
    assert [(e.prompt[0]["content"], e.answer) for e in parquet] == [(e.prompt, e.answer) for e in converted]


# -- encoding ---------------------------------------------------------------------------------------------------

QWEN3_THINKING = CHAT_TEMPLATE.replace(
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}",
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}",
)
"""The tiny template plus Qwen3's `enable_thinking=False` switch (an empty think block)."""


def _decoded(tokenizer, examples, data) -> list[str]:
    return [tokenizer.decode(ids) for ids in encode_prompts(tokenizer, examples, data)]


def test_string_prompts_fill_the_template_and_chats_are_used_as_given():
    tokenizer = build_tokenizer()
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Compute 2+2."}]
    examples = [Example("Compute 1+1.", "2", "f:1"), Example(chat, "4", "f row 0")]
    data = dataclasses.replace(DATA, prompt_template="{prompt} Put the answer in \\boxed{}.")
    assert _decoded(tokenizer, examples, data) == [
        "<|im_start|>user\nCompute 1+1. Put the answer in \\boxed{}.<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nCompute 2+2.<|im_end|>\n<|im_start|>assistant\n",
    ]


def test_chat_template_kwargs_reach_the_template():
    tokenizer = build_tokenizer()
    examples = [Example("Compute 1+1.", "2", "f:1")]
    no_thinking = dataclasses.replace(DATA, chat_template_kwargs={"enable_thinking": False})
    plain = encode_prompts(tokenizer, examples, DATA)
    assert encode_prompts(tokenizer, examples, no_thinking) == plain  # the tiny template ignores unknown variables
    tokenizer.chat_template = QWEN3_THINKING
    assert encode_prompts(tokenizer, examples, DATA) == plain
    assert _decoded(tokenizer, examples, no_thinking)[0].endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


# -- the loader -------------------------------------------------------------------------------------------------


def test_loader_is_deterministic_and_resumes(tmp_path):
    path = _write(tmp_path / "d.jsonl", [{"prompt": f"p{i}", "answer": str(i)} for i in range(10)])
    examples = load_data(path, DATA)
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
