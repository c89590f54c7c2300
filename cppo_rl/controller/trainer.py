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
from cppo_rl.config import TrainConfig, engine_config, learner_config, policy_loss_config, sampling_config
from cppo_rl.data.dataset import Example, PromptLoader, encode_prompts, load_examples, prompt_text
from cppo_rl.data_plane import RolloutRefs

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

    # -- set-up -------------------------------------------------------------------------------------

    def _model_and_data(self) -> tuple[str, list[Example], list[Example]]:
        from cppo_rl.data.arithmetic_task import write_dataset
        from cppo_rl.data.hub import resolve_model_path
        from cppo_rl.data.tiny_model import TinyModelConfig, build_tiny_model
        from cppo_rl.data.warmstart import WarmStartConfig, ensure_warm_model

        model, data = self.config.model, self.config.data
        task = self.config.data.task
        if model.path == "tiny":
            if model.warm_start:
                train = WarmStartConfig(
                    max_seconds=model.warm_start_max_seconds, target_accuracy=model.warm_start_target_accuracy
                )
                model_path = str(ensure_warm_model(TinyModelConfig(), task, train).path)
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

    def _placement(self):
        """One placement group holding every rollout engine and learner rank (so the run starts only when all
        of them fit; cppo_rl.controller.placement); returns the placed group."""
        from cppo_rl.controller.placement import place, placement_layout

        placed = place(placement_layout(self.config))
        self.placement_group = placed.group
        self.placement = placed.summary
        return placed

    def _start_actors(self, model_path: str) -> None:
        from cppo_rl.learner.worker import LearnerGroup
        from cppo_rl.rewards import RewardPool
        from cppo_rl.rollout.worker import RolloutGroup, WorkerLauncher

        c, r, lrn = self.config.cluster, self.config.rollout, self.config.learner
        use_gpu = c.num_gpus > 0
        placed = self._placement()
        engines, ranks = placed.layout.engines, placed.layout.learners
        self.rollout = RolloutGroup.start(
            WorkerLauncher(
                engine_config(self.config, model_path),
                c.cpus_per_engine,
                use_gpu,
                [placed.strategy(slot) for slot in engines],
                slots=engines,
                placed=placed,
            ),
            r.num_engines,
        )
        self.learner = LearnerGroup(
            learner_config(self.config, model_path),
            self.config.algorithm.name,
            self.loss_config,
            lrn.world_size,
            num_cpus_per_rank=c.cpus_per_learner,
            use_gpu=use_gpu,
            scheduling_strategies=[placed.strategy(slot) for slot in ranks],
            timeout_s=lrn.call_timeout_s,
            threads_per_rank=lrn.threads_per_rank,
        )
        self.sync = self._weight_sync()
        self.version = 0  # the policy version the engines hold
        self.engine_restarts = 0
        rw = self.config.reward
        self.rewards = RewardPool(rw.num_workers, rw.timeout_s, rw.memory_limit_mb, grader=rw.grader)

    def _restore(self, state: RunState, tracker_history: Path) -> None:
        """Learner state from the resume checkpoint (whose controller state is `state`), the engines
        re-synced to it, the local history rewound to it."""
        from cppo_rl.controller.tracker import rewind_history

        changed = config_changes(state.config, dataclasses.asdict(self.config))
        if changed:
            print("warning: resuming with a different configuration:\n  " + "\n  ".join(changed), flush=True)
        self.learner.load_checkpoint(str(self.resume_from))
        self._sync(state.step)
        source_run = self.resume_from.parent.parent
        source = None if source_run.resolve() == self.run_dir.resolve() else source_run / tracker_history.name
        rewind_history(tracker_history, state.step, source)
        print(f"resumed from {self.resume_from} (step {state.step})", flush=True)

    def _weight_sync(self):
        """A weight-sync channel between the current learner and engines (rebuilt when engines are replaced).
        Building it needs the learner's rank 0: if that actor is gone, ActorFailure (the run restarts
        from its latest checkpoint, `run_with_restarts`)."""
        import ray

        from cppo_rl.remote import ActorFailure
        from cppo_rl.sync.weight_sync import WeightSync

        lrn = self.config.learner
        try:
            return WeightSync(
                self.learner, self.rollout, lrn.sync_transport, lrn.sync_bucket_mb << 20, lrn.sync_timeout_s
            )
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as error:
            raise ActorFailure(f"building the weight sync: an actor died ({type(error).__name__}: {error})") from error

    # -- rollout engines that die or hang -------------------------------------------------------------

    def _generate(self, prompt_ids: list[list[int]], sampling) -> RolloutRefs:
        """`self.rollout.generate_refs`, replacing engines that die or hang (their chunks are generated again
        by the replacements, with the same per-prompt seeds and weights: the batch is the same). The
        finished chunks' tensors stay in the object store meanwhile (this process owns them)."""
        from cppo_rl.rollout.worker import RolloutWorkersLost

        finished = {}
        while True:
            try:
                return self.rollout.generate_refs(
                    prompt_ids, sampling, timeout_s=self.config.rollout.generate_timeout_s, finished=finished
                )
            except RolloutWorkersLost as lost:
                finished = lost.finished
                self._replace_engines(lost.workers, "; ".join(lost.causes))

    def _sync(self, version: int):
        """Sync the learner's weights to the engines as `version`.

        If that fails: with a learner rank gone (or not answering; on NCCL rank 0's watchdog tears its
        process down when a broadcast outlives the sync group's timeout), ActorFailure, and
        `run_with_restarts` starts the run again from its latest checkpoint. Otherwise, if an engine is
        gone, every engine is replaced (the survivors may be blocked in the broken collective until its
        timeout) and the weights are synced afresh over a new group."""
        import ray

        from cppo_rl.remote import ACTOR_GONE, ActorFailure, get_all

        try:
            stats = self.sync.sync(version)
        except (ActorFailure, ray.exceptions.RayError) as error:
            try:  # is the learner still there? (a failed broadcast leaves its ranks free once it raised)
                get_all([w.learning_rate.remote() for w in self.learner.workers], "probing the learner", 60.0)
            except (ActorFailure, *ACTOR_GONE) as learner_gone:
                raise ActorFailure(f"weight sync failed ({error}); the learner is gone: {learner_gone}") from error
            gone = self.rollout.unreachable_workers()
            if not gone:
                raise
            return self._replace_engines(
                list(range(len(self.rollout.workers))),
                f"weight sync failed ({error.__class__.__name__}) with workers {gone} gone",
                version,
            )
        self.version = version
        return stats

    def _replace_engines(self, indices: list[int], cause: str, version: int | None = None):
        """Start fresh engines in slots `indices`, rebuild the weight-sync group and sync the current weights
        (or `version`); returns that sync's stats."""
        from cppo_rl.remote import ActorFailure

        limit = self.config.rollout.max_engine_restarts
        if self.engine_restarts + len(indices) > limit:
            raise ActorFailure(
                f"rollout engines lost ({cause}) after {self.engine_restarts} restarts this run; "
                f"rollout.max_engine_restarts={limit} allows no more. Look at the workers' logs (ray logs) for why"
            )
        print(f"warning: {cause}: restarting rollout engines {indices}", flush=True)
        for index in indices:
            self.rollout.replace(index)
        self.engine_restarts += len(indices)
        self.sync = self._weight_sync()
        return self._sync(self.version if version is None else version)

    def _checkpoint(self, state: RunState) -> str:
        from cppo_rl.learner.checkpoint import prune

        root = self.run_dir / CHECKPOINTS
        path = self.learner.save_checkpoint(str(root), state.step, {"trainer": dataclasses.asdict(state)})
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
        batch = self._generate(self._encode(tokenizer, examples), sampling)
        golds = [e.answer for e in examples for _ in range(r.eval_samples)]
        outcomes = self.rewards.score(batch.response_texts, golds)
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

    def run(self) -> dict:
        import ray
        from transformers import AutoTokenizer

        from cppo_rl.controller.progress import Progress, StopRequests
        from cppo_rl.controller.tracker import Tracker
        from cppo_rl.learner.checkpoint import read_marker

        config, started = self.config, time.perf_counter()
        c, r, t = config.cluster, config.rollout, config.trainer
        if not ray.is_initialized():
            address = c.address or os.environ.get("RAY_ADDRESS")  # None: start a local cluster
            ray.init(
                address=address,
                num_cpus=None if address else c.num_cpus,
                num_gpus=None if address else c.num_gpus,
                include_dashboard=False,
                log_to_driver=False,
            )
        model_path, train_examples, eval_examples = self._model_and_data()
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        prompt_limit = r.max_model_len - r.max_response_length
        skipped_prompts = {}
        for split, examples in (("train", train_examples), ("eval", eval_examples)):
            lengths = [len(ids) for ids in self._encode(tokenizer, examples)]
            examples[:] = drop_long_prompts(examples, lengths, prompt_limit, split)
            skipped_prompts[split] = len(lengths) - len(examples)
        loader = PromptLoader(train_examples, t.prompts_per_step, shuffle=config.data.shuffle, seed=config.data.seed)
        saved = RunState(**read_marker(self.resume_from)["trainer"]) if self.resume_from else None
        log = config.logging
        settings = dataclasses.asdict(config)
        tracker = Tracker(
            self.run_dir,
            settings,
            project=log.project,
            entity=log.entity,
            name=log.run_name,
            tags=list(log.tags),
            mode=log.mode,
            run_id=saved.wandb_run_id if saved else None,
        )
        self._start_actors(model_path)
        advantage = get_advantage(config.algorithm.advantage)
        sampling = sampling_config(config, training=True, seed=t.seed)
        samples_columns = ["prompt", "response", "reward"]
        progress, checkpoint, phases = None, None, {}
        try:
            with StopRequests() as stop:
                if saved:
                    state = saved
                    self._restore(state, tracker.history_path)
                    loader.load_state_dict(state.loader)
                    elapsed_before = state.elapsed_seconds
                else:
                    eval_metrics, samples = self.evaluate(tokenizer, eval_examples, 0)
                    tracker.log(eval_metrics, step=0)
                    tracker.table("eval/samples", samples_columns, samples, step=0)
                    print(f"held-out accuracy before training: {eval_metrics['eval/accuracy']:.3f}", flush=True)
                    state = RunState(evals=[[0, eval_metrics["eval/accuracy"]]])
                    elapsed_before = 0.0
                state.wandb_run_id, state.config = tracker.run_id, settings
                first_step = state.step + 1
                progress = Progress(t.total_steps, first_step, t.progress_bar)
                metrics: dict[str, float] = {}
                skipped = SkippedUpdates(t.updates_per_rollout, t.max_skipped_steps)
                for step in range(first_step, t.total_steps + 1):
                    restarts_before = self.engine_restarts
                    metrics = self._step(step, loader, tokenizer, sampling, advantage)
                    skipped.check(step, metrics)
                    for name, seconds in metrics.items():
                        if name.startswith("time/"):
                            phases[name[5:-2]] = phases.get(name[5:-2], 0.0) + seconds
                    if (t.eval_every and step % t.eval_every == 0) or step == t.total_steps:
                        eval_metrics, samples = self.evaluate(tokenizer, eval_examples, step)
                        metrics.update(eval_metrics)
                        state.evals.append([step, eval_metrics["eval/accuracy"]])
                        tracker.table("eval/samples", samples_columns, samples, step=step)
                        tracker.position_profile(metrics, step)
                    metrics["rollout/engine_restarts"] = self.engine_restarts - restarts_before
                    tracker.log(metrics, step=step)
                    progress.update(step, metrics)
                    state.step, state.loader = step, loader.state_dict()
                    state.elapsed_seconds = elapsed_before + time.perf_counter() - started
                    due = t.checkpoint_every and step % t.checkpoint_every == 0
                    if due or stop.requested or step == t.total_steps:
                        checkpoint = self._checkpoint(state)
                    if stop.requested:
                        break
                progress.close()
                accuracies = [accuracy for _, accuracy in state.evals]
                summary = {
                    "eval_accuracy_start": accuracies[0],
                    "eval_accuracy_end": accuracies[-1],
                    "eval_accuracy_best": max(accuracies),
                    "steps": state.step,
                    "wall_seconds": round(elapsed_before + time.perf_counter() - started, 1),
                    "rollout_learner_logprob_mismatch": metrics.get("actor/rollout_learner_logprob_mismatch"),
                    "algorithm": config.algorithm.name,
                    **tracker.summary(),
                    "checkpoint": checkpoint,
                    "model_path": model_path,
                    "interrupted_by": stop.requested,
                    "resumed_from": str(self.resume_from) if self.resume_from else None,
                    "skipped_updates": skipped.total,
                    "engine_restarts": self.engine_restarts,
                    "restarts": self.restarts,
                    "placement": self.placement,
                    "skipped_long_prompts": skipped_prompts,
                    "mean_step_seconds": {
                        name: round(total / max(1, state.step + 1 - first_step), 3) for name, total in phases.items()
                    },
                }
                (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
                return summary
        finally:
            if progress is not None:
                progress.close()
            tracker.finish()
            self.rewards.close()
            self.rollout.shutdown()
            self.learner.shutdown()
            ray.util.remove_placement_group(self.placement_group)  # the next run of a --multirun needs it

    def _step(self, step, loader, tokenizer, sampling, advantage) -> dict[str, float]:
        timings = {}
        clock = started = time.perf_counter()
        examples = loader.next_batch()
        step_sampling = dataclasses.replace(sampling, seed=sampling.seed + step * 100_003)
        batch = self._generate(self._encode(tokenizer, examples), step_sampling)  # RolloutRefs: light parts here
        timings["generate"] = time.perf_counter() - clock

        clock = time.perf_counter()
        golds = [e.answer for e in examples for _ in range(sampling.n)]
        outcomes = self.rewards.score(batch.response_texts, golds)
        batch.rewards = torch.tensor([o.reward for o in outcomes], dtype=torch.float32)
        batch.advantages = advantage(batch.rewards, batch.group_index, std_norm=self.config.algorithm.adv_std_norm)
        timings["reward"] = time.perf_counter() - clock

        clock = time.perf_counter()
        actor = self.learner.train_on_batch(batch)  # by reference: each rank fetches the chunks of its rows
        timings["learner"] = time.perf_counter() - clock

        clock = time.perf_counter()
        sync = self._sync(step)
        timings["sync"] = time.perf_counter() - clock
        timings["step"] = time.perf_counter() - started
        return step_metrics(batch, outcomes, actor, timings, sync.bytes_per_second, step)


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
