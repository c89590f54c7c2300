"""A character-level tokenizer for the tiny model, saved as a Hugging Face fast tokenizer.

One token per character of printable ASCII plus newline (ids 0-95, in code-point order, newline last),
then five special tokens. The chat template is Qwen-style
(`<|im_start|>user\\n...<|im_end|>\\n<|im_start|>assistant\\n`) and eos is `<|im_end|>`, so
`AutoTokenizer.from_pretrained(dir)` and vLLM load the saved directory like a hub tokenizer.

Characters outside the vocabulary encode to `<|unk|>` (a special token, dropped by
`decode(..., skip_special_tokens=True)`); `check_text` raises instead, naming the characters.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

CHARACTERS: tuple[str, ...] = (*(chr(code) for code in range(32, 127)), "\n")
"""The vocabulary's characters, in id order."""

ENDOFTEXT, IM_START, IM_END, PAD, UNK = "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>", "<|unk|>"
SPECIAL_TOKENS: tuple[str, ...] = (ENDOFTEXT, IM_START, IM_END, PAD, UNK)
"""Special tokens, in id order after the characters."""

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
"""Qwen-style ChatML: each message is `<|im_start|>{role}\\n{content}<|im_end|>\\n`."""

_KNOWN = frozenset(CHARACTERS)


def vocab_size() -> int:
    """Number of real tokens (characters + special tokens); the model pads its embedding beyond it."""
    return len(CHARACTERS) + len(SPECIAL_TOKENS)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The character-level tokenizer with its chat template; the same ids on every call."""
    vocab = {token: index for index, token in enumerate((*CHARACTERS, *SPECIAL_TOKENS))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(".|\n"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=IM_END,
        pad_token=PAD,
        unk_token=UNK,
        extra_special_tokens=[ENDOFTEXT, IM_START],
        model_max_length=1 << 20,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def save_tokenizer(out_dir: str | Path) -> Path:
    """Write the tokenizer (tokenizer.json, its config and chat template) into `out_dir`; return it."""
    out = Path(out_dir)
    build_tokenizer().save_pretrained(out)
    return out


def check_text(text: str) -> None:
    """Raise ValueError naming every character of `text` that the vocabulary lacks."""
    unknown = sorted(set(text) - _KNOWN)
    if unknown:
        raise ValueError(
            f"check_text: characters {unknown!r} are not in the tiny tokenizer's vocabulary "
            "(printable ASCII and newline); they would encode to <|unk|>. Rewrite the text in ASCII"
        )
