"""Sampling settings of a rollout, validated, and their vLLM form."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SamplingConfig:
    """How responses are sampled.

    n:            samples per prompt (they stay grouped)
    temperature:  > 0; the logprobs returned are of the distribution after temperature
    top_p, top_k: truncation (1.0 and 0 = none); refused for training rollouts, whose learner
                  does not reproduce the truncation (spec section 8.13)
    max_tokens:   response length limit (tokens)
    logprobs_k:   K, the number of mu's top tokens returned per position (20 in the paper)
    seed:         base seed; prompt i of a call is sampled with seed + i, so results do not depend
                  on how prompts are split across engines. None = unseeded.
    training:     True for training rollouts (truncation refused), False for evaluation
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 64
    logprobs_k: int = 20
    seed: int | None = None
    training: bool = True

    def __post_init__(self) -> None:
        caller = "SamplingConfig"
        for name in ("n", "max_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{caller}: `{name}` must be an int >= 1, got {value!r}")
        if not isinstance(self.logprobs_k, int) or self.logprobs_k < 0:
            raise ValueError(f"{caller}: `logprobs_k` must be an int >= 0, got {self.logprobs_k!r}")
        if not self.temperature > 0:
            raise ValueError(
                f"{caller}: `temperature` must be > 0, got {self.temperature!r} (greedy decoding has no "
                "sampling distribution to take logprobs of; use a small temperature instead)"
            )
        if not 0 < self.top_p <= 1:
            raise ValueError(f"{caller}: `top_p` must lie in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"{caller}: `top_k` must be an int >= 0 (0 = off), got {self.top_k!r}")
        if self.training and (self.top_p < 1 or self.top_k > 0):
            raise ValueError(
                f"{caller}: training rollouts must sample the untruncated distribution, got top_p={self.top_p}, "
                f"top_k={self.top_k}; the learner does not reproduce top-p/top-k truncation, so the logprobs "
                "would not match. Set top_p=1.0 and top_k=0 (truncation is allowed for evaluation: training=False)"
            )

    def to_vllm(self, prompt_index: int = 0):
        """The `vllm.SamplingParams` for prompt number `prompt_index` of a call (seeded per prompt)."""
        from vllm import SamplingParams

        return SamplingParams(
            n=self.n,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            max_tokens=self.max_tokens,
            logprobs=self.logprobs_k,
            seed=None if self.seed is None else self.seed + prompt_index,
            flat_logprobs=True,
        )
