"""A tiny random-init Qwen3 (a few million parameters; dense or MoE) saved like a hub model, tokenizer included.

`build_tiny_model(config, out_dir)` writes `config.json`, `generation_config.json`,
`model.safetensors` (float32) and the character tokenizer (`cppo_rl.data.tokenizer`), so
transformers, vLLM and DeepSpeed load the directory exactly as they load `Qwen/Qwen3-1.7B`.
The weights depend only on the config (the seed included), never on the global RNG state.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # transformers is imported where a model is built: reading the shape stays light
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

VOCAB_MULTIPLE = 64
"""The embedding rows are padded to a multiple of this (as real checkpoints pad theirs)."""


MOE_FIELDS = (
    "num_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
    "output_router_logits",
    "router_aux_loss_coef",
)


@dataclass(frozen=True)
class TinyModelConfig:
    """Shape of the tiny Qwen3. The defaults give 3.2M parameters (vocab 128 after padding)."""

    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: int = 4
    head_dim: int = 32
    intermediate_size: int = 768
    max_position_embeddings: int = 1024
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    # > 0: a Qwen3MoeForCausalLM (the 30B-A3B architecture) with this many experts per layer
    num_experts: int = 0
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 64
    output_router_logits: bool = True  # train with the router's load-balancing loss
    router_aux_loss_coef: float = 0.001
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "intermediate_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"TinyModelConfig: `{name}` must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"TinyModelConfig: `num_heads` ({self.num_heads}) must be a multiple of `num_kv_heads` "
                f"({self.num_kv_heads}) for grouped-query attention; change one of them"
            )
        if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ValueError(
                f"TinyModelConfig: `num_experts_per_tok` must lie in 1..num_experts ({self.num_experts}), "
                f"got {self.num_experts_per_tok}"
            )
        if self.max_position_embeddings < 16:
            raise ValueError(
                f"TinyModelConfig: `max_position_embeddings` must be >= 16, got {self.max_position_embeddings}"
            )

    def to_dict(self) -> dict:
        """The fields as a JSON-ready dict (a dense model's without the MoE fields, so that the warm-start
        cache keys of dense models stay what they were before MoE support)."""
        fields = dataclasses.asdict(self)
        if not self.num_experts:
            for name in MOE_FIELDS:
                fields.pop(name)
        return fields


def padded_vocab_size(num_tokens: int) -> int:
    """`num_tokens` rounded up to a multiple of `VOCAB_MULTIPLE`."""
    return -(-num_tokens // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def qwen3_config(config: TinyModelConfig) -> Qwen3Config | Qwen3MoeConfig:
    """The transformers config of the tiny model (float32, eos = `<|im_end|>`, pad = `<|pad|>`); a
    Qwen3-MoE one when `config.num_experts` > 0 (every layer sparse)."""
    from transformers import Qwen3Config, Qwen3MoeConfig

    from cppo_rl.data.tokenizer import ENDOFTEXT, IM_END, PAD, build_tokenizer

    tokenizer = build_tokenizer()
    if config.num_experts:
        moe = {
            "num_experts": config.num_experts,
            "num_experts_per_tok": config.num_experts_per_tok,
            "moe_intermediate_size": config.moe_intermediate_size,
            "decoder_sparse_step": 1,
            "norm_topk_prob": True,
            "output_router_logits": config.output_router_logits,
            "router_aux_loss_coef": config.router_aux_loss_coef,
        }
        config_class, architecture = Qwen3MoeConfig, "Qwen3MoeForCausalLM"
    else:
        moe, config_class, architecture = {}, Qwen3Config, "Qwen3ForCausalLM"
    return config_class(
        **moe,
        vocab_size=padded_vocab_size(len(tokenizer)),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        max_position_embeddings=config.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        initializer_range=config.initializer_range,
        tie_word_embeddings=config.tie_word_embeddings,
        bos_token_id=tokenizer.convert_tokens_to_ids(ENDOFTEXT),
        eos_token_id=tokenizer.convert_tokens_to_ids(IM_END),
        pad_token_id=tokenizer.convert_tokens_to_ids(PAD),
        dtype="float32",
        architectures=[architecture],
    )


def init_tiny_model(config: TinyModelConfig) -> Qwen3ForCausalLM | Qwen3MoeForCausalLM:
    """A random-init float32 model, the same weights for the same config; the global RNG is untouched."""
    from transformers import GenerationConfig, Qwen3ForCausalLM, Qwen3MoeForCausalLM

    model_class = Qwen3MoeForCausalLM if config.num_experts else Qwen3ForCausalLM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = model_class(qwen3_config(config)).float()
    model.generation_config = GenerationConfig(
        bos_token_id=model.config.bos_token_id,
        eos_token_id=model.config.eos_token_id,
        pad_token_id=model.config.pad_token_id,
    )
    return model


def build_tiny_model(config: TinyModelConfig, out_dir: str | Path) -> Path:
    """Write the random-init model and its tokenizer into `out_dir` (created if missing); return it."""
    from cppo_rl.data.tokenizer import build_tokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    init_tiny_model(config).save_pretrained(out)
    build_tokenizer().save_pretrained(out)
    return out


def count_parameters(model: torch.nn.Module) -> int:
    """Number of distinct parameter elements (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())
