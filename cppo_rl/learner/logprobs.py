"""Log-probabilities of chosen token ids without materialising full [positions, vocab] logits.

`chunked_token_logprobs(hidden, weight, token_ids, temperature, chunk_size)` returns
`log softmax(hidden @ weight.T / temperature)` gathered at `token_ids` (and, on request, the
entropy of that distribution per position, without gradient), computed chunk of positions by
chunk: the forward keeps one `[chunk, V]` block of logits at a time and saves only the
per-position log-normaliser; the backward recomputes each block and accumulates the weight gradient
into one `[V, H]` buffer. Peak extra memory is about `chunk x V + V x H` floats (plus the
`[N, S]` outputs) instead of `N x V` logits, their softmax and their gradient.

The matmul runs in the inputs' dtype; the softmax, normaliser and outputs are float32.
"""

from __future__ import annotations

import torch

DEFAULT_CHUNK_SIZE = 512


class _ChunkedTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, token_ids, temperature, chunk_size, with_entropy):
        positions = hidden.shape[0]
        logprobs = torch.empty(token_ids.shape, dtype=torch.float32, device=hidden.device)
        normalisers = torch.empty(positions, dtype=torch.float32, device=hidden.device)
        entropy = torch.empty(positions if with_entropy else 0, dtype=torch.float32, device=hidden.device)
        safe_ids = token_ids.clamp_min(0)
        for start in range(0, positions, chunk_size):
            stop = min(start + chunk_size, positions)
            logits = (hidden[start:stop] @ weight.T).float().div_(temperature)
            logprobs[start:stop] = logits.gather(-1, safe_ids[start:stop])
            normalisers[start:stop] = torch.logsumexp(logits, dim=-1)
            logprobs[start:stop] -= normalisers[start:stop, None]
            if with_entropy:  # H = -sum p log p, with the logits turned into log p in place
                log_p = logits.sub_(normalisers[start:stop, None])
                entropy[start:stop] = -(log_p.exp().mul_(log_p)).sum(dim=-1)
        logprobs = logprobs.masked_fill(token_ids < 0, -float("inf"))
        ctx.save_for_backward(hidden, weight, token_ids, normalisers)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, _grad_entropy):
        hidden, weight, token_ids, normalisers = ctx.saved_tensors
        temperature, chunk_size = ctx.temperature, ctx.chunk_size
        grad_logprobs = grad_logprobs.float().masked_fill(token_ids < 0, 0.0)
        safe_ids = token_ids.clamp_min(0)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        for start in range(0, hidden.shape[0], chunk_size):
            stop = min(start + chunk_size, hidden.shape[0])
            h = hidden[start:stop]
            # one [chunk, V] buffer, updated in place: logits -> softmax -> d loss / d logits
            grad_logits = (h @ weight.T).float()
            grad_logits.div_(temperature).sub_(normalisers[start:stop, None]).exp_()
            upstream = grad_logprobs[start:stop]
            # d logprob(id) / d logits = onehot(id) - softmax, summed over the chosen ids, / temperature
            grad_logits.mul_(-upstream.sum(dim=-1, keepdim=True))
            grad_logits.scatter_add_(-1, safe_ids[start:stop], upstream)
            if temperature != 1.0:
                grad_logits.div_(temperature)
            grad_logits = grad_logits.to(hidden.dtype)
            if grad_hidden is not None:
                grad_hidden[start:stop] = grad_logits @ weight
            if grad_weight is not None:
                grad_weight.addmm_(grad_logits.T.float(), h.float())  # in place: no [V, H] temporary
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None


def chunked_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    token_ids: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """float32 [N, S] logprobs of `token_ids` under `softmax(hidden @ weight.T / temperature)`.

    hidden:    [N, H] final hidden states (after the final norm), one row per position
    weight:    [V, H] the output projection (lm_head) weight
    token_ids: int64 [N, S] ids to score per position; -1 marks an unused slot (its logprob is -inf,
               its gradient 0)
    Differentiable in `hidden` and `weight`. With `return_entropy`, also the float32 [N] entropy (nats)
    of each position's distribution (no gradient; one more pass over each `[chunk, V]` block).
    """
    caller = "chunked_token_logprobs"
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"{caller}: `hidden` must be [N, H] and `weight` [V, H] with the same H, got "
            f"{tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if token_ids.dim() != 2 or token_ids.shape[0] != hidden.shape[0] or token_ids.dtype != torch.int64:
        raise ValueError(
            f"{caller}: `token_ids` must be int64 [N, S] with N = {hidden.shape[0]} rows, got "
            f"{token_ids.dtype} {tuple(token_ids.shape)}"
        )
    if (token_ids >= weight.shape[0]).any():
        raise ValueError(f"{caller}: `token_ids` holds ids >= the vocabulary size {weight.shape[0]}")
    if not temperature > 0:
        raise ValueError(f"{caller}: `temperature` must be > 0, got {temperature!r}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{caller}: `chunk_size` must be an int >= 1, got {chunk_size!r}")
    logprobs, entropy = _ChunkedTokenLogprobs.apply(
        hidden, weight, token_ids, float(temperature), chunk_size, return_entropy
    )
    return (logprobs, entropy) if return_entropy else logprobs


class TokenLogprobHead(torch.nn.Module):
    """Replaces a causal LM's `lm_head`: returns logprobs of chosen ids instead of full logits.

    It owns the lm_head's weight Parameter (tied or not), so ZeRO-3 gathers that weight around this
    module's forward and backward exactly as it does for the original linear layer.
    """

    def __init__(self, lm_head: torch.nn.Linear, chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        super().__init__()
        if getattr(lm_head, "bias", None) is not None:
            raise ValueError("TokenLogprobHead: an lm_head with a bias is not supported")
        self.weight = lm_head.weight
        self.chunk_size = chunk_size

    def forward(
        self, hidden: torch.Tensor, token_ids: torch.Tensor, temperature: float, return_entropy: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """[N, H] hidden states, int64 [N, S] ids -> float32 [N, S] logprobs at `temperature` (and [N] entropy)."""
        return chunked_token_logprobs(hidden, self.weight, token_ids, temperature, self.chunk_size, return_entropy)


class LogprobPolicy(torch.nn.Module):
    """A HF causal LM whose forward returns logprobs of chosen ids at chosen positions.

    Keeps the HF parameter names (`model.*`, `lm_head.weight`), so gathered weights load into vLLM
    as they are. This is the root module DeepSpeed wraps. For an MoE model each forward also leaves its
    routing statistics in `self.router` (see `cppo_rl.learner.moe`).
    """

    def __init__(self, causal_lm: torch.nn.Module, chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        from cppo_rl.learner.moe import num_experts

        super().__init__()
        self.config = causal_lm.config
        self.model = causal_lm.model
        self.lm_head = TokenLogprobHead(causal_lm.lm_head, chunk_size)
        self.model_module = type(causal_lm).__module__
        self.is_moe = num_experts(causal_lm.config) > 0
        self.router = None  # an MoE model's RouterStats of the latest forward

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        rows: torch.Tensor,
        positions: torch.Tensor,
        token_ids: torch.Tensor,
        temperature: float,
        return_entropy: bool = False,
        position_ids: torch.Tensor | None = None,
        branch: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """float32 [N, S] logprobs of `token_ids` [N, S] predicted from `hidden[rows, positions]` ([N] each),
        and with `return_entropy` the float32 [N] entropy of each of those positions.

        input_ids, attention_mask: int64 [B, L], right-padded sequences (prompt + response), one per row; or,
        with `position_ids` (int64 [B, L], restarting at 0 where each sequence starts), several sequences
        packed per row: the model then gets no attention mask, so transformers' masking
        (`masking_utils.find_packed_sequence_indices`, 5.19) keeps attention inside each sequence, and
        `attention_mask` marks the real tokens for the MoE router's statistics only. No KV cache is built
        (`use_cache=False`: a training forward; transformers skips the packed-sequence detection when a
        cache exists). With `branch` (int64 [B, L]: shared-prompt rows, `cppo_rl.learner.step.shared_prompt_inputs`)
        the model, loaded with the shared-prompt attention (`shared_prefix.SHARED_PREFIX_ATTENTION`), gets the rows'
        `shared_layout`, which every attention layer receives among its keyword arguments, and the layout's mask
        (bool [B x blocks, 1, W, P + 2W]) as the attention mask: transformers 5.19
        (`masking_utils._preprocess_mask_arguments`) passes a 4D mask on as it is, so it builds no L x L mask of
        its own (it would, for position ids that restart in every response).
        """
        mask = None if position_ids is not None else attention_mask
        extra = {}
        if branch is not None:
            from cppo_rl.learner.shared_prefix import SHARED_PREFIX_ATTENTION, shared_prefix_layout

            if self.config._attn_implementation != SHARED_PREFIX_ATTENTION:
                raise ValueError(
                    f"shared-prompt rows need the model loaded with attn_implementation={SHARED_PREFIX_ATTENTION!r}, "
                    f"not {self.config._attn_implementation!r}: another attention would let responses see each other"
                )
            extra["shared_layout"] = shared_prefix_layout(branch)
            mask = extra["shared_layout"].mask
        if not self.is_moe:
            hidden = self.model(
                input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False, **extra
            ).last_hidden_state
            return self.lm_head(hidden[rows, positions], token_ids, temperature, return_entropy)
        from cppo_rl.learner.moe import router_stats

        output = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=position_ids,
            output_router_logits=True,
            use_cache=False,
            **extra,
        )
        self.router = router_stats(self.model_module, output.router_logits, attention_mask, self.config)
        return self.lm_head(output.last_hidden_state[rows, positions], token_ids, temperature, return_entropy)
