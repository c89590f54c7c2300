"""Policy-mask cost: divergence + CPPO mask + loss vs the model's forward + backward, one micro-batch.

A learner micro-step is (a) the model part: the policy's forward through the chunked logprob head
(log pi at the sampled token and mu's top-K ids) and its backward, and (b) the policy part: Top-K
TV divergence, the CPPO mask and the policy loss, forward and backward to those logprobs. The two
parts are checked to compose the real step first (the parameters' gradient through both equals the
end-to-end gradient), then timed interleaved in one process. Goal: the policy part under 1% of the
step, on the tiny model and on a ~100M-parameter random Qwen3 (Qwen3's 151,936-token vocabulary).

    python -m bench.policy_mask_cost [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from bench.common import print_table, write_result
from cppo_rl.algorithms import LossNormaliser, PolicyLossConfig, PolicyLossInputs, get_policy_loss
from cppo_rl.learner.logprobs import LogprobPolicy

SLOTS = 21  # the sampled token + top-20
MODELS = {
    # name: (Qwen3Config fields, responses per micro-batch, prompt tokens, response tokens)
    "tiny (3.2M)": (
        dict(
            vocab_size=128,
            hidden_size=256,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=4,
            head_dim=32,
            intermediate_size=768,
        ),
        16,
        32,
        224,
    ),
    "qwen3 ~100M": (
        dict(
            vocab_size=151_936,
            hidden_size=512,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=4,
            head_dim=64,
            intermediate_size=1536,
            tie_word_embeddings=True,
        ),
        8,
        64,
        448,
    ),
}


def build(fields: dict) -> LogprobPolicy:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(**fields, max_position_embeddings=1024, attn_implementation="sdpa")
    return LogprobPolicy(Qwen3ForCausalLM(config).float())


def micro_batch(vocab: int, responses: int, prompt: int, length: int) -> dict:
    """Model inputs for `responses` right-padded sequences and the policy part's inputs."""
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, vocab, (responses, prompt + length), generator=generator)
    lengths = torch.randint(length // 2, length + 1, (responses,), generator=generator)
    mask = torch.arange(length)[None, :] < lengths[:, None]
    attention = torch.cat([torch.ones(responses, prompt, dtype=torch.int64), mask.long()], dim=1)
    rows, columns = mask.nonzero(as_tuple=True)
    token_ids = torch.randint(0, vocab, (rows.numel(), SLOTS), generator=generator)
    token_ids[:, 0] = input_ids[rows, prompt + columns]
    return {
        "model": (input_ids, attention, rows, prompt - 1 + columns, token_ids, 1.0),
        "mask": mask,
        "advantages": torch.randn(responses, generator=generator),
        "noise": 0.05 * torch.randn(responses, length, SLOTS, generator=generator),
    }


def policy_loss(flat_logprobs: torch.Tensor, batch: dict, horizon: int) -> torch.Tensor:
    """The policy part: scatter [N, S] logprobs to [B, T, S], Top-K TV, CPPO mask, loss (a scalar)."""
    mask = batch["mask"]
    logprobs = flat_logprobs.new_full((*mask.shape, SLOTS), -float("inf")).masked_scatter(
        mask[..., None].expand(-1, -1, SLOTS), flat_logprobs
    )
    rollout = (logprobs.detach() + batch["noise"]).log_softmax(-1).masked_fill(~mask[..., None], -float("inf"))
    inputs = PolicyLossInputs(
        logprobs=logprobs[..., 0],
        rollout_logprobs=rollout[..., 0],
        advantages=batch["advantages"],
        response_mask=mask,
        topk_logprobs=logprobs,
        rollout_topk_logprobs=rollout,
    )
    normaliser = LossNormaliser(num_tokens=int(mask.sum()), num_sequences=mask.shape[0])
    return get_policy_loss("cppo")(inputs, PolicyLossConfig(horizon=horizon), normaliser).loss


def check_composition(model: LogprobPolicy, batch: dict, horizon: int) -> float:
    """Max relative difference between the end-to-end gradient and model-backward(policy-part grad)."""
    parameter = model.model.layers[0].mlp.down_proj.weight
    end_to_end = torch.autograd.grad(policy_loss(model(*batch["model"]), batch, horizon), parameter)[0]
    flat = model(*batch["model"])
    leaf = flat.detach().requires_grad_()
    upstream = torch.autograd.grad(policy_loss(leaf, batch, horizon), leaf)[0]
    two_stage = torch.autograd.grad(flat, parameter, upstream)[0]
    return float((end_to_end - two_stage).abs().max() / end_to_end.abs().max().clamp_min(1e-30))


def measure(model: LogprobPolicy, batch: dict, horizon: int, repeats: int) -> tuple[list[float], list[float]]:
    """Interleaved seconds of the model part and of the policy part."""
    model_seconds, policy_seconds = [], []
    upstream = None
    for _ in range(repeats + 1):  # the first round warms up
        start = time.perf_counter()
        flat = model(*batch["model"])
        flat.backward(upstream if upstream is not None else torch.ones_like(flat))
        model_seconds.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)

        leaf = flat.detach().requires_grad_()
        start = time.perf_counter()
        policy_loss(leaf, batch, horizon).backward()
        policy_seconds.append(time.perf_counter() - start)
        upstream = leaf.grad.masked_fill(~torch.isfinite(leaf.grad), 0.0)
    return model_seconds[1:], policy_seconds[1:]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the tiny model only, 3 repeats (under a minute)")
    args = parser.parse_args(argv)
    names, repeats = (["tiny (3.2M)"], 3) if args.quick else (list(MODELS), 5)
    rows, figures, ratios = [], {}, []
    for name in names:
        fields, responses, prompt, length = MODELS[name]
        model = build(fields)
        batch = micro_batch(fields["vocab_size"], responses, prompt, length)
        difference = check_composition(model, batch, length)
        if difference > 1e-4:
            sys.exit(f"{name}: the two parts do not compose the step (relative difference {difference:.1e})")
        model_seconds, policy_seconds = measure(model, batch, length, repeats)
        model_median, policy_median = statistics.median(model_seconds), statistics.median(policy_seconds)
        ratio = policy_median / (model_median + policy_median)
        ratios.append(ratio)
        parameters = sum(p.numel() for p in model.parameters())
        tokens = int(batch["mask"].sum())
        rows.append([name, f"{parameters / 1e6:.1f}M", f"{responses} x {length}", model_median, policy_median, ratio])
        figures[name] = {
            "parameters": parameters,
            "responses": responses,
            "prompt_tokens": prompt,
            "response_tokens": length,
            "valid_tokens": tokens,
            "model_seconds": model_seconds,
            "policy_seconds": policy_seconds,
            "policy_share_of_step": ratio,
            "composition_relative_difference": difference,
        }
    print_table(
        "policy part (Top-K TV + CPPO mask + loss, fwd+bwd) vs model part (forward + backward), one micro-batch",
        ["model", "params", "micro-batch", "model s", "policy s", "policy share of step"],
        rows,
    )
    worst = max(ratios)
    path = write_result(
        "policy_mask_cost" + ("_quick" if args.quick else ""),
        ratio=worst,
        goal="policy part < 1% of the micro-step (model + policy)",
        met=worst < 0.01,
        models=figures,
        threads=torch.get_num_threads(),
    )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
