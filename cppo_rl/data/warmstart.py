"""Supervised warm-start of the tiny model on the arithmetic task, cached by a hash of its config.

RL from a random model gets no reward, so the default run first fine-tunes the tiny Qwen3 on worked
solutions (chat template applied, loss on the completion and its `<|im_end|>` only, AdamW) until its
held-out accuracy (Avg@k, sampled, checked every `eval_every` steps) reaches a target or `max_steps`
run out. The stop rule counts steps, never seconds, so a fast and a slow machine of one kind build
the same weights for one config hash; `max_seconds` only bounds the wait: past it the build fails
(`WarmStartTimeout`, nothing cached) rather than caching a less-trained model under the same hash.
Across CPU kinds the float kernels differ, the sampled evaluation can cross the target at another
check, and the weights differ (a hash names a config, not bit-identical weights). The result is
a hub-style model directory (`cppo_rl.data.tiny_model`) plus `warmstart.json` (the config, steps,
seconds, accuracy and the loss/accuracy history), stored under `<cache>/models/<hash>` where `<cache>`
is the `cache_dir` argument, else `$CPPO_CACHE_DIR`, else `<repo>/.cache`. The directory is built
in a temporary folder and renamed into place, so a directory that exists is complete.

CLI: `python -m cppo_rl.data.warmstart [--out DIR] [OVERRIDE ...]` (the run's overrides, e.g.
`experiment=drift_stress`; `model.warm_start_max_seconds=N` sets the time limit).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast, Qwen3ForCausalLM

from cppo_rl.config import ModelConfig, TrainConfig
from cppo_rl.data.arithmetic_task import ArithmeticTaskConfig, Problem, generate_splits, grade
from cppo_rl.data.tiny_model import TinyModelConfig, init_tiny_model
from cppo_rl.data.tokenizer import IM_END, build_tokenizer

CACHE_ENV = "CPPO_CACHE_DIR"
CACHE_FORMAT = 1
"""Bumped whenever the training code changes what a config produces (it is part of the hash)."""

REPO_ROOT = Path(__file__).resolve().parents[2]


class WarmStartTimeout(RuntimeError):
    """The time limit ran out before the stop rule fired; nothing was cached."""


@dataclass(frozen=True)
class WarmStartConfig:
    """Training hyperparameters, the stop rule (target accuracy or `max_steps`) and a time limit.

    Units: steps, seconds, fractions. `max_seconds` is not part of the cache hash: it changes no weights.
    """

    batch_size: int = 64
    lr: float = 2e-3
    warmup_steps: int = 20
    weight_decay: float = 0.0
    max_steps: int = 5000
    max_seconds: float = ModelConfig.warm_start_max_seconds
    eval_every: int = 50
    eval_prompts: int = 200
    eval_samples: int = 4
    temperature: float = 1.0
    target_accuracy: float = ModelConfig.warm_start_target_accuracy
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_steps", "eval_every", "eval_prompts", "eval_samples"):
            if getattr(self, name) <= 0:
                raise ValueError(f"WarmStartConfig: `{name}` must be > 0, got {getattr(self, name)!r}")
        if not (self.lr > 0 and self.max_seconds > 0 and self.temperature > 0):
            raise ValueError(
                "WarmStartConfig: `lr`, `max_seconds` and `temperature` must be > 0, got "
                f"{self.lr!r}, {self.max_seconds!r}, {self.temperature!r}"
            )
        if self.warmup_steps < 0 or self.weight_decay < 0:
            raise ValueError("WarmStartConfig: `warmup_steps` and `weight_decay` must be >= 0")
        if not 0 <= self.target_accuracy <= 1:
            raise ValueError(f"WarmStartConfig: `target_accuracy` must lie in [0, 1], got {self.target_accuracy!r}")

    def to_dict(self) -> dict:
        """The fields as a JSON-ready dict."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class WarmStartResult:
    """What a warm-start produced: `path` to the model directory, `built` False when it came from the cache."""

    path: Path
    built: bool
    record: dict


def full_config(model: TinyModelConfig, task: ArithmeticTaskConfig, train: WarmStartConfig) -> dict:
    """Everything that determines the warm-started weights, as one JSON-ready dict (not the time limit)."""
    train_fields = {name: value for name, value in train.to_dict().items() if name != "max_seconds"}
    return {"format": CACHE_FORMAT, "model": model.to_dict(), "task": task.to_dict(), "train": train_fields}


def config_hash(model: TinyModelConfig, task: ArithmeticTaskConfig, train: WarmStartConfig) -> str:
    """A 16-hex-digit hash of `full_config` (stable across runs and machines)."""
    text = json.dumps(full_config(model, task, train), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The cache root: `cache_dir`, else `$CPPO_CACHE_DIR`, else `<repo>/.cache`."""
    return Path(cache_dir or os.environ.get(CACHE_ENV) or REPO_ROOT / ".cache")


def _encode(tokenizer: PreTrainedTokenizerFast, problem: Problem) -> tuple[list[int], list[int]]:
    """(prompt ids with the chat template and generation prompt, completion ids ending in `<|im_end|>`)."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": problem.prompt}], tokenize=False, add_generation_prompt=True
    )
    return tokenizer.encode(text, add_special_tokens=False), tokenizer.encode(
        problem.completion + IM_END, add_special_tokens=False
    )


def _training_batch(pairs: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids / attention_mask / labels [B, L]; labels are -100 off the completion."""
    length = max(len(prompt) + len(completion) for prompt, completion in pairs)
    input_ids = torch.full((len(pairs), length), pad_id, dtype=torch.long)
    labels = torch.full((len(pairs), length), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(pairs), length), dtype=torch.long)
    for row, (prompt, completion) in enumerate(pairs):
        ids = prompt + completion
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, len(prompt) : len(ids)] = torch.tensor(completion)
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@torch.no_grad()
def _sample(
    model: Qwen3ForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    problems: list[Problem],
    *,
    samples: int,
    temperature: float,
    max_new_tokens: int,
    seed: int,
):
    """`samples` completions per problem, sampled at `temperature` with no truncation: the generated ids
    [N, new] (N = problems x samples, problem-major) and the per-step logits after the temperature (a tuple
    of `new` [N, vocab] tensors)."""
    prompts = [_encode(tokenizer, problem)[0] for problem in problems for _ in range(samples)]
    width = max(len(prompt) for prompt in prompts)
    input_ids = torch.full((len(prompts), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
        attention_mask[row, width - len(prompt) :] = 1
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        output = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            do_sample=True,
            temperature=temperature,
            top_k=0,
            top_p=1.0,
            max_new_tokens=max_new_tokens,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            output_scores=True,
            return_dict_in_generate=True,
        )
    model.train(was_training)
    return output.sequences[:, width:], output.scores


def evaluate(
    model: Qwen3ForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    problems: list[Problem],
    *,
    samples: int,
    temperature: float,
    max_new_tokens: int,
    seed: int = 0,
) -> tuple[float, float]:
    """(Avg@`samples`, entropy) of `samples` completions per problem sampled at `temperature`: the mean grade,
    and the mean entropy (nats) of the model's next-token distribution over the tokens of its own responses
    (each up to and including its `<|im_end|>`), as RL samples them."""
    generated, scores = _sample(
        model,
        tokenizer,
        problems,
        samples=samples,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        seed=seed,
    )
    texts = tokenizer.batch_decode(generated, skip_special_tokens=True)
    answers = [problem.answer for problem in problems for _ in range(samples)]
    accuracy = sum(grade(text, answer) for text, answer in zip(texts, answers, strict=True)) / len(texts)
    logprobs = torch.stack(scores, dim=1).float().log_softmax(-1)  # [N, new, vocab]
    entropy = -(logprobs.exp() * logprobs).nan_to_num().sum(-1)
    eos = generated == tokenizer.eos_token_id
    ended = eos.long().cumsum(-1)
    valid = (ended == 0) | ((ended == 1) & eos)  # through the first eos
    return accuracy, (entropy * valid).sum().item() / valid.sum().item()


def train_warm_model(
    model: Qwen3ForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    train_problems: list[Problem],
    eval_problems: list[Problem],
    config: WarmStartConfig,
    log: Callable[[str], None] = print,
) -> dict:
    """Fine-tune `model` in place until the stop rule fires; return steps, seconds, accuracy and history."""
    if not train_problems or not eval_problems:
        raise ValueError("train_warm_model: need at least one train and one eval problem; raise the split sizes")
    pairs = [_encode(tokenizer, problem) for problem in train_problems]
    eval_set = eval_problems[: config.eval_prompts]
    max_new_tokens = max(len(_encode(tokenizer, problem)[1]) for problem in eval_set) + 8
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    warmup = max(config.warmup_steps, 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    generator = torch.Generator().manual_seed(config.seed)
    order, cursor = torch.randperm(len(pairs), generator=generator), 0
    history, losses, accuracy, entropy, step = [], [], 0.0, float("nan"), 0
    model.train()
    start = time.perf_counter()
    while step < config.max_steps:
        if time.perf_counter() - start > config.max_seconds:
            raise WarmStartTimeout(
                f"warm start: held-out accuracy {accuracy:.3f} after {step} steps, below the target "
                f"{config.target_accuracy}, and the time limit of {config.max_seconds:.0f} s is spent; nothing is "
                "cached. Raise the limit (`model.warm_start_max_seconds`, in a run or on the CLI) "
                "or lower the target (`model.warm_start_target_accuracy`)"
            )
        if cursor + config.batch_size > len(pairs):
            order, cursor = torch.randperm(len(pairs), generator=generator), 0
        batch = _training_batch([pairs[i] for i in order[cursor : cursor + config.batch_size]], tokenizer.pad_token_id)
        cursor += config.batch_size
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        step += 1
        if step % config.eval_every and step < config.max_steps:
            continue
        accuracy, entropy = evaluate(
            model,
            tokenizer,
            eval_set,
            samples=config.eval_samples,
            temperature=config.temperature,
            max_new_tokens=max_new_tokens,
            seed=config.seed,
        )
        seconds = time.perf_counter() - start
        history.append(
            {
                "step": step,
                "seconds": round(seconds, 1),
                "loss": sum(losses) / len(losses),
                "accuracy": accuracy,
                "entropy": entropy,
            }
        )
        log(
            f"step {step:5d}  {seconds:6.1f}s  loss {history[-1]['loss']:.4f}  held-out accuracy {accuracy:.3f}  "
            f"entropy {entropy:.3f} nats"
        )
        losses = []
        if accuracy >= config.target_accuracy:
            break
    return {
        "steps": step,
        "seconds": round(time.perf_counter() - start, 1),
        "accuracy": accuracy,
        "reached_target": accuracy >= config.target_accuracy,
        "response_entropy": entropy,  # at the last check, on the held-out prompts
        "history": history,
    }


def ensure_warm_model(
    model: TinyModelConfig | None = None,
    task: ArithmeticTaskConfig | None = None,
    train: WarmStartConfig | None = None,
    *,
    cache_dir: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> WarmStartResult:
    """The warm-started model directory for these configs: from the cache, or trained and cached.

    Training happens in a temporary directory next to the cache entry, renamed into place when
    complete; a concurrent builder that finishes first wins and this one's copy is discarded.
    """
    model, task, train = model or TinyModelConfig(), task or ArithmeticTaskConfig(), train or WarmStartConfig()
    target = cache_root(cache_dir) / "models" / config_hash(model, task, train)
    record_path = target / "warmstart.json"
    if record_path.is_file():
        return WarmStartResult(path=target, built=False, record=json.loads(record_path.read_text()))
    log(f"warm-start: training the tiny model into {target} (cached for later runs)")
    tokenizer = build_tokenizer()
    splits = generate_splits(task)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(train.seed)
        policy = init_tiny_model(model)
        outcome = train_warm_model(policy, tokenizer, splits["train"], splits["test"], train, log)
    record = {**full_config(model, task, train), **outcome, "parameters": sum(p.numel() for p in policy.parameters())}
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        policy.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "warmstart.json").write_text(json.dumps(record, indent=2))
        os.rename(staging, target)
    except OSError:
        if not record_path.is_file():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return WarmStartResult(path=target, built=True, record=record)


def ensure_for_run(
    config: TrainConfig, cache_dir: str | Path | None = None, log: Callable[[str], None] = print
) -> WarmStartResult:
    """The warm start a run of `config` trains from: its `data.task`, with the time
    limit and target of its `model` section."""
    train = WarmStartConfig(
        max_seconds=config.model.warm_start_max_seconds, target_accuracy=config.model.warm_start_target_accuracy
    )
    return ensure_warm_model(TinyModelConfig(), config.data.task, train, cache_dir=cache_dir, log=log)


def main(argv: list[str] | None = None) -> None:
    """CLI: build (or find) the warm start of the run the overrides compose (the default run's without
    any) and print where it is, how good it is and its entropy on its own responses."""
    from cppo_rl.preflight import compose

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="cache directory (default: $CPPO_CACHE_DIR or <repo>/.cache)")
    parser.add_argument("overrides", nargs="*", help="the run's overrides, e.g. experiment=drift_stress")
    args = parser.parse_args(argv)
    config, _ = compose(args.overrides)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    result = ensure_for_run(config, cache_dir=args.out)
    record = result.record
    print(
        f"{'built' if result.built else 'cached'}: {result.path} (config hash {result.path.name})\n"
        f"held-out accuracy {record['accuracy']:.3f} after {record['steps']} steps, {record['seconds']} s; "
        f"mean token entropy on its own responses {record.get('response_entropy', float('nan')):.3f} nats"
    )


if __name__ == "__main__":
    main()
