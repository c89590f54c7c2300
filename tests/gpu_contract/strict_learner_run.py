"""One learner rank (a real LearnerWorker: DeepSpeed ZeRO-3 over gloo, in this process) trained on a
synthetic rollout batch under `strict_device`, for each case given; run by test_learner_devices.py.

    python strict_learner_run.py MODEL_DIR RANK WORLD PORT LOSS:ANCHOR [LOSS:ANCHOR ...]

Prints `ok LOSS ANCHOR <metric names>` per case; exits non-zero (with the traceback) on the first error.
"""

from __future__ import annotations

import os
import sys

import torch
from strict_device import DEVICE, HOST, mark_host, strict_device, tag_of

N_RESPONSES, WIDTH, SLOTS = 8, 6, 3


def synthetic_batch(vocab: int):
    from cppo_rl.batch import RolloutBatch

    generator = torch.Generator().manual_seed(0)
    lengths = torch.tensor([6, 3, 5, 1, 6, 2, 4, 6])
    mask = torch.arange(WIDTH)[None, :] < lengths[:, None]
    topk_ids = torch.randint(1, vocab, (N_RESPONSES, WIDTH, SLOTS), generator=generator)
    topk_ids[:, :, -1] = -1  # an unused slot
    logits = torch.randn(N_RESPONSES, WIDTH, SLOTS, generator=generator)
    topk_logprobs = torch.log_softmax(logits, -1) - 0.5
    topk_logprobs[:, :, -1] = -float("inf")
    topk_logprobs = topk_logprobs.masked_fill(~mask[..., None], -float("inf"))
    rollout_logprobs = torch.where(mask, topk_logprobs[..., 0], torch.zeros(()))
    return RolloutBatch(
        prompt_ids=[[1 + (i % 5), 2, 3][: 1 + i % 3] for i in range(N_RESPONSES)],
        response_ids=torch.where(mask, topk_ids[..., 0], torch.zeros((), dtype=torch.int64)),
        response_mask=mask,
        rollout_logprobs=rollout_logprobs,
        topk_ids=topk_ids,
        topk_logprobs=topk_logprobs,
        group_index=torch.arange(N_RESPONSES) // 4,
        finish_reason=["stop"] * N_RESPONSES,
        policy_version=0,
        advantages=torch.randn(N_RESPONSES, generator=generator),
    )


def main() -> None:
    from cppo_rl.algorithms import default_config
    from cppo_rl.learner.worker import LearnerConfig, LearnerWorker

    model_dir, rank, world, port, *cases = sys.argv[1:]
    rank, world, port = int(rank), int(world), int(port)
    torch.set_num_threads(1)
    for case in cases:
        loss, anchor = case.split(":")
        config = LearnerConfig(
            model_path=model_dir,
            responses_per_step=N_RESPONSES,
            updates_per_rollout=2,
            micro_batch_size=2,
            anchor=anchor,
            grad_clip=1.0,
        )
        worker = LearnerWorker(config, loss, default_config(loss), rank, world)
        worker.setup("127.0.0.1", port)  # a second setup in this process reuses the process group
        batch = synthetic_batch(worker.engine.module.config.vocab_size)
        mark_host(batch)
        with strict_device(worker.engine) as mode:
            metrics = worker.train_on_batch(batch)
            logprobs = worker.logprobs(batch)  # returned to callers on the host
        assert all(isinstance(v, float) for v in metrics.values()), metrics
        assert logprobs.shape == batch.topk_ids.shape, logprobs.shape
        assert tag_of(logprobs) == HOST, "LearnerWorker.logprobs must return host tensors"
        reduces = [where for name, where in mode.collectives if name == "all_reduce"]
        if world > 1:  # the metrics' all-reduce really ran, on the device
            assert reduces and set(reduces) == {DEVICE}, mode.collectives
        if worker.engine.module.is_moe:
            assert "moe_aux_loss" in metrics and "moe_expert_load_max" in metrics, sorted(metrics)
        print("ok", loss, anchor, " ".join(sorted(metrics)), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main()
