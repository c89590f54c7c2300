"""Mixture-of-experts models in the learner (Qwen3-30B-A3B's architecture): ZeRO-3 leaf modules, the
router's load-balancing loss, and expert-load metrics.

ZeRO-3 fetches a module's parameters around its forward. In a per-expert module list, an expert that
gets no token on one rank is never fetched there, so the ranks' collectives stop matching (gloo fails
with a size mismatch, NCCL hangs). Marking the sparse MoE block a leaf module makes ZeRO-3 fetch the
whole block (router and every expert) at once on every rank. transformers 5 already fuses the experts
into 3-D parameters; the leaf marking costs nothing there and keeps other layouts safe.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch


def num_experts(config) -> int:
    """Experts per MoE layer of a HF model config (0 for a dense model)."""
    return int(getattr(config, "num_experts", 0) or getattr(config, "num_local_experts", 0) or 0)


def mark_leaf_modules(model: torch.nn.Module) -> list[str]:
    """Register every `*SparseMoeBlock` class of `model` as a ZeRO-3 leaf module; returns their names."""
    classes = sorted({type(m) for m in model.modules() if type(m).__name__.endswith("SparseMoeBlock")}, key=str)
    if classes:
        from deepspeed.utils import set_z3_leaf_modules

        set_z3_leaf_modules(model, classes)
    return [c.__name__ for c in classes]


@dataclass
class RouterStats:
    """One forward's routing. aux_loss: the model's own load-balancing loss (scalar, differentiable; what
    its causal LM adds as `router_aux_loss_coef * aux_loss`); expert_load: float32 [E] share of the
    (token, slot) assignments each expert received, over every MoE layer and valid token (sums to 1)."""

    aux_loss: torch.Tensor
    expert_load: torch.Tensor

    def metrics(self) -> dict[str, torch.Tensor]:
        """`moe_aux_loss`, and the most / least loaded expert relative to a uniform load (1 = balanced); 0-dim
        float32 tensors on the router logits' device."""
        uniform = 1.0 / self.expert_load.numel()
        return {
            "moe_aux_loss": self.aux_loss.detach().float(),
            "moe_expert_load_max": self.expert_load.max() / uniform,
            "moe_expert_load_min": self.expert_load.min() / uniform,
        }


def router_stats(
    causal_lm_module: str, router_logits: tuple[torch.Tensor, ...], attention_mask: torch.Tensor, config
) -> RouterStats:
    """Routing statistics of one forward.

    causal_lm_module: the model class's module (its `load_balancing_loss_func` is the model's own aux loss)
    router_logits:    per MoE layer, [B * L, E] router logits
    attention_mask:   int64 [B, L]; padding is excluded
    """
    experts, top_k = num_experts(config), int(config.num_experts_per_tok)
    aux_loss = sys.modules[causal_lm_module].load_balancing_loss_func(router_logits, experts, top_k, attention_mask)
    device = router_logits[0].device  # every tensor returned lives here (the learner's device)
    valid = attention_mask.reshape(-1).bool().to(device)
    counts = torch.zeros(experts, dtype=torch.float32, device=device)
    with torch.no_grad():
        for layer in router_logits:
            chosen = layer[valid].topk(top_k, dim=-1).indices
            counts += torch.bincount(chosen.reshape(-1), minlength=experts).float()
    # load_balancing_loss_func returns a tensor on the logits' device, or a plain 0 without router logits
    aux_loss = torch.as_tensor(aux_loss, dtype=torch.float32, device=device)
    return RouterStats(aux_loss=aux_loss, expert_load=counts / counts.sum())
