"""Controller pieces without actors: history rewind on resume, resume lookup, signals, the summary screen."""

from __future__ import annotations

import json
import os
import signal

import pytest

from cppo_rl.config import ConfigError
from cppo_rl.controller.progress import StopRequests, summary_screen
from cppo_rl.controller.tracker import rewind_history
from cppo_rl.controller.trainer import (
    CHECKPOINTS,
    NonFiniteError,
    SkippedUpdates,
    drop_long_prompts,
    find_resume_checkpoint,
)
from cppo_rl.data.dataset import Example
from cppo_rl.learner.checkpoint import finalize, staging_dir


def _write(path, steps):
    path.write_text("".join(json.dumps({"step": s, "x": s * 1.5}) + "\n" for s in steps))


def test_rewind_drops_steps_after_the_checkpoint(tmp_path):
    history = tmp_path / "metrics.jsonl"
    _write(history, [0, 1, 2, 3])
    assert rewind_history(history, 2) == 3
    assert [json.loads(line)["step"] for line in history.read_text().splitlines()] == [0, 1, 2]


def test_rewind_copies_another_runs_history(tmp_path):
    source, target = tmp_path / "old.jsonl", tmp_path / "new.jsonl"
    _write(source, [0, 1, 2, 3, 4])
    assert rewind_history(target, 3, source) == 4
    assert source.read_text().count("\n") == 5  # the source is left alone
    assert rewind_history(tmp_path / "fresh.jsonl", 3) == 0  # nothing to keep: an empty history


def test_rewind_drops_a_last_line_cut_short_by_a_crash(tmp_path, capsys):
    history = tmp_path / "metrics.jsonl"
    _write(history, [0, 1, 2])
    with history.open("a") as handle:
        handle.write('{"step": 3, "x": 4.')  # the run died mid-write: no newline
    assert rewind_history(history, 5) == 3
    assert history.read_text() == "".join(json.dumps({"step": s, "x": s * 1.5}) + "\n" for s in (0, 1, 2))
    assert f"{history}:4: skipped a truncated last line" in capsys.readouterr().out
    # a bad line anywhere else is refused, by file and line, and the history is left alone
    history.write_text('{"step": 0}\n{"step": 1, "x"\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not JSON"):
        rewind_history(history, 5)
    assert history.read_text().count("\n") == 3


def _checkpoint(root, step):
    staging_dir(root, step).mkdir(parents=True)
    return finalize(root, step, {"trainer": {"step": step}})


def test_a_fresh_start_drops_the_history_of_an_attempt_that_died_before_its_first_checkpoint(tmp_path, capsys):
    from types import SimpleNamespace

    from cppo_rl.config import TrainConfig
    from cppo_rl.controller.startup import Startup
    from cppo_rl.controller.trainer import Trainer

    history = tmp_path / "metrics.jsonl"
    _write(history, [0, 1, 2, 3])  # the dead attempt: steps logged, no checkpoint
    trainer = Trainer(TrainConfig(), tmp_path)
    assert trainer.resume_from is None
    trainer.startup = Startup(60.0)

    def evaluate_and_log(tokenizer, examples, tracker, step, metrics):
        _write(history, [step]) if not history.exists() else pytest.fail("the old history was kept")
        return 0.5

    trainer._evaluate_and_log = evaluate_and_log
    state = trainer._begin(None, [], SimpleNamespace(history_path=history), None, pipeline=None)
    assert state.evals == [[0, 0.5]]
    assert [json.loads(line)["step"] for line in history.read_text().splitlines()] == [0]
    assert "starting over" in capsys.readouterr().out


def test_resume_lookup(tmp_path):
    run = tmp_path / "run"
    assert find_resume_checkpoint("never", run) is None
    assert find_resume_checkpoint("auto", run) is None  # nothing written yet: start fresh
    staging_dir(run / CHECKPOINTS, 5).mkdir(parents=True)  # a half-written checkpoint from a crash
    first = _checkpoint(run / CHECKPOINTS, 2)
    assert find_resume_checkpoint("auto", run) == first
    assert not staging_dir(run / CHECKPOINTS, 5).exists()  # cleaned before resuming
    second = _checkpoint(run / CHECKPOINTS, 4)
    assert find_resume_checkpoint(str(run), tmp_path / "elsewhere") == second  # a run directory
    assert find_resume_checkpoint(str(first), tmp_path / "elsewhere") == first  # one checkpoint
    with pytest.raises(ConfigError, match="neither never, auto nor an existing checkpoint"):
        find_resume_checkpoint(str(tmp_path / "missing"), run)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no complete checkpoint there"):
        find_resume_checkpoint(str(tmp_path / "empty"), run)


def test_the_first_signal_requests_a_stop_and_the_second_aborts():
    # whatever handled the signals before (Ray's driver installs a SIGTERM handler) handles the second one
    before = {signum: signal.getsignal(signum) for signum in StopRequests.SIGNALS}
    with StopRequests() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested == "SIGTERM"
        assert signal.getsignal(signal.SIGTERM) is before[signal.SIGTERM]
        assert signal.getsignal(signal.SIGINT) is not before[signal.SIGINT]  # still caught
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested == "SIGINT"
        assert signal.getsignal(signal.SIGINT) is before[signal.SIGINT]
    assert {signum: signal.getsignal(signum) for signum in StopRequests.SIGNALS} == before


def test_summary_screen_says_where_things_are_and_how_to_resume():
    summary = {
        "algorithm": "cppo",
        "steps": 3,
        "wall_seconds": 61.0,
        "eval_accuracy_start": 0.25,
        "eval_accuracy_end": 0.5,
        "eval_accuracy_best": 0.5,
        "mean_step_seconds": {"generate": 1.0, "learner": 2.0},
        "checkpoint": "/r/checkpoints/step_000003",
        "wandb_dir": None,
        "interrupted_by": "SIGINT",
    }
    screen = summary_screen(summary, "/r", "python -m cppo_rl.train trainer.resume=auto")
    assert "stopped early by SIGINT" in screen and "start 0.250  ->  end 0.500" in screen
    assert "generate 1.00s  learner 2.00s" in screen and "W&B                disabled" in screen
    assert screen.splitlines()[-1].endswith("python -m cppo_rl.train trainer.resume=auto")


def test_skipped_updates_stop_the_run_only_after_whole_steps_in_a_row(capsys):
    skipped = SkippedUpdates(updates_per_step=2, max_steps=2)
    skipped.check(1, {"actor/skipped_updates": 2.0})
    skipped.check(2, {"actor/skipped_updates": 1.0})  # one update applied: the streak restarts
    skipped.check(3, {"actor/skipped_updates": 2.0})
    assert "step 2: 1 of 2 updates skipped" in capsys.readouterr().out
    with pytest.raises(NonFiniteError, match=r"step 4: .* last 2 steps .* since step 2.*trainer.max_skipped_steps"):
        skipped.check(4, {"actor/skipped_updates": 2.0})
    assert skipped.total == 7


def test_skipped_updates_never_stop_when_turned_off():
    skipped = SkippedUpdates(updates_per_step=1, max_steps=0)
    for step in range(1, 20):
        skipped.check(step, {"actor/skipped_updates": 1.0})
    skipped.check(20, {})
    assert skipped.total == 19 and skipped.streak == 0


def test_prompts_longer_than_the_context_are_skipped_and_counted(capsys):
    examples = [Example(f"p{i}", "1", f"train.jsonl:{i + 1}") for i in range(4)]
    kept = drop_long_prompts(examples, [10, 30, 20, 31], limit=20, split="train")
    assert [e.prompt for e in kept] == ["p0", "p2"]
    out = capsys.readouterr().out
    assert (
        "2 of 4 train prompts are longer than 20 tokens" in out
        and "they are skipped" in out
        and "the first is train.jsonl:2" in out
    )
    with pytest.raises(
        ConfigError, match=r"1 of 1 eval prompts .* first is train.jsonl:1.*raise rollout.max_model_len"
    ):
        drop_long_prompts(examples[:1], [21], limit=20, split="eval")
