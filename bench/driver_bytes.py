"""Bytes through the driver per training step, before and after the data plane (issue 17).

Before: each engine returned its whole RolloutBatch to the driver (token sets [n, T, K+1] as int64 ids
and float32 logprobs, sampled ids and logprobs, mask, prompts per response, texts), and the driver
`ray.put` the whole batch (with rewards and advantages) for the learner ranks. After: the driver
receives each chunk's light part (RolloutChunk: texts, finish reasons, lengths, group index) and sends
each learner rank a RolloutSource (the chunks' refs and per-row lengths, groups, finish reasons,
rewards, advantages); the token sets go engine -> object store -> the ranks holding their rows.

Measured by pickling the real objects (`cppo_rl.data_plane.split_batch` of engine-like chunks) at small
sizes on this machine, fitted linearly in (rows, rows x padded width, rows x prompt length, text bytes),
and extrapolated to the 30B setting (conf/experiment/qwen3_30b_a3b_base.yaml): responses per step,
engines, learner ranks and K from the config; the response length, prompt length and text bytes per
token are assumptions, stated in the result. A batch is padded to its longest response: with thousands
of responses and some truncated at the cap, the padded width is the cap whatever the mean length.

    python -m bench driver_bytes      (or python -m bench.driver_bytes)
"""

from __future__ import annotations

import itertools
import pickle

import numpy as np
import torch

from bench.common import print_table, write_result
from cppo_rl.batch import PAD_TOKEN_SLOT, RolloutBatch
from cppo_rl.data_plane import ChunkRef, RolloutRefs, join_chunk, split_batch

EXPERIMENT = "qwen3_30b_a3b_base"
PROMPT_TOKENS = 256  # assumption: a DAPO-Math prompt with the template, in tokens
TEXT_BYTES_PER_TOKEN = 4.0  # assumption: UTF-8 bytes of decoded text per token (English + LaTeX)
MEAN_LENGTH = 5000  # assumption: a plausible mean response length under a 16k cap
REF_BYTES = 256  # assumption: one serialized ObjectRef (id + owner address), generous


def _chunk(rows: int, width: int, prompt: int, fill: float, slots: int, seed: int) -> RolloutBatch:
    """An engine chunk as the engine builds it: 2 samples per prompt, lengths around `fill` x width (one at
    the width), random token sets with ids of a 152k vocabulary, texts of TEXT_BYTES_PER_TOKEN per token."""
    generator = torch.Generator().manual_seed(seed)
    lengths = (torch.rand(rows, generator=generator) * 2 * fill * width).clamp(1, width).long()
    lengths[0] = width
    mask = torch.arange(width).expand(rows, width) < lengths.unsqueeze(-1)
    ids = torch.randint(0, 151_936, (rows, width, slots), generator=generator)
    ids = torch.where(mask.unsqueeze(-1), ids, PAD_TOKEN_SLOT)
    logprobs = torch.where(mask.unsqueeze(-1), -torch.rand(rows, width, slots, generator=generator), -float("inf"))
    groups = torch.arange(rows // 2).repeat_interleave(2)
    prompts = torch.randint(0, 151_936, (rows // 2, prompt), generator=generator).tolist()
    return RolloutBatch(
        prompt_ids=[prompts[g] for g in groups.tolist()],
        response_ids=torch.where(mask, ids[..., 0], 0),
        response_mask=mask,
        rollout_logprobs=torch.where(mask, logprobs[..., 0], 0.0),
        topk_ids=ids,
        topk_logprobs=logprobs,
        group_index=groups,
        finish_reason=["length" if n == width else "stop" for n in lengths.tolist()],
        policy_version=3,
        response_texts=["x" * int(TEXT_BYTES_PER_TOKEN * n) for n in lengths.tolist()],
    )


def _measure(slots: int) -> tuple[list[list[float]], dict[str, list[float]]]:
    """Pickled bytes of each object the driver handles, on a grid of small chunks; features per point."""
    features, sizes = [], {"before_chunk": [], "before_batch": [], "after_chunk": [], "after_source": []}
    grid = itertools.product((16, 48), (32, 96, 192), (8, 40), (0.3, 0.9))
    for seed, (rows, width, prompt, fill) in enumerate(grid):
        chunk = _chunk(rows, width, prompt, fill, slots, seed)
        text = sum(len(t.encode()) for t in chunk.response_texts)
        features.append([1.0, rows, rows * width, rows * prompt, text])
        sizes["before_chunk"].append(len(pickle.dumps(chunk)))
        chunk.rewards = torch.rand(rows)
        chunk.advantages = torch.randn(rows)
        sizes["before_batch"].append(len(pickle.dumps(chunk)))  # what the driver `ray.put` (the whole batch)
        light, heavy = split_batch(chunk)
        if not torch.equal(join_chunk(light, heavy).topk_ids, chunk.topk_ids):  # both sides hold the same batch
            raise RuntimeError("driver_bytes: the light + heavy parts do not rebuild the batch")
        sizes["after_chunk"].append(len(pickle.dumps(light)))
        refs = RolloutRefs([ChunkRef(light, None)], rewards=chunk.rewards, advantages=chunk.advantages)
        source = refs.source()
        source.tensors = []  # refs counted as REF_BYTES each
        sizes["after_source"].append(len(pickle.dumps(source)))
    return features, sizes


def _fit(features: list[list[float]], sizes: list[float]) -> tuple[np.ndarray, float]:
    x, y = np.asarray(features), np.asarray(sizes, dtype=np.float64)
    coefficients, *_ = np.linalg.lstsq(x, y, rcond=None)
    worst = float(np.max(np.abs(x @ coefficients - y) / y))
    return coefficients, worst


def _setting() -> dict:
    from cppo_rl.preflight import compose

    config, _ = compose([f"experiment={EXPERIMENT}"])
    t, r = config.trainer, config.rollout
    return {
        "responses_per_step": t.prompts_per_step * t.samples_per_prompt,
        "prompts_per_step": t.prompts_per_step,
        "engines": r.num_engines,
        "learner_ranks": config.learner.world_size,
        "top_k_logprobs": r.top_k_logprobs,
        "max_response_length": r.max_response_length,
    }


def main(flags: list[str] | None = None) -> dict:
    setting = _setting()
    slots = setting["top_k_logprobs"] + 1
    features, sizes = _measure(slots)
    fits = {name: _fit(features, values) for name, values in sizes.items()}
    n, engines, ranks = setting["responses_per_step"], setting["engines"], setting["learner_ranks"]
    width = setting["max_response_length"]  # the padded width: the longest response of the batch (the cap)

    def predict(name: str, rows: int, mean_length: float) -> float:
        row = [1.0, rows, rows * width, rows * PROMPT_TOKENS, rows * mean_length * TEXT_BYTES_PER_TOKEN]
        return float(np.dot(fits[name][0], row))

    scenarios = {}
    for label, mean_length in (("all_at_cap_16k", float(width)), ("mean_5k", float(MEAN_LENGTH))):
        per_chunk = n // engines
        before_receive = engines * predict("before_chunk", per_chunk, mean_length)
        before_send = predict("before_batch", n, mean_length)
        after_receive = engines * predict("after_chunk", per_chunk, mean_length)
        after_send = ranks * (predict("after_source", n, mean_length) + engines * REF_BYTES)
        before, after = before_receive + before_send, after_receive + after_send
        scenarios[label] = {
            "mean_response_length": mean_length,
            "before_receive_bytes": round(before_receive),
            "before_send_bytes": round(before_send),
            "before_total_bytes": round(before),
            "after_receive_bytes": round(after_receive),
            "after_send_bytes": round(after_send),
            "after_total_bytes": round(after),
            "after_over_before": round(after / before, 6),
        }
    gib = 2**30
    print_table(
        f"bytes through the driver per step, {EXPERIMENT} ({n} responses, {engines} engines, {ranks} ranks, "
        f"K={setting['top_k_logprobs']}, padded width {width})",
        ["scenario", "before GiB", "after MiB", "after / before", "after: texts MiB"],
        [
            [
                label,
                s["before_total_bytes"] / gib,
                s["after_total_bytes"] / 2**20,
                s["after_over_before"],
                n * s["mean_response_length"] * TEXT_BYTES_PER_TOKEN / 2**20,
            ]
            for label, s in scenarios.items()
        ],
    )
    worst_fit = max(worst for _, worst in fits.values())
    print(f"linear fit of the pickled sizes: worst relative residual {worst_fit:.2e} over {len(features)} points")
    ratio = scenarios["mean_5k"]["before_total_bytes"] / scenarios["mean_5k"]["after_total_bytes"]
    path = write_result(
        "driver_bytes",
        ratio=round(ratio, 1),
        goal="after <= 1% of before (mean 5k tokens)",
        met=bool(1 / ratio <= 0.01),
        setting=setting,
        assumptions={
            "prompt_tokens": PROMPT_TOKENS,
            "text_bytes_per_token": TEXT_BYTES_PER_TOKEN,
            "mean_response_length": MEAN_LENGTH,
            "padded_width": width,
            "object_ref_bytes": REF_BYTES,
        },
        scenarios=scenarios,
        fit={
            "features": ["1", "rows", "rows x padded width", "rows x prompt tokens", "text bytes"],
            "coefficients": {name: [round(float(c), 4) for c in fit[0]] for name, fit in fits.items()},
            "worst_relative_residual": worst_fit,
            "points": len(features),
        },
    )
    print(f"wrote {path}")
    return scenarios


if __name__ == "__main__":
    main()
