"""The checkpoint directory protocol: complete or invisible, never half."""

from __future__ import annotations

from cppo_rl.learner.checkpoint import MARKER, clean_staging, finalize, latest_checkpoint, staging_dir


def _stage(root, step):
    staged = staging_dir(root, step)
    staged.mkdir(parents=True)
    (staged / "weights.bin").write_bytes(b"x" * 10)
    return staged


def test_latest_follows_finalized_checkpoints_only(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    _stage(tmp_path, 1)
    assert latest_checkpoint(tmp_path) is None  # staged, not complete
    first = finalize(tmp_path, 1, {"note": "a"})
    assert latest_checkpoint(tmp_path) == first and (first / MARKER).is_file()
    _stage(tmp_path, 2)  # a crash while writing step 2
    assert latest_checkpoint(tmp_path) == first
    assert clean_staging(tmp_path) == [staging_dir(tmp_path, 2)]
    assert not staging_dir(tmp_path, 2).exists()
    _stage(tmp_path, 2)
    second = finalize(tmp_path, 2, {})
    assert latest_checkpoint(tmp_path) == second
    assert (tmp_path / "latest").read_text() == second.name


def test_a_pointer_to_an_incomplete_checkpoint_falls_back_to_the_newest_complete_one(tmp_path):
    _stage(tmp_path, 1)
    first = finalize(tmp_path, 1, {})
    broken = tmp_path / "step_000005"
    broken.mkdir()  # e.g. copied by hand without its marker
    (tmp_path / "latest").write_text(broken.name)
    assert latest_checkpoint(tmp_path) == first


def test_rewriting_a_step_replaces_it(tmp_path):
    _stage(tmp_path, 3)
    finalize(tmp_path, 3, {"run": 1})
    staged = _stage(tmp_path, 3)
    (staged / "new.bin").write_bytes(b"y")
    final = finalize(tmp_path, 3, {"run": 2})
    assert (final / "new.bin").is_file() and '"run": 2' in (final / MARKER).read_text()


def test_prune_keeps_the_newest_and_reads_metadata(tmp_path):
    from cppo_rl.learner.checkpoint import prune, read_marker

    for step in (2, 4, 6):
        _stage(tmp_path, step)
        finalize(tmp_path, step, {"trainer": {"step": step}})
    assert prune(tmp_path, keep=0) == []
    removed = prune(tmp_path, keep=2)
    assert [p.name for p in removed] == ["step_000002"]
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_000004", "step_000006"]
    assert read_marker(latest_checkpoint(tmp_path)) == {"step": 6, "trainer": {"step": 6}}
    # the checkpoint `latest` names survives even when it is not among the newest by name
    (tmp_path / "latest").write_text("step_000004")
    assert [p.name for p in prune(tmp_path, keep=1)] == []
    assert latest_checkpoint(tmp_path).name == "step_000004"
