"""The training loop: prompts -> rollouts -> rewards -> advantages -> learner updates -> weight sync.

`Trainer(config, run_dir).run()` owns the actors of one run (rollout engines, learner ranks, the
reward pool), evaluates Avg@k on the held-out split before training, every `trainer.eval_every`
steps and at the end, checkpoints, logs every step, and writes `summary.json`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import torch

from cppo_rl.algorithms import count_constant_groups, get_advantage
from cppo_rl.config import TrainConfig, policy_loss_config, sampling_config
from cppo_rl.data.dataset import Example, PromptLoader, encode_prompts, load_examples, prompt_text

CHECKPOINTS = "checkpoints"
# keys a resumed run may change without changing what it computes (everything else is warned about)
FREE_ON_RESUME = (
    "trainer.resume",
    "trainer.total_steps",
    "trainer.run_name",
    "trainer.output_dir",
    "trainer.progress_bar",
)
FREE_ON_RESUME_SECTIONS = ("logging.", "cluster.")


def find_resume_checkpoint(resume: str, run_dir: Path, clean: bool = True) -> Path | None:
    """The checkpoint `trainer.resume` asks for: None for "never" (or "auto" with none written yet),
    the latest complete one of this run for "auto" (half-written ones removed first when `clean`), or the
    one a path names (a checkpoint, a run directory or a checkpoint root)."""
    from cppo_rl.config import ConfigError
    from cppo_rl.learner.checkpoint import MARKER, clean_staging, latest_checkpoint

    if resume == "never":
        return None
    if resume == "auto":
        if clean:
            clean_staging(run_dir / CHECKPOINTS)
        return latest_checkpoint(run_dir / CHECKPOINTS)
    path = Path(resume)
    if not path.exists():
        raise ConfigError(f"trainer.resume={resume!r} is neither never, auto nor an existing checkpoint/run directory")
    if (path / MARKER).is_file():
        return path
    found = latest_checkpoint(path / CHECKPOINTS) or latest_checkpoint(path)
    if found is None:
        raise ConfigError(
            f"trainer.resume={resume!r}: no complete checkpoint there (looked for {MARKER} in {path}, "
            f"{path / CHECKPOINTS} and its step_* folders); give a run directory that has one, or use auto"
        )
    return found


def check_rollout_mode(checkpoint: Path, mode: str) -> None:
    """ConfigError when `checkpoint` carries rollouts generated ahead in another trainer.rollout_mode than
    `mode` (a lockstep batch and a free-running chunk are saved differently)."""
    from cppo_rl.config import ConfigError
    from cppo_rl.learner.checkpoint import ROLLOUTS_DIR, read_marker

    saved = read_marker(checkpoint)["trainer"].get("config", {}).get("trainer", {}).get("rollout_mode", "lockstep")
    if saved != mode and any((checkpoint / ROLLOUTS_DIR).glob("*.pt")):
        raise ConfigError(
            f"trainer.rollout_mode={mode}: {checkpoint} carries the rollouts a {saved} run generated ahead; resume "
            f"it with trainer.rollout_mode={saved} (a checkpoint without rollouts/ resumes in either mode)"
        )


def config_changes(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested config dicts (FREE_ON_RESUME keys excluded)."""
    changed = []
    for key in sorted(set(saved) | set(current)):
        name = f"{prefix}{key}"
        old, new = saved.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            changed += config_changes(old, new, name + ".")
        elif old != new and name not in FREE_ON_RESUME and not name.startswith(FREE_ON_RESUME_SECTIONS):
            changed.append(f"{name}: {old!r} -> {new!r}")
    return changed


def drop_long_prompts(examples: list[Example], lengths: list[int], limit: int, split: str) -> list[Example]:
    """The examples whose prompt (`lengths`, in tokens) fits in `limit` tokens; says how many were skipped
    and where the first one is. Raises ConfigError when none fits."""
    from cppo_rl.config import ConfigError

    kept = [e for e, n in zip(examples, lengths, strict=True) if n <= limit]
    if len(kept) < len(examples):
        first = next(e for e, n in zip(examples, lengths, strict=True) if n > limit)
        message = (
            f"{len(examples) - len(kept)} of {len(examples)} {split} prompts are longer than {limit} tokens "
            f"(rollout.max_model_len - rollout.max_response_length; the first is {first.source})"
        )
        if not kept:
            raise ConfigError(f"{message}: raise rollout.max_model_len or lower rollout.max_response_length")
        print(f"warning: {message}; they are skipped", flush=True)
    return kept


class NonFiniteError(RuntimeError):
    """Too many steps in a row had a non-finite loss or gradient in every update."""


class SkippedUpdates:
    """Counts updates the learner skipped for a non-finite loss or gradient (`actor/skipped_updates`)
    and stops the run after `max_steps` steps in a row with nothing applied (0: never)."""

    def __init__(self, updates_per_step: int, max_steps: int) -> None:
        self.updates_per_step, self.max_steps = updates_per_step, max_steps
        self.total, self.streak = 0, 0

    def check(self, step: int, metrics: dict[str, float]) -> None:
        skipped = round(metrics.get("actor/skipped_updates", 0.0))
        self.total += skipped
        self.streak = self.streak + 1 if skipped >= self.updates_per_step else 0
        if skipped:
            print(
                f"warning: step {step}: {skipped} of {self.updates_per_step} updates skipped "
                "(non-finite loss or gradient; weights unchanged by them)",
                flush=True,
            )
        if self.max_steps and self.streak >= self.max_steps:
            raise NonFiniteError(
                f"step {step}: every update of the last {self.streak} steps had a non-finite loss or gradient, so "
                f"the weights have not changed since step {step - self.streak}. Look for nan/inf in the rewards "
                "(reward.grader) or the data, lower learner.lr, or raise trainer.max_skipped_steps (0 = never stop)"
            )


@dataclasses.dataclass
class RunState:
    """What a resumed run needs besides the learner's state; stored in each checkpoint's marker.

    The controller has no free-running random state: rollout seeds derive from (trainer.seed, step)
    and the prompt order from (data.seed, epoch), so the loader position and the step restore them.
    The learner's torch RNG is in its DeepSpeed checkpoint.
    """

    step: int = 0
    loader: dict = dataclasses.field(default_factory=dict)
    evals: list[list[float]] = dataclasses.field(default_factory=list)  # [step, accuracy] pairs
    wandb_run_id: str | None = None
    elapsed_seconds: float = 0.0
    config: dict = dataclasses.field(default_factory=dict)


class Trainer:
    """One training run in `run_dir` (metrics.jsonl, summary.json, checkpoints/, wandb/)."""

    def __init__(self, config: TrainConfig, run_dir: Path, restarts: int = 0) -> None:
        self.config, self.run_dir, self.restarts = config, run_dir, restarts  # restarts: of this run so far
        self.loss_config = policy_loss_config(config)  # validates the algorithm's knobs up front
        self.resume_from = find_resume_checkpoint(config.trainer.resume, run_dir)
        if self.resume_from:
            check_rollout_mode(self.resume_from, config.trainer.rollout_mode)

    # -- set-up -------------------------------------------------------------------------------------

    def _model_and_data(self) -> tuple[str, list[Example], list[Example]]:
        from cppo_rl.data.arithmetic_task import write_dataset
        from cppo_rl.data.hub import resolve_model_path
        from cppo_rl.data.tiny_model import TinyModelConfig, build_tiny_model
        from cppo_rl.data.warmstart import ensure_for_run

        model, data = self.config.model, self.config.data
        task = self.config.data.task
        if model.path == "tiny":
            if model.warm_start:
                model_path = str(ensure_for_run(self.config).path)
            else:
                model_path = str(build_tiny_model(TinyModelConfig(), self.run_dir / "tiny_model"))
        else:  # a hub name becomes its snapshot directory, resolved once here for every role (cppo_rl.data.hub)
            model_path = str(resolve_model_path(model.path))
        generated = (
            write_dataset(task, self.run_dir / "data") if "generated" in data.train_files + data.eval_files else {}
        )

        def files(names: list[str], split: str) -> list[Example]:
            return load_examples(names, data, generated, split)

        return model_path, files(data.train_files, "train"), files(data.eval_files, "test")[: data.eval_prompts]

    def _restore(self, state: RunState, tracker_history: Path, pipeline) -> None:
        """Learner state from the resume checkpoint (whose controller state is `state`), the engines
        re-synced to it, the batches generated ahead back in `pipeline`, the local history rewound to it."""
        import ray

        from cppo_rl.controller.tracker import rewind_history
        from cppo_rl.data_plane import read_rollouts
        from cppo_rl.learner.checkpoint import ROLLOUTS_DIR

        changed = config_changes(state.config, dataclasses.asdict(self.config))
        if changed:
            print("warning: resuming with a different configuration:\n  " + "\n  ".join(changed), flush=True)
        self.roles.learner.load_checkpoint(str(self.resume_from))
        self.roles.sync(state.step)
        pipeline.restore(read_rollouts(self.resume_from / ROLLOUTS_DIR), ray.put)
        source_run = self.resume_from.parent.parent
        source = None if source_run.resolve() == self.run_dir.resolve() else source_run / tracker_history.name
        rewind_history(tracker_history, state.step, source)
        print(f"resumed from {self.resume_from} (step {state.step})", flush=True)

    def _checkpoint(self, state: RunState, pipeline) -> str:
        from cppo_rl.learner.checkpoint import prune

        root = self.run_dir / CHECKPOINTS
        metadata = {"trainer": dataclasses.asdict(state)}
        path = self.roles.learner.save_checkpoint(str(root), state.step, metadata, pipeline.saved())
        prune(root, self.config.trainer.keep_checkpoints)
        return path

    def _encode(self, tokenizer, examples: list[Example]) -> list[list[int]]:
        """Token ids of each example's chat prompt (cppo_rl.data.dataset.encode_prompts)."""
        return encode_prompts(tokenizer, examples, self.config.data)

    def resume_command(self) -> str:
        """The command line that continues this run: its own overrides, plus the run directory and resume."""
        import yaml

        overrides_file = self.run_dir / ".hydra" / "overrides.yaml"
        overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.is_file() else []
        kept = [o for o in overrides if o.split("=")[0].lstrip("+~") not in ("trainer.resume", "trainer.run_name")]
        t = self.config.trainer
        return " ".join(
            ["python -m cppo_rl.train", *kept, f"trainer.run_name={t.run_name}", "trainer.resume=auto"]
            if t.output_dir and self.run_dir == Path(t.output_dir) / t.run_name
            else ["python -m cppo_rl.train", *kept, f"trainer.resume={self.run_dir}"]
        )

    # -- the loop -----------------------------------------------------------------------------------

    def evaluate(self, tokenizer, examples: list[Example], step: int) -> tuple[dict[str, float], list[list]]:
        """Avg@k on `examples` at the eval temperature / top-p; returns metrics and sample rows. Only the
        texts, lengths and finish reasons come here: the token sets are never fetched."""
        r = self.config.rollout
        sampling = sampling_config(self.config, training=False, seed=10_000 + step)
        batch = self.roles.generate(self._encode(tokenizer, examples), sampling)
        golds = [e.answer for e in examples for _ in range(r.eval_samples)]
        outcomes = self.roles.rewards.score(batch.response_texts, golds)
        samples = [
            [prompt_text(examples[i // r.eval_samples]), batch.response_texts[i], outcomes[i].reward]
            for i in range(0, len(golds), r.eval_samples)
        ][:8]
        metrics = {
            "eval/accuracy": sum(o.reward for o in outcomes) / len(outcomes),
            "eval/response_length_mean": float(batch.response_lengths.float().mean()),
            "eval/truncated_frac": sum(f == "length" for f in batch.finish_reason) / batch.num_responses,
        }
        return metrics, samples

    def _prepare(self):
        """The model path, its tokenizer, and the train / eval examples whose prompts fit the context
        (with the count skipped per split)."""
        from transformers import AutoTokenizer

        r = self.config.rollout
        model_path, train_examples, eval_examples = self._model_and_data()
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        prompt_limit = r.max_model_len - r.max_response_length
        skipped_prompts = {}
        for split, examples in (("train", train_examples), ("eval", eval_examples)):
            lengths = [len(ids) for ids in self._encode(tokenizer, examples)]
            examples[:] = drop_long_prompts(examples, lengths, prompt_limit, split)
            skipped_prompts[split] = len(lengths) - len(examples)
        return model_path, tokenizer, train_examples, eval_examples, skipped_prompts

    def _tracker(self, saved: RunState | None):
        from cppo_rl.controller.tracker import Tracker

        log = self.config.logging
        return Tracker(
            self.run_dir,
            dataclasses.asdict(self.config),
            project=log.project,
            entity=log.entity,
            name=log.run_name,
            tags=list(log.tags),
            mode=log.mode,
            run_id=saved.wandb_run_id if saved else None,
        )

    def run(self) -> dict:
        """Start Ray and the roles, evaluate, train up to `trainer.total_steps`, write summary.json. The roles
        and the W&B run are released on the way out, whatever happened (a role that fails to start too)."""
        from cppo_rl.controller.progress import StopRequests
        from cppo_rl.controller.roles import Roles
        from cppo_rl.controller.startup import Startup
        from cppo_rl.learner.checkpoint import read_marker

        self.started = time.perf_counter()
        self.startup = Startup(self.config.cluster.startup_timeout_s)
        import ray

        address = self.config.cluster.address or os.environ.get("RAY_ADDRESS") or "a new local cluster"
        with self.startup.phase(
            f"connect to Ray ({'connected already' if ray.is_initialized() else address})",
            "Ray to start or answer",
            "check cluster.address / RAY_ADDRESS and that `ray status` answers there (RAY_AUTH_MODE=token and the "
            "cluster's token for a Ray 2.60 head: docs/launch.md)",
        ):
            start_ray(self.config.cluster)
        model_path, tokenizer, train_examples, eval_examples, skipped_prompts = self._prepare()
        t, data = self.config.trainer, self.config.data
        loader = PromptLoader(train_examples, t.prompts_per_step, shuffle=data.shuffle, seed=data.seed)
        saved = RunState(**read_marker(self.resume_from)["trainer"]) if self.resume_from else None
        tracker = self._tracker(saved)
        try:
            roles = Roles.start(self.config, model_path, self.loss_config, self.startup)
            with roles as self.roles, StopRequests() as stop:
                summary = self._train(tokenizer, loader, eval_examples, tracker, saved, stop)
                summary.update(model_path=model_path, skipped_long_prompts=skipped_prompts)
                (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
                return summary
        finally:
            tracker.finish()

    def _train(self, tokenizer, loader, eval_examples, tracker, saved: RunState | None, stop) -> dict:
        """The loop: (restore or evaluate), then per step train, evaluate when due, log, checkpoint."""
        from cppo_rl.controller.progress import Progress

        config, t = self.config, self.config.trainer
        pipeline = self._pipeline(tokenizer, loader)
        state = self._begin(tokenizer, eval_examples, tracker, saved, pipeline)
        elapsed_before = state.elapsed_seconds
        state.wandb_run_id, state.config = tracker.run_id, dataclasses.asdict(config)
        pipeline.fill(state.step + 1)
        first_step, checkpoint, totals = state.step + 1, None, PipelineTotals()
        progress = Progress(t.total_steps, first_step, t.progress_bar)
        skipped = SkippedUpdates(t.updates_per_rollout, t.max_skipped_steps)
        metrics: dict[str, float] = {}
        try:
            for step in range(first_step, t.total_steps + 1):
                restarts_before = self.roles.engine_restarts
                metrics = self._step(step, pipeline)
                skipped.check(step, metrics)
                totals.add(metrics)
                if (t.eval_every and step % t.eval_every == 0) or step == t.total_steps:
                    state.evals.append([step, self._evaluate_and_log(tokenizer, eval_examples, tracker, step, metrics)])
                    tracker.staleness_chart(totals.rows, step)
                metrics["rollout/engine_restarts"] = self.roles.engine_restarts - restarts_before
                tracker.log(metrics, step=step)
                progress.update(step, metrics)
                state.step, state.loader = step, loader.state_dict()
                state.elapsed_seconds = elapsed_before + time.perf_counter() - self.started
                due = t.checkpoint_every and step % t.checkpoint_every == 0
                if due or stop.requested or step == t.total_steps:
                    checkpoint = self._checkpoint(state, pipeline)
                if stop.requested:
                    break
        finally:
            progress.close()
        accuracies = [accuracy for _, accuracy in state.evals]
        return {
            "eval_accuracy_start": accuracies[0],
            "eval_accuracy_end": accuracies[-1],
            "eval_accuracy_best": max(accuracies),
            "steps": state.step,
            "wall_seconds": round(elapsed_before + time.perf_counter() - self.started, 1),
            "rollout_learner_logprob_mismatch": metrics.get("actor/rollout_learner_logprob_mismatch"),
            "algorithm": config.algorithm.name,
            **tracker.summary(),
            "checkpoint": checkpoint,
            "interrupted_by": stop.requested,
            "resumed_from": str(self.resume_from) if self.resume_from else None,
            "skipped_updates": skipped.total,
            "engine_restarts": self.roles.engine_restarts,
            "restarts": self.restarts,
            "placement": self.roles.placement,
            "max_staleness": t.max_staleness,
            "rollout_mode": t.rollout_mode,
            **pipeline.run_stats(),
            **totals.summary(),
            "startup_seconds": self.startup.seconds,
        }

    def _pipeline(self, tokenizer, loader):
        """The rollout pipeline of `trainer.rollout_mode`: LockstepPipeline or FreePipeline."""
        from cppo_rl.config import chunk_prompts
        from cppo_rl.controller.free_pipeline import FreePipeline
        from cppo_rl.controller.pipeline import LockstepPipeline

        config, t = self.config, self.config.trainer
        common = (
            self.roles,
            loader,
            lambda examples: self._encode(tokenizer, examples),
            sampling_config(config, training=True, seed=t.seed),
            get_advantage(config.algorithm.advantage),
            config.algorithm.adv_std_norm,
            t.max_staleness,
            t.total_steps,
        )
        if t.rollout_mode == "lockstep":
            return LockstepPipeline(*common)
        return FreePipeline(
            *common, t.prompts_per_step, chunk_prompts(config), t.stale_policy, config.rollout.generate_timeout_s
        )

    def _begin(self, tokenizer, eval_examples, tracker, saved: RunState | None, pipeline) -> RunState:
        """The state the first step starts from: restored from the resume checkpoint (the learner, the engines'
        weights, the batches generated ahead), or a fresh one after the held-out evaluation before training;
        each a start-up phase."""
        if saved:
            with self.startup.phase(
                f"restore step {saved.step}",
                f"the learner to load {self.resume_from} and the engines to receive its weights",
                "read the LearnerWorker actors' logs; the checkpoint must be on a filesystem every rank reads",
            ):
                self._restore(saved, tracker.history_path, pipeline)
            pipeline.loader.load_state_dict(saved.loader)
            return saved
        if tracker.history_path.is_file() and tracker.history_path.stat().st_size:
            # an earlier attempt in this directory that died before its first checkpoint: its steps are not resumed
            print(f"starting over: {tracker.history_path} held steps of an attempt with no checkpoint", flush=True)
            tracker.history_path.unlink()
        r = self.config.rollout
        with self.startup.phase(
            "first generation (the held-out evaluation before training)",
            f"{len(eval_examples)} prompts x {r.eval_samples} samples from the engines, then rewards",
            "read the RolloutWorker actors' logs; lower data.eval_prompts or raise rollout.generate_timeout_s",
            r.generate_timeout_s,
        ):
            return RunState(evals=[[0, self._evaluate_and_log(tokenizer, eval_examples, tracker, 0, {})]])

    def _evaluate_and_log(self, tokenizer, examples: list[Example], tracker, step: int, metrics: dict) -> float:
        """Evaluate at `step`, add the eval metrics to `metrics`, log the sample table (and at step 0 the
        metrics themselves); returns the accuracy."""
        eval_metrics, samples = self.evaluate(tokenizer, examples, step)
        metrics.update(eval_metrics)
        tracker.table("eval/samples", ["prompt", "response", "reward"], samples, step=step)
        if step == 0:
            tracker.log(eval_metrics, step=0)
            print(f"held-out accuracy before training: {eval_metrics['eval/accuracy']:.3f}", flush=True)
        else:
            tracker.position_profile(metrics, step)
        return eval_metrics["eval/accuracy"]

    def _step(self, step: int, pipeline) -> dict[str, float]:
        """One training step: take the batch of `step` (generated ahead, or now), train on it while the engines
        generate ahead (within trainer.max_staleness), drain them (free mode), sync the weights as version
        `step`, and let the engines go on."""
        learner = self.roles.learner
        started = time.perf_counter()
        rollout = pipeline.take(step)  # a RolloutRefs with rewards and advantages: only light parts here
        queued_s = time.monotonic() - rollout.ready_at
        ahead = pipeline.start_ahead(step)
        clock = time.perf_counter()
        training = learner.start_training(rollout.refs)  # by reference: each rank fetches its rows' chunks
        ahead_s = pipeline.finish_ahead(ahead, training)  # while the learner trains
        actor = learner.training_result(training)
        learner_s = time.perf_counter() - clock
        drain_s = pipeline.before_sync()
        clock = time.perf_counter()
        sync = self.roles.sync(step)
        sync_s = time.perf_counter() - clock
        ahead_s += pipeline.after_sync()
        step_s = time.perf_counter() - started
        timings = {
            "generate": rollout.generate_s,
            "reward": rollout.reward_s,
            "learner": learner_s,
            "drain": drain_s,
            "sync": sync_s,
            "step": step_s,
        }
        staleness = (step - 1 - rollout.refs.row_versions).float()
        rollout_side = pipeline.step_stats()
        pipeline_metrics = {
            "pipeline/staleness_mean": float(staleness.mean()),
            "pipeline/staleness_max": float(staleness.max()),
            "pipeline/generated_by_version": float(rollout.version),
            "pipeline/in_flight_s": rollout.generate_s,
            "pipeline/queue_s": queued_s,
            "pipeline/ahead_generate_s": ahead_s,
            "pipeline/dropped_prompts": rollout_side["dropped_prompts"],
            # each role's busy seconds in this step (the weight sync keeps both busy)
            "pipeline/rollout_busy_s": rollout_side["rollout_busy_s"] + sync_s,
            "pipeline/learner_busy_s": actor.get("busy_s", learner_s) + sync_s,
        }
        metrics = step_metrics(rollout.refs, rollout.outcomes, actor, timings, sync.bytes_per_second, step)
        return {**metrics, **pipeline_metrics}


class PipelineTotals:
    """Run totals of the pipeline metrics: staleness over trained samples, each role's idle share of the
    steps' wall time, and the (staleness, masked fraction) points of the W&B chart."""

    def __init__(self) -> None:
        self.steps, self.wall, self.staleness_sum, self.staleness_max = 0, 0.0, 0.0, 0.0
        self.busy = {"rollout": 0.0, "learner": 0.0}
        self.queue, self.in_flight = 0.0, 0.0
        self.phases: dict[str, float] = {}
        self.rows: list[list[float]] = []  # [step, staleness, masked fraction]

    def add(self, metrics: dict[str, float]) -> None:
        self.steps += 1
        self.wall += metrics["time/step_s"]
        self.staleness_sum += metrics["pipeline/staleness_mean"]
        self.staleness_max = max(self.staleness_max, metrics["pipeline/staleness_max"])
        for role in self.busy:
            self.busy[role] += metrics[f"pipeline/{role}_busy_s"]
        self.queue += metrics["pipeline/queue_s"]
        self.in_flight += metrics["pipeline/in_flight_s"]
        for name, seconds in metrics.items():
            if name.startswith("time/"):
                self.phases[name[5:-2]] = self.phases.get(name[5:-2], 0.0) + seconds
        self.rows.append(
            [metrics["policy_version"], metrics["pipeline/staleness_mean"], metrics.get("actor/masked_frac", 0.0)]
        )

    def summary(self) -> dict:
        """summary.json's staleness, idle_fraction, seconds in queue / in flight, and mean step seconds."""
        steps, wall = max(1, self.steps), max(self.wall, 1e-9)
        return {
            "staleness": {"mean": self.staleness_sum / steps, "max": self.staleness_max},
            "idle_fraction": {role: round(max(0.0, 1 - busy / wall), 4) for role, busy in self.busy.items()},
            "sample_seconds": {"in_queue": round(self.queue / steps, 3), "in_flight": round(self.in_flight / steps, 3)},
            "mean_step_seconds": {name: round(total / steps, 3) for name, total in self.phases.items()},
        }


def start_ray(cluster) -> None:
    """Connect to `cluster.address` (or $RAY_ADDRESS), or start a local cluster with the section's CPUs and
    GPUs; nothing when Ray is already initialised."""
    import ray

    if ray.is_initialized():
        return
    address = cluster.address or os.environ.get("RAY_ADDRESS")  # None: start a local cluster
    ray.init(
        address=address,
        num_cpus=None if address else cluster.num_cpus,
        num_gpus=None if address else cluster.num_gpus,
        include_dashboard=False,
        log_to_driver=False,
    )


def step_metrics(batch, outcomes, actor: dict[str, float], timings: dict[str, float], sync_rate: float, step: int):
    """The metrics logged for one training step (names as in docs/training.md); `batch`: a RolloutRefs
    (or RolloutBatch) with rewards and advantages: only its light attributes are read."""
    lengths = batch.response_lengths.float()
    quantiles = torch.quantile(lengths, torch.tensor([0.1, 0.5, 0.9]))
    reasons = [o.reason for o in outcomes]
    advantages = batch.advantages
    return {
        "train/reward": float(batch.rewards.mean()),
        "train/reward_std": float(batch.rewards.std()) if batch.num_responses > 1 else 0.0,
        "train/response_length_mean": float(lengths.mean()),
        "train/response_length_min": float(lengths.min()),
        "train/response_length_p10": float(quantiles[0]),
        "train/response_length_p50": float(quantiles[1]),
        "train/response_length_p90": float(quantiles[2]),
        "train/response_length_max": float(lengths.max()),
        "train/truncated_frac": sum(f == "length" for f in batch.finish_reason) / batch.num_responses,
        "train/no_answer_frac": reasons.count("no_answer") / len(reasons),
        "train/reward_failure_frac": sum(r in ("timeout", "crashed", "error") for r in reasons) / len(reasons),
        "train/constant_reward_groups": count_constant_groups(batch.rewards, batch.group_index),
        "train/advantage_mean": float(advantages.mean()),
        "train/advantage_std": float(advantages.std()) if batch.num_responses > 1 else 0.0,
        "train/advantage_abs_mean": float(advantages.abs().mean()),
        "train/advantage_max": float(advantages.max()),
        "train/advantage_min": float(advantages.min()),
        "sync/bytes_per_s": sync_rate,
        "policy_version": step,
        "perf/tokens_per_s": float(lengths.sum()) / timings["generate"],
        **{f"time/{name}_s": seconds for name, seconds in timings.items()},
        **{f"actor/{name}": value for name, value in actor.items()},
    }


def run_with_restarts(config: TrainConfig, run_dir: Path) -> tuple[dict, Trainer]:
    """`Trainer.run`, started again from the run's latest complete checkpoint when an actor dies or hangs
    (a learner rank, or rollout engines beyond `rollout.max_engine_restarts`), up to
    `trainer.max_restarts` times. Returns the summary and the trainer that finished."""
    from cppo_rl.learner.checkpoint import latest_checkpoint
    from cppo_rl.remote import ActorFailure

    restarts = 0
    while True:
        trainer = Trainer(config, run_dir, restarts)
        try:
            return trainer.run(), trainer
        except ActorFailure as failure:
            if restarts >= config.trainer.max_restarts:
                raise
            restarts += 1
            # from this run's own latest checkpoint; with none yet, the run starts as it first did
            resume = "auto" if latest_checkpoint(run_dir / CHECKPOINTS) else config.trainer.resume
            print(
                f"warning: {failure}\nrestart {restarts} of trainer.max_restarts={config.trainer.max_restarts}: "
                f"starting again from {latest_checkpoint(run_dir / CHECKPOINTS) or 'the start'}",
                flush=True,
            )
            config = dataclasses.replace(config, trainer=dataclasses.replace(config.trainer, resume=resume))
