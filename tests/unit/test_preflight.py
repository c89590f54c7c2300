"""Every class of bad input is refused before anything starts: the message names the user's key (or the
file and line) and the fix, the exit status is 2, no traceback is printed, no run directory is left, and
neither Ray nor an engine nor the learner was started."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cppo_rl import train

HEAVY = ("vllm", "deepspeed")  # and Ray is not started (importing its module starts nothing)


def _ray_started() -> bool:
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


def refuse(monkeypatch, capsys, tmp_path: Path, *overrides: str) -> str:
    """Run the CLI in-process with `overrides`; assert it refused before anything started; return stderr."""
    heavy_before = {name for name in HEAVY if name in sys.modules}
    ray_before = _ray_started()  # the session's integration tests may have a cluster up already
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as `make` sets it: no hub here
    monkeypatch.setattr(sys, "argv", ["cppo_rl.train", *overrides, f"trainer.output_dir={tmp_path / 'runs'}"])
    with pytest.raises(SystemExit) as exit_info:
        train.main()
    assert exit_info.value.code == 2
    assert not (tmp_path / "runs").exists(), "a refused run left a run directory"
    assert {name for name in HEAVY if name in sys.modules} == heavy_before, "a refusal imported vLLM/DeepSpeed"
    assert _ray_started() == ray_before, "a refusal started Ray"
    err = capsys.readouterr().err
    assert "refused, nothing was started" in err and "Traceback" not in err
    return err


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["experiment=smok"], "experiment=smok: no such experiment preset; did you mean smoke?"),
        (["baseline=dpo"], "baseline=dpo: no such baseline preset; did you mean dppo?"),
        (["algorithm=cppo,dpo", "--multirun"], "algorithm=dpo: no such algorithm preset"),
        (["+algorithm.dleta=0.1"], "+algorithm.dleta: section 'algorithm' has no key 'dleta'; did you mean delta?"),
        (["+trainer.total_step=3"], "did you mean total_steps?"),
        (["+optim.lr=1"], "+optim.lr: there is no config section 'optim'"),
        (["trainer.total_stpes=3"], "trainer.total_stpes: section 'trainer' has no key 'total_stpes'"),
        (["trainer.total_steps=many"], "trainer.total_steps: Value 'many' of type 'str' could not be converted"),
        (["learner.lr=0"], "learner.lr=0.0 must be > 0"),
        (["learner.lr_schedule=linear"], "learner.lr_schedule='linear': use one of"),
        (["rollout.temperature=0"], "rollout.temperature must be > 0"),
        (["rollout.eval_temperature=-1"], "rollout.eval_temperature must be > 0"),
        (["rollout.eval_samples=0"], "rollout.eval_samples must be an int >= 1"),
        (["rollout.eval_top_p=1.5"], "rollout.eval_top_p must lie in (0, 1]"),
        (["rollout.top_k_logprobs=-1"], "rollout.top_k_logprobs must be an int >= 0"),
        (["rollout.gpu_memory_utilization=1.5"], "rollout.gpu_memory_utilization=1.5 must lie in (0, 1]"),
        (["algorithm.delta=-1"], "algorithm.delta must be a finite number > 0"),
        (["algorithm.delta_b_ceiling=0.5"], "algorithm.delta_b_ceiling must lie in"),
        (["learner.dtype=float16"], "learner.dtype='float16': use one of"),
        (["learner.optimizer=adam"], "learner.optimizer='adam': use one of"),
        (["algorithm.advantage=ppo"], "algorithm.advantage='ppo': use one of"),
        (["algorithm.anchor=old"], "algorithm.anchor='old': use one of"),
        (["trainer.samples_per_prompt=1"], "group-relative advantages need at least 2 samples"),
        (["learner.micro_batch_size=5"], "not a multiple of learner.micro_batch_size=5"),
        (["reward.timeout_s=0"], "reward.timeout_s=0.0 must be > 0"),
        (["logging.mode=cloud"], "logging.mode='cloud': use one of"),
        (["data.task.max_operand=-3"], "data.task.max_operand"),
        (["model.path=/no/such/model"], "model.path='/no/such/model' does not exist"),
        (["model=hf", "model.path=no-org/no-model"], "model.path='no-org/no-model' is not in the local HF cache"),
        (["rollout.max_model_len=4096"], "rollout.max_model_len=4096 exceeds the model's context of 1024 tokens"),
        (["data.train_files=[/no/such/train.jsonl]"], "/no/such/train.jsonl"),
        (["trainer.resume=/no/such/run"], "trainer.resume='/no/such/run' is neither never, auto nor an existing"),
    ],
)
def test_bad_input_is_refused_before_anything_starts(monkeypatch, capsys, tmp_path, overrides, expected):
    assert expected in refuse(monkeypatch, capsys, tmp_path, *overrides)


def test_every_problem_is_listed_at_once(monkeypatch, capsys, tmp_path):
    err = refuse(monkeypatch, capsys, tmp_path, "learner.lr=0", "rollout.eval_samples=0", "model.path=/nowhere")
    assert "learner.lr" in err and "rollout.eval_samples" in err and "model.path='/nowhere'" in err


def test_a_bad_data_row_names_its_file_and_line_and_too_few_rows_are_refused(monkeypatch, capsys, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "1+1?", "answer": "2"}\n{"prompt": "2+2?"}\n')
    err = refuse(monkeypatch, capsys, tmp_path, f"data.train_files=[{data}]")
    assert f"{data}:2" in err and "answer" in err
    data.write_text('{"prompt": "1+1?", "answer": "2"}\n')
    err = refuse(monkeypatch, capsys, tmp_path, f"data.train_files=[{data}]")
    assert "data.train_files hold 1 rows; one step needs trainer.prompts_per_step=8" in err


def test_data_keys_that_a_user_file_lacks_are_refused_naming_the_key(monkeypatch, capsys, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(f'{{"question": "{i}+1?", "gold": "{i + 1}"}}\n' for i in range(8)))
    files = [f"data.train_files=[{data}]", f"data.eval_files=[{data}]"]
    err = refuse(monkeypatch, capsys, tmp_path, *files, "data.prompt_key=question", "data.answer_key=answer")
    assert f"{data}:1: `answer` is missing or empty" in err and "data.answer_key" in err
    err = refuse(monkeypatch, capsys, tmp_path, *files, "data.prompt_key=problem", "data.answer_key=gold")
    assert f"{data}:1: `problem` is missing or empty" in err and "data.prompt_key" in err


def test_a_preset_setting_an_unknown_key_is_named_with_its_file():
    from hydra.errors import ConfigCompositionException

    from cppo_rl.preflight import _composition_message

    error = ConfigCompositionException(
        "In 'experiment/mine': ConfigKeyError raised while composing config:\nKey 'nonsense' not in 'TrainerConfig'"
        "\n    full_key: trainer.nonsense\n    reference_type=TrainerConfig\n    object_type=TrainerConfig"
    )
    message = _composition_message(error)
    assert message == "trainer.nonsense: Key 'nonsense' not in 'TrainerConfig' ('experiment/mine')"


def _checkpoint(root: Path, world_size: int = 1) -> Path:
    """A checkpoint laid out as the learner writes one (the files' contents are not read by the checks)."""
    step = root / "checkpoints" / "step_000004"
    (step / "hf").mkdir(parents=True)
    (step / "hf" / "model.safetensors").write_bytes(b"weights")
    (step / "hf" / "config.json").write_text("{}")
    shards = step / "deepspeed" / "state"
    shards.mkdir(parents=True)
    for rank in range(world_size):
        (shards / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt").write_bytes(b"PK")
        (shards / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"PK")
    config = {"learner": {"world_size": world_size, "zero_stage": 3}}
    (step / "complete.json").write_text(json.dumps({"step": 4, "trainer": {"config": config}}))
    return step


def test_a_damaged_resume_checkpoint_is_refused_naming_the_file(monkeypatch, capsys, tmp_path):
    from cppo_rl.learner.checkpoint import verify

    step = _checkpoint(tmp_path / "old")
    assert verify(step) == []
    (step / "complete.json").write_text('{"step": 4, "trai')
    err = refuse(monkeypatch, capsys, tmp_path, f"trainer.resume={tmp_path / 'old'}")
    assert f"{step / 'complete.json'} is damaged" in err and "resume from an earlier checkpoint" in err

    step = _checkpoint(tmp_path / "other", world_size=2)
    (step / "deepspeed" / "state" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    (step / "hf" / "model.safetensors").write_bytes(b"")
    err = refuse(monkeypatch, capsys, tmp_path, f"trainer.resume={step}")
    assert "model.safetensors is missing or empty" in err
    assert "holds 1 optimizer shards, but 2 learner ranks wrote it" in err
    assert "resume with learner.world_size=2" in err


def test_help_lists_groups_presets_and_flags(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["cppo_rl.train", "--help"])
    train.main()
    out = capsys.readouterr().out
    assert "algorithm  " in out and "cppo*" in out and "smoke" in out and "qwen3_8b_base" in out
    assert "--plan-only" in out and "_paper_common" not in out


def test_the_command_line_refuses_with_status_2_and_no_traceback(tmp_path):
    """The real entry point, as a user runs it (one case: the in-process tests cover the classes)."""
    command = [sys.executable, "-m", "cppo_rl.train", "experiment=qwen3", f"trainer.output_dir={tmp_path}"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env={**os.environ})
    assert result.returncode == 2, result.stderr
    assert "experiment=qwen3: no such experiment preset" in result.stderr and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_hub_name_is_resolved_from_the_local_cache_and_its_context_checked(monkeypatch, tmp_path):
    """A hub name found in the HF cache (laid out as huggingface_hub writes it) passes; its config.json's
    context bounds rollout.max_model_len."""
    import huggingface_hub.constants

    from cppo_rl.preflight import compose, model_problems

    snapshot = tmp_path / "models--org--model" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (tmp_path / "models--org--model" / "refs").mkdir()
    (tmp_path / "models--org--model" / "refs" / "main").write_text("abc123")
    (snapshot / "config.json").write_text(
        json.dumps({"architectures": ["Qwen3ForCausalLM"], "max_position_embeddings": 512})
    )
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config, _ = compose(["model=hf", "model.path=org/model"])
    assert model_problems(config) == []
    config, _ = compose(["model=hf", "model.path=org/model", "rollout.max_model_len=1024"])
    (problem,) = model_problems(config)
    assert "rollout.max_model_len=1024 exceeds the model's context of 512 tokens" in problem


def test_a_sound_config_passes_every_check(tmp_path):
    from cppo_rl.preflight import compose, preflight

    config, run_dir = compose(["experiment=smoke", f"trainer.output_dir={tmp_path}"])
    preflight(config, run_dir)
    assert run_dir.parent == tmp_path and not run_dir.exists()  # checking creates nothing
