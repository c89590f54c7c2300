"""The training loop: prompts -> rollouts -> rewards -> advantages -> learner updates -> weight sync.

`Trainer(config, run_dir).run()` owns the actors of one run (rollout engines, learner ranks, the
reward pool), evaluates Avg@k on the held-out split before training, every `trainer.eval_every`
steps and at the end, checkpoints, logs every step, and writes `summary.json`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from cppo_rl.algorithms import PolicyLossConfig, count_constant_groups, get_advantage
from cppo_rl.config import TrainConfig
from cppo_rl.data.dataset import Example, PromptLoader, load_jsonl


def policy_loss_config(config: TrainConfig) -> PolicyLossConfig:
    """The algorithm core's config for this run (position horizon resolved to a number or a mode)."""
    a = config.algorithm
    horizon = {"max_response_length": config.rollout.max_response_length, "sequence": "sequence", "padded": None}
    return PolicyLossConfig(
        divergence=a.divergence,
        delta=a.delta,
        delta_b=a.delta_b,
        w_min=a.w_min,
        horizon=horizon[a.position_horizon],
        adaptive_delta_b=a.adaptive_delta_b,
        delta_b_quantile=a.delta_b_quantile,
        delta_b_scale=a.delta_b_scale,
        is_cap=a.is_cap,
        clip_low=a.clip_low,
        clip_high=a.clip_high,
        cispo_eps_low=a.cispo_eps_low,
        cispo_eps_high=a.cispo_eps_high,
        minpro_eps_low=a.minpro_eps_low,
        minpro_eps_high=a.minpro_eps_high,
        trm_max_delta=a.trm_max_delta,
        trm_avg_delta=a.trm_avg_delta,
        loss_agg_mode=a.loss_agg_mode,
    )


class Trainer:
    """One training run in `run_dir` (metrics.jsonl, summary.json, checkpoints/, wandb/)."""

    def __init__(self, config: TrainConfig, run_dir: Path) -> None:
        self.config, self.run_dir = config, run_dir
        self.loss_config = policy_loss_config(config)  # validates the algorithm's knobs up front

    # -- set-up -------------------------------------------------------------------------------------

    def _model_and_data(self) -> tuple[str, list[Example], list[Example]]:
        from cppo_rl.data.arithmetic_task import ArithmeticTaskConfig, write_dataset
        from cppo_rl.data.tiny_model import TinyModelConfig, build_tiny_model
        from cppo_rl.data.warmstart import WarmStartConfig, ensure_warm_model

        model, data = self.config.model, self.config.data
        task = ArithmeticTaskConfig()
        if model.path == "tiny":
            if model.warm_start:
                train = WarmStartConfig(
                    max_seconds=model.warm_start_max_seconds, target_accuracy=model.warm_start_target_accuracy
                )
                model_path = str(ensure_warm_model(TinyModelConfig(), task, train).path)
            else:
                model_path = str(build_tiny_model(TinyModelConfig(), self.run_dir / "tiny_model"))
        else:
            model_path = model.path
        generated = (
            write_dataset(task, self.run_dir / "data") if "generated" in data.train_files + data.eval_files else {}
        )

        def files(names: list[str], split: str) -> list[Example]:
            return [e for name in names for e in load_jsonl(generated[split] if name == "generated" else name)]

        return model_path, files(data.train_files, "train"), files(data.eval_files, "test")[: data.eval_prompts]

    def _start_actors(self, model_path: str) -> None:
        from cppo_rl.learner.worker import LearnerConfig, LearnerGroup
        from cppo_rl.rewards import RewardPool
        from cppo_rl.rollout.engine import EngineConfig
        from cppo_rl.rollout.worker import RolloutGroup, start_rollout_workers
        from cppo_rl.sync.weight_sync import WeightSync

        c, r, lrn, t = self.config.cluster, self.config.rollout, self.config.learner, self.config.trainer
        use_gpu = c.num_gpus > 0
        engine = EngineConfig(
            model_path,
            dtype=r.dtype,
            max_model_len=r.max_model_len,
            tensor_parallel_size=r.tensor_parallel_size,
            gpu_memory_utilization=r.gpu_memory_utilization,
            cpu_kv_cache_gib=r.cpu_kv_cache_gib,
            seed=t.seed,
        )
        self.rollout = RolloutGroup(
            start_rollout_workers(engine, r.num_engines, num_cpus=c.cpus_per_engine, use_gpu=use_gpu)
        )
        learner = LearnerConfig(
            model_path=model_path,
            responses_per_step=t.prompts_per_step * t.samples_per_prompt,
            updates_per_rollout=t.prompts_per_step // t.minibatch_prompts,
            micro_batch_size=lrn.micro_batch_size,
            lr=lrn.lr,
            weight_decay=lrn.weight_decay,
            grad_clip=lrn.grad_clip,
            warmup_steps=lrn.warmup_steps,
            lr_schedule=lrn.lr_schedule,
            total_steps=t.total_steps * (t.prompts_per_step // t.minibatch_prompts),
            temperature=r.temperature,
            anchor=self.config.algorithm.anchor,
            logprob_chunk_size=lrn.logprob_chunk_size,
            gradient_checkpointing=lrn.gradient_checkpointing,
            seed=t.seed,
        )
        self.learner = LearnerGroup(
            learner,
            self.config.algorithm.name,
            self.loss_config,
            lrn.world_size,
            num_cpus_per_rank=c.cpus_per_learner,
            use_gpu=use_gpu,
        )
        self.sync = WeightSync(self.learner, self.rollout, lrn.sync_transport, lrn.sync_bucket_mb << 20)
        rw = self.config.reward
        self.rewards = RewardPool(rw.num_workers, rw.timeout_s, rw.memory_limit_mb)

    def _encode(self, tokenizer, examples: list[Example]) -> list[list[int]]:
        return [
            tokenizer.apply_chat_template([{"role": "user", "content": e.prompt}], add_generation_prompt=True)[
                "input_ids"
            ]
            for e in examples
        ]

    # -- the loop -----------------------------------------------------------------------------------

    def evaluate(self, tokenizer, examples: list[Example], step: int) -> tuple[float, list[list]]:
        """Avg@k on `examples` at the eval temperature / top-p; returns accuracy and sample rows."""
        from cppo_rl.rollout.sampling import SamplingConfig

        r = self.config.rollout
        sampling = SamplingConfig(
            n=r.eval_samples,
            temperature=r.eval_temperature,
            top_p=r.eval_top_p,
            max_tokens=r.max_response_length,
            logprobs_k=0,
            seed=10_000 + step,
            training=False,
        )
        batch = self.rollout.generate(self._encode(tokenizer, examples), sampling)
        golds = [e.answer for e in examples for _ in range(r.eval_samples)]
        outcomes = self.rewards.score(batch.response_texts, golds)
        samples = [
            [examples[i // r.eval_samples].prompt, batch.response_texts[i], outcomes[i].reward]
            for i in range(0, len(golds), r.eval_samples)
        ][:8]
        return sum(o.reward for o in outcomes) / len(outcomes), samples

    def run(self) -> dict:
        import ray
        from transformers import AutoTokenizer

        from cppo_rl.controller.tracker import Tracker
        from cppo_rl.rollout.sampling import SamplingConfig

        config, started = self.config, time.perf_counter()
        c, r, t = config.cluster, config.rollout, config.trainer
        if not ray.is_initialized():
            ray.init(
                address=c.address,
                num_cpus=None if c.address else c.num_cpus,
                include_dashboard=False,
                log_to_driver=False,
            )
        model_path, train_examples, eval_examples = self._model_and_data()
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        loader = PromptLoader(train_examples, t.prompts_per_step, shuffle=config.data.shuffle, seed=config.data.seed)
        log = config.logging
        tracker = Tracker(
            self.run_dir,
            asdict(config),
            project=log.project,
            entity=log.entity,
            name=log.run_name,
            tags=list(log.tags),
            mode=log.mode,
        )
        self._start_actors(model_path)
        advantage = get_advantage(config.algorithm.advantage)
        sampling = SamplingConfig(
            n=t.samples_per_prompt,
            temperature=r.temperature,
            max_tokens=r.max_response_length,
            logprobs_k=r.top_k_logprobs,
            seed=t.seed,
        )
        try:
            accuracy_start, samples = self.evaluate(tokenizer, eval_examples, 0)
            tracker.log({"eval/accuracy": accuracy_start}, step=0)
            tracker.table("eval/samples", ["prompt", "response", "reward"], samples, step=0)
            evals, metrics = [accuracy_start], {}
            for step in range(1, t.total_steps + 1):
                metrics = self._step(step, loader, tokenizer, sampling, advantage)
                if step % t.eval_every == 0 or step == t.total_steps:
                    accuracy, samples = self.evaluate(tokenizer, eval_examples, step)
                    evals.append(accuracy)
                    metrics["eval/accuracy"] = accuracy
                    tracker.table("eval/samples", ["prompt", "response", "reward"], samples, step=step)
                tracker.log(metrics, step=step)
                print(self._progress_line(step, metrics, started), flush=True)
                if t.checkpoint_every and step % t.checkpoint_every == 0:
                    self.learner.save_checkpoint(str(self.run_dir / "checkpoints"), step)
            checkpoint = self.learner.save_checkpoint(str(self.run_dir / "checkpoints"), t.total_steps)
            summary = {
                "eval_accuracy_start": accuracy_start,
                "eval_accuracy_end": evals[-1],
                "eval_accuracy_best": max(evals),
                "steps": t.total_steps,
                "wall_seconds": round(time.perf_counter() - started, 1),
                "rollout_learner_logprob_mismatch": metrics.get("actor/rollout_learner_logprob_mismatch"),
                "algorithm": config.algorithm.name,
                "wandb_dir": tracker.wandb_dir,
                "checkpoint": checkpoint,
                "model_path": model_path,
            }
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            return summary
        finally:
            tracker.finish()
            self.rewards.close()
            self.rollout.shutdown()
            self.learner.shutdown()

    def _step(self, step, loader, tokenizer, sampling, advantage) -> dict[str, float]:
        timings = {}
        clock = time.perf_counter()
        examples = loader.next_batch()
        step_sampling = dataclasses.replace(sampling, seed=sampling.seed + step * 100_003)
        batch = self.rollout.generate(self._encode(tokenizer, examples), step_sampling)
        timings["generate"] = time.perf_counter() - clock

        clock = time.perf_counter()
        golds = [e.answer for e in examples for _ in range(sampling.n)]
        outcomes = self.rewards.score(batch.response_texts, golds)
        batch.rewards = torch.tensor([o.reward for o in outcomes], dtype=torch.float32)
        std_norm = {"std_norm": self.config.algorithm.adv_std_norm} if self.config.algorithm.advantage == "grpo" else {}
        batch.advantages = advantage(batch.rewards, batch.group_index, **std_norm)
        timings["reward"] = time.perf_counter() - clock

        clock = time.perf_counter()
        actor = self.learner.train_on_batch(batch)
        timings["learner"] = time.perf_counter() - clock

        clock = time.perf_counter()
        sync = self.sync.sync(version=step)
        timings["sync"] = time.perf_counter() - clock

        lengths = batch.response_lengths.float()
        tokens = float(lengths.sum())
        reasons = [o.reason for o in outcomes]
        metrics = {
            "train/reward": float(batch.rewards.mean()),
            "train/response_length_mean": float(lengths.mean()),
            "train/response_length_max": float(lengths.max()),
            "train/truncated_frac": sum(f == "length" for f in batch.finish_reason) / batch.num_responses,
            "train/no_answer_frac": reasons.count("no_answer") / len(reasons),
            "train/constant_reward_groups": count_constant_groups(batch.rewards, batch.group_index),
            "train/advantage_abs_mean": float(batch.advantages.abs().mean()),
            "sync/bytes_per_s": sync.bytes_per_second,
            "policy_version": step,
            "perf/tokens_per_s": tokens / timings["generate"],
            **{f"time/{name}_s": seconds for name, seconds in timings.items()},
            **{f"actor/{name}": value for name, value in actor.items()},
        }
        return metrics

    def _progress_line(self, step: int, metrics: dict, started: float) -> str:
        elapsed = time.perf_counter() - started
        total = self.config.trainer.total_steps
        eta = elapsed / step * (total - step)
        accuracy = f" eval {metrics['eval/accuracy']:.3f}" if "eval/accuracy" in metrics else ""
        return (
            f"step {step}/{total}  reward {metrics['train/reward']:.3f}{accuracy}  "
            f"step {sum(v for k, v in metrics.items() if k.startswith('time/')):.1f}s  eta {eta:.0f}s"
        )
