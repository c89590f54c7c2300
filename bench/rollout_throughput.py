"""Rollout throughput: one vLLM-CPU engine (RolloutEngine) vs transformers `generate`, same model and work.

Both sides generate exactly `max_tokens` tokens for every sample (EOS ignored), from the same
chat-templated prompts, sampling at temperature 1, float32; each side runs in its own process
(vLLM-CPU pins threads in its process). Also reports the engine's start time (constructing
RolloutEngine until it can generate). Check first: both sides produce the requested token count.

    python -m bench.rollout_throughput [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

from bench.common import print_table, run_child, write_result

MODELS = {
    "tiny_3m": {},
    "qwen3_25m": {
        "hidden_size": 512,
        "num_layers": 8,
        "num_heads": 8,
        "num_kv_heads": 4,
        "head_dim": 64,
        "intermediate_size": 1536,
    },
}


def _prompts(model_dir: str, count: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    messages = ([{"role": "user", "content": f"Compute {i % 50}+{(7 * i) % 50}."}] for i in range(count))
    return [tokenizer.apply_chat_template(m, add_generation_prompt=True)["input_ids"] for m in messages]


def child(side: str, model_dir: str, prompts: int, n: int, max_tokens: int, repeats: int) -> dict:
    """One side in this process: median tokens/s over `repeats` generations (after one warm-up)."""
    import torch

    ids = _prompts(model_dir, prompts)
    if side == "vllm":
        from cppo_rl.rollout.engine import EngineConfig, RolloutEngine
        from cppo_rl.rollout.sampling import SamplingConfig

        start = time.perf_counter()
        engine = RolloutEngine(EngineConfig(model_dir, max_model_len=256))
        startup = time.perf_counter() - start
        base = SamplingConfig(n=n, max_tokens=max_tokens, logprobs_k=20, seed=0)

        def generate() -> int:
            from vllm.inputs import TokensPrompt

            params = [base.to_vllm(i) for i in range(len(ids))]
            for p in params:
                p.ignore_eos = True
            outputs = engine.llm.generate([TokensPrompt(prompt_token_ids=p) for p in ids], params, use_tqdm=False)
            return sum(len(c.token_ids) for o in outputs for c in o.outputs)
    else:
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(2)
        startup = 0.0
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        width = max(len(p) for p in ids)
        input_ids = torch.tensor([[0] * (width - len(p)) + p for p in ids for _ in range(n)])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ids for _ in range(n)])

        def generate() -> int:
            with torch.no_grad():
                out = model.generate(
                    input_ids=input_ids,
                    attention_mask=mask,
                    do_sample=True,
                    temperature=1.0,
                    top_k=0,
                    top_p=1.0,
                    max_new_tokens=max_tokens,
                    min_new_tokens=max_tokens,
                    pad_token_id=0,
                )
            return int((out.shape[1] - width) * out.shape[0])

    generate()  # warm-up
    rates, tokens = [], 0
    for _ in range(repeats):
        start = time.perf_counter()
        tokens = generate()
        rates.append(tokens / (time.perf_counter() - start))
    return {"tokens_per_s": statistics.median(rates), "all": rates, "tokens": tokens, "startup_s": startup}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the tiny model, fewer prompts")
    parser.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        side, model_dir, prompts, n, max_tokens, repeats = args.child
        print(json.dumps(child(side, model_dir, int(prompts), int(n), int(max_tokens), int(repeats))))
        return
    from cppo_rl.data.tiny_model import TinyModelConfig, build_tiny_model

    prompts, n, max_tokens, repeats = (8, 8, 32, 2) if args.quick else (32, 8, 64, 3)
    models = ["tiny_3m"] if args.quick else list(MODELS)
    rows, figures = [], {}
    for name in models:
        directory = str(
            build_tiny_model(
                TinyModelConfig(**MODELS[name], max_position_embeddings=256), tempfile.mkdtemp(prefix=f"bench_{name}_")
            )
        )
        sides = {
            side: run_child(
                "bench.rollout_throughput",
                "--child",
                side,
                directory,
                str(prompts),
                str(n),
                str(max_tokens),
                str(repeats),
            )
            for side in ("vllm", "hf")
        }
        expected = prompts * n * max_tokens
        if any(s["tokens"] != expected for s in sides.values()):
            raise SystemExit(f"the sides generated {[s['tokens'] for s in sides.values()]} tokens, expected {expected}")
        ratio = sides["vllm"]["tokens_per_s"] / sides["hf"]["tokens_per_s"]
        rows.append(
            [name, sides["vllm"]["startup_s"], sides["vllm"]["tokens_per_s"], sides["hf"]["tokens_per_s"], ratio]
        )
        figures[name] = {**sides, "ratio": ratio}
    print_table(
        f"rollout throughput, {prompts} prompts x {n} samples x {max_tokens} tokens, temperature 1, fp32",
        ["model", "vLLM start s", "vLLM tok/s", "HF tok/s", "ratio"],
        rows,
    )
    last = figures[models[-1]]["ratio"]
    path = write_result(
        "rollout_throughput" + ("_quick" if args.quick else ""),
        ratio=last,
        goal="vLLM faster than transformers generate (ratio > 1)",
        met=last > 1,
        prompts=prompts,
        samples=n,
        max_tokens=max_tokens,
        models=figures,
    )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
