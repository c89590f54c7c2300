"""The supervised warm-start: it trains, and its result is cached by config hash (small budget here)."""

from __future__ import annotations

import math

import pytest

pytestmark = pytest.mark.integration


def test_warm_start_trains_and_is_cached(tmp_path, tiny_model_shape):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from cppo_rl.data.arithmetic_task import ArithmeticTaskConfig
    from cppo_rl.data.tiny_model import TinyModelConfig
    from cppo_rl.data.warmstart import WarmStartConfig, config_hash, ensure_warm_model

    model = TinyModelConfig(**tiny_model_shape)
    task = ArithmeticTaskConfig(train_size=64, test_size=8)
    train = WarmStartConfig(batch_size=8, lr=3e-3, max_steps=20, eval_every=10, eval_prompts=8, eval_samples=1)
    first = ensure_warm_model(model, task, train, cache_dir=tmp_path, log=lambda _: None)
    assert first.built
    assert first.path.name == config_hash(model, task, train)
    history = first.record["history"]
    assert [h["step"] for h in history] == [10, 20]
    assert history[1]["loss"] < history[0]["loss"]
    assert first.record["steps"] == 20
    assert 0 < first.record["response_entropy"] < math.log(128)  # recorded, in nats (at most log |vocab|)
    assert first.record["response_entropy"] == history[-1]["entropy"]  # the last check's
    AutoModelForCausalLM.from_pretrained(first.path)  # a complete, loadable model directory

    second = ensure_warm_model(model, task, train, cache_dir=tmp_path, log=lambda _: None)
    assert not second.built
    assert second.path == first.path and second.record == first.record
    assert [p.name for p in (tmp_path / "models").iterdir()] == [first.path.name]  # no staging left behind

    other = ensure_warm_model(
        model, task, WarmStartConfig(**{**train.to_dict(), "seed": 1}), cache_dir=tmp_path, log=lambda _: None
    )
    assert other.built and other.path != first.path

    # A second build of the same config on this machine (another cache) gives bit-identical weights.
    rebuilt = ensure_warm_model(model, task, train, cache_dir=tmp_path / "again", log=lambda _: None)
    assert rebuilt.built and rebuilt.path.name == first.path.name
    first_weights, rebuilt_weights = (load_file(path / "model.safetensors") for path in (first.path, rebuilt.path))
    assert first_weights.keys() == rebuilt_weights.keys()
    assert all(torch.equal(first_weights[name], rebuilt_weights[name]) for name in first_weights)


def test_warm_start_past_its_time_limit_fails_and_caches_nothing(tmp_path, tiny_model_shape):
    from cppo_rl.data.arithmetic_task import ArithmeticTaskConfig
    from cppo_rl.data.tiny_model import TinyModelConfig
    from cppo_rl.data.warmstart import WarmStartConfig, WarmStartTimeout, config_hash, ensure_warm_model

    model = TinyModelConfig(**tiny_model_shape)
    task = ArithmeticTaskConfig(train_size=64, test_size=8)
    train = WarmStartConfig(batch_size=8, max_steps=20, eval_every=10, eval_prompts=8, eval_samples=1, max_seconds=1e-9)
    with pytest.raises(WarmStartTimeout, match="warm_start_max_seconds"):
        ensure_warm_model(model, task, train, cache_dir=tmp_path, log=lambda _: None)
    assert not any(tmp_path.rglob("*"))  # no entry, no staging folder
    # The time limit changes no weights, so it is not part of the cache key.
    assert config_hash(model, task, train) == config_hash(
        model, task, WarmStartConfig(**{**train.to_dict(), "max_seconds": 900})
    )


def test_the_check_measures_the_entropy_of_the_model_on_its_own_responses(tiny_model_shape):
    """Against a direct forward over prompt + response: the same tokens (through the first <|im_end|>)."""
    import torch

    from cppo_rl.data.arithmetic_task import ArithmeticTaskConfig, generate_splits
    from cppo_rl.data.tiny_model import TinyModelConfig, init_tiny_model
    from cppo_rl.data.tokenizer import build_tokenizer
    from cppo_rl.data.warmstart import _encode, _sample, evaluate

    torch.manual_seed(0)
    model, tokenizer = init_tiny_model(TinyModelConfig(**tiny_model_shape)), build_tokenizer()
    problems = generate_splits(ArithmeticTaskConfig(train_size=0, test_size=3))["test"]
    settings = {"samples": 2, "temperature": 0.8, "max_new_tokens": 12, "seed": 5}
    accuracy, measured = evaluate(model, tokenizer, problems, **settings)

    generated, _ = _sample(model, tokenizer, problems, **settings)
    eos, total, count = tokenizer.eos_token_id, 0.0, 0
    for row, response in enumerate(generated.tolist()):
        ended = response.index(eos) + 1 if eos in response else len(response)
        prompt = _encode(tokenizer, problems[row // 2])[0]
        with torch.no_grad():
            logits = model(torch.tensor([prompt + response[:ended]])).logits[0, len(prompt) - 1 : -1] / 0.8
        entropy = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
        total, count = total + entropy.sum().item(), count + ended
    assert any(eos in r for r in generated.tolist()) or count == generated.numel()
    assert measured == pytest.approx(total / count, rel=1e-4)
    assert 0 < measured < math.log(model.config.vocab_size) and accuracy == 0.0  # an untrained model
