"""The learner: DeepSpeed ZeRO-3 ranks that train the policy on rollout batches.

`LearnerWorker` is one rank (a plain class; `LearnerGroup` runs one per Ray actor). The ranks form a
torch.distributed group (`distributed.py`: gloo on CPU, nccl on GPU) and wrap the policy in ZeRO stage 3
(`ds_config.py`).

One `train_on_batch(batch)`: the batch (N responses, prompt groups adjacent) is cut into
`updates_per_rollout` contiguous mini-batches; each rank takes a contiguous 1/world share of a
mini-batch and runs it in micro-batches of `micro_batch_size` responses (or, with
`max_tokens_per_micro_batch`, rows balanced across ranks by tokens in micro-batches of that token budget:
`micro_batches.py`), then the optimizer steps once per mini-batch (`step.py`: log pi at mu's token
sets without [B, T, V] logits, the policy loss from the registry with global normalisers, backward).
Weight export for the sync and checkpoints: `weights.py`, `checkpoint.py`.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from cppo_rl.algorithms import PolicyLossConfig, get_policy_loss
from cppo_rl.batch import RolloutBatch
from cppo_rl.config import AlgorithmConfig, LearnerSettings, RolloutConfig, TrainerConfig
from cppo_rl.data_plane import RolloutRefs, RolloutSource, SavedRollouts, write_rollouts
from cppo_rl.learner import distributed, step, weights
from cppo_rl.learner.checkpoint import ROLLOUTS_DIR, finalize, staging_dir
from cppo_rl.learner.ds_config import deepspeed_config
from cppo_rl.learner.logprobs import LogprobPolicy
from cppo_rl.learner.micro_batches import Batching
from cppo_rl.learner.moe import mark_leaf_modules
from cppo_rl.remote import get_all
from cppo_rl.sync.buckets import BucketPlan
from cppo_rl.sync.transport import DEFAULT_SYNC_TIMEOUT_S, join_sync_group


@dataclass(kw_only=True)
class LearnerConfig(LearnerSettings):
    """The run's `learner` section (cppo_rl.config.LearnerSettings: its defaults, its keys) plus what a rank
    derives from the other sections; `cppo_rl.config.learner_config` builds it. Sizes in responses.

    model_path:             HF directory (or hub name) of the initial policy
    responses_per_step:     N of one rollout batch (prompts per step x samples per prompt)
    updates_per_rollout:    optimizer steps per rollout batch (the off-policy degree)
    total_steps:            optimizer steps of the whole run (the end of a cosine schedule)
    temperature:            the rollout temperature, applied to the learner's logits
    anchor:                 "rollout": trust region around mu's logprobs; "recompute": around the
                            learner's own logprobs before the first update of each batch
    backend:                "auto": nccl on GPU, gloo on CPU
    betas:                  AdamW's
    seed:                   torch seed of every rank
    """

    model_path: str
    responses_per_step: int
    updates_per_rollout: int = 1
    total_steps: int = TrainerConfig.total_steps
    temperature: float = RolloutConfig.temperature
    anchor: str = AlgorithmConfig.anchor
    backend: str = "auto"
    betas: tuple[float, float] = (0.9, 0.999)
    seed: int = TrainerConfig.seed

    @property
    def batching(self) -> Batching:
        """How a rank cuts its share of a mini-batch into micro-batches (cppo_rl/learner/micro_batches.py)."""
        return Batching(self.micro_batch_size, self.max_tokens_per_micro_batch, self.pack_sequences, self.share_prompts)

    def micro_steps(self, world_size: int) -> int:
        """Micro-batches per rank per mini-batch (DeepSpeed's gradient accumulation steps; 1 with a token budget,
        whose plans vary: the learner marks each mini-batch's last micro-step itself); raises naming the
        user's keys whose sizes do not divide."""
        caller = "LearnerConfig"
        minibatch, remainder = divmod(self.responses_per_step, self.updates_per_rollout)
        if remainder or minibatch == 0:
            raise ValueError(
                f"{caller}: {self.responses_per_step} responses per step do not split into {self.updates_per_rollout} "
                "updates; make trainer.prompts_per_step a multiple of trainer.minibatch_prompts"
            )
        share, remainder = divmod(minibatch, world_size)
        if remainder or share == 0:
            raise ValueError(
                f"{caller}: a mini-batch of {minibatch} responses (trainer.minibatch_prompts x "
                f"trainer.samples_per_prompt) does not split over learner.world_size={world_size} ranks"
            )
        if self.max_tokens_per_micro_batch:
            return 1
        steps, remainder = divmod(share, self.micro_batch_size)
        if remainder or steps == 0:
            raise ValueError(
                f"{caller}: a rank's {share} responses per mini-batch (trainer.minibatch_prompts x "
                f"trainer.samples_per_prompt / learner.world_size) are not a multiple of "
                f"`micro_batch_size`={self.micro_batch_size}; choose one dividing {share}"
            )
        return steps

    def __post_init__(self) -> None:
        choices = {
            "backend": ("auto", "gloo", "nccl"),
            "dtype": ("auto", "float32", "bfloat16"),
            "optimizer": ("adamw", "sgd"),
            "lr_schedule": ("constant", "cosine"),
            "anchor": ("rollout", "recompute"),
            "zero_stage": (0, 1, 2, 3),
        }
        problems = [
            f"`{name}`={getattr(self, name)!r}: use one of {allowed}"
            for name, allowed in choices.items()
            if getattr(self, name) not in allowed
        ]
        at_least = {
            "responses_per_step": (1, self.responses_per_step),
            "updates_per_rollout": (1, self.updates_per_rollout),
            "micro_batch_size": (1, self.micro_batch_size),
            "max_tokens_per_micro_batch": (0, self.max_tokens_per_micro_batch),
            "total_steps": (1, self.total_steps),
            "logprob_chunk_size": (1, self.logprob_chunk_size),
            "grad_clip": (0, self.grad_clip),
            "warmup_steps": (0, self.warmup_steps),
            "weight_decay": (0, self.weight_decay),
        }
        problems += [
            f"`{name}`={value} must be >= {low}" for name, (low, value) in at_least.items() if not value >= low
        ]
        problems += [
            f"`{name}`={getattr(self, name)} must be > 0"
            for name in ("lr", "temperature")
            if not getattr(self, name) > 0
        ]
        if self.share_prompts and self.pack_sequences:
            problems.append("`share_prompts` and `pack_sequences` are two layouts of the forward rows; choose one")
        if self.share_prompts and self.attn_implementation not in ("auto", "sdpa"):
            problems.append(
                f"`share_prompts` computes attention with its own SDPA-based kernel (learner/shared_prefix.py), not "
                f"`attn_implementation`={self.attn_implementation!r}; set `attn_implementation` to auto (or sdpa)"
            )
        if problems:
            raise ValueError("LearnerConfig: " + "\n".join(problems))  # one problem a line


class LearnerWorker:
    """One ZeRO-3 rank. Construct on every rank, then call `setup` on all of them together."""

    def __init__(self, config: LearnerConfig, loss_name: str, loss_config: PolicyLossConfig, rank: int, world: int):
        self.config, self.rank, self.world_size = config, rank, world
        self.loss_fn = get_policy_loss(loss_name)
        self.loss_config = loss_config
        self.engine = None
        self._sync_group = None
        self.steps = 0

    @staticmethod
    def free_address() -> tuple[str, int]:
        """This node's IP and a free TCP port: the rendezvous address when this is rank 0."""
        return distributed.free_address()

    def setup(self, master_addr: str, master_port: int) -> None:
        """Join the process group and build the ZeRO-3 engine (a collective: all ranks at once)."""
        on_gpu = torch.cuda.is_available()
        config = self.config
        backend = distributed.backend_for(config.backend, on_gpu)
        distributed.init_process_group(master_addr, master_port, self.rank, self.world_size, backend, on_gpu)
        import deepspeed
        from transformers import AutoModelForCausalLM
        from transformers.integrations import HfDeepSpeedConfig

        dtype = distributed.dtype_for(config.dtype, on_gpu)
        torch.manual_seed(config.seed)
        ds_config = deepspeed_config(config, config.micro_steps(self.world_size), dtype)
        keep_alive = HfDeepSpeedConfig(ds_config)  # makes from_pretrained partition the weights (ZeRO-3 init)
        attention = distributed.attn_implementation_for(
            config.attn_implementation, on_gpu, share_prompts=config.share_prompts
        )
        model = AutoModelForCausalLM.from_pretrained(
            config.model_path, dtype=getattr(torch, dtype), attn_implementation=attention
        )
        del keep_alive
        self.moe_leaf_modules = mark_leaf_modules(model)
        # an MoE's router load-balancing loss joins the policy loss (LogprobPolicy always asks an MoE for its
        # router logits); null takes the model config's coefficient even where output_router_logits is false
        self.router_aux_coef = distributed.router_aux_coef_for(config.router_aux_loss_coef, model.config)
        if self.moe_leaf_modules and self.rank == 0:
            source = "learner.router_aux_loss_coef" if config.router_aux_loss_coef is not None else "the model config"
            print(
                f"learner: MoE model, router aux-loss coefficient {self.router_aux_coef:g} (from {source}"
                f"{'; 0 = off' if not self.router_aux_coef else ''}), attention {attention}, {dtype}",
                flush=True,
            )
        if config.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        model = LogprobPolicy(model, config.logprob_chunk_size)
        optimizer = self._optimizer(model)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self._lr_factor)
        self.engine, *_ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
        )
        self.step_context = step.StepContext(
            engine=self.engine,
            loss_fn=self.loss_fn,
            loss_config=self.loss_config,
            world_size=self.world_size,
            temperature=config.temperature,
            router_aux_coef=self.router_aux_coef,
            pack_sequences=config.pack_sequences,
            share_prompts=config.share_prompts,
        )

    def _optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        config = self.config
        if config.optimizer == "sgd":
            return torch.optim.SGD(model.parameters(), lr=config.lr)
        return torch.optim.AdamW(model.parameters(), lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)

    def _lr_factor(self, update: int) -> float:
        config = self.config
        if update < config.warmup_steps:
            return (update + 1) / config.warmup_steps
        if config.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (update - config.warmup_steps) / max(1, config.total_steps - config.warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    # -- training -----------------------------------------------------------------------------------

    def train_on_batch(self, batch: RolloutBatch) -> dict[str, float]:
        """`updates_per_rollout` optimizer steps on `batch` (which must carry advantages).

        Returns metrics averaged over the batch's valid tokens (all ranks), including
        `rollout_learner_logprob_mismatch` (mean |log mu - log pi| on the first mini-batch before its
        update), `rollout_learner_topk_tv`, `topk_tv` (mu against the current pi over every micro-batch) and
        `skipped_updates` (updates not applied because their
        loss or gradient was not finite), and `busy_s`, this rank's seconds in the call.
        """
        started = time.perf_counter()
        self._check_batch("train_on_batch", batch.num_responses, batch.advantages)
        config = self.config
        shards = step.split_shards(
            batch, config.updates_per_rollout, self.rank, self.world_size, self.loss_config.horizon, config.batching
        )
        return {**self.train_on_shards(shards), "busy_s": time.perf_counter() - started}

    def _check_batch(self, caller: str, num_responses: int, advantages: torch.Tensor | None) -> None:
        if advantages is None:
            raise ValueError(f"LearnerWorker.{caller}: the batch has no advantages; compute them first")
        if num_responses != self.config.responses_per_step:
            raise ValueError(
                f"LearnerWorker.{caller}: got {num_responses} responses, configured for "
                f"responses_per_step={self.config.responses_per_step}"
            )

    def train_on_refs(self, source: RolloutSource) -> dict[str, float]:
        """`train_on_batch` on a batch held by reference (cppo_rl/data_plane.py): this rank fetches only the
        engine chunks that hold its rows; the global normalisers come from the per-row lengths. The same
        update and metrics as `train_on_batch` of the whole batch."""
        from cppo_rl.learner.shards import shards_from_source

        started = time.perf_counter()
        self._check_batch("train_on_refs", source.num_responses, source.advantages)
        config = self.config
        shards = shards_from_source(
            source, config.updates_per_rollout, self.rank, self.world_size, self.loss_config.horizon, config.batching
        )
        return {**self.train_on_shards(shards), "busy_s": time.perf_counter() - started}

    def train_on_shards(self, shards: list[step.Shard]) -> dict[str, float]:
        """`train_on_batch` on this rank's shards (one per update, in order), already cut from the batch."""
        if self.config.anchor == "recompute":
            for shard in shards:
                shard.anchor = self._recompute_anchor(shard.batch)
        self.engine.train()
        device = self.engine.device  # metrics stay there until the one all-reduce (NCCL has no CPU backend)
        totals: dict[str, torch.Tensor] = {}
        skipped_before = self.engine.skipped_steps
        planned = self.config.max_tokens_per_micro_batch > 0
        for shard in shards:
            last = len(shard.micro_batches) - 1
            for index, rows in enumerate(shard.micro_batches):
                micro = shard.batch.select(rows)
                anchor = None
                if shard.anchor is not None:
                    picked = torch.tensor(rows, device=shard.anchor[0].device)
                    anchor = tuple(a[picked, : micro.response_ids.shape[1]] for a in shard.anchor)
                if planned:  # the plan's micro-step count varies: mark the update's last one (DeepSpeed's
                    # DeepSpeedEngine.set_gradient_accumulation_boundary, runtime/engine.py, 0.19.8)
                    self.engine.set_gradient_accumulation_boundary(index == last)
                metrics = step.micro_step(self.step_context, micro, shard, anchor)
                for name, value in metrics.items():
                    totals[name] = totals[name] + value if name in totals else value
            self.steps += 1
            grad_norm = self.engine.get_global_grad_norm()  # of the update just applied, before clipping
            if grad_norm is not None and math.isfinite(grad_norm):  # mean over applied updates (same on every rank)
                pair = torch.tensor([float(grad_norm), 1.0], device=device)
                totals["grad_norm"] = totals["grad_norm"] + pair if "grad_norm" in totals else pair
        # DeepSpeed skips an update whose global gradient norm is inf / nan (weights, optimizer state and
        # lr schedule unchanged); each rank counts the same updates, so the all-reduced mean is the count
        skipped = float(self.engine.skipped_steps - skipped_before)
        totals["skipped_updates"] = torch.tensor([skipped, 1.0], device=device)
        metrics = step.reduce_metrics(totals, self.world_size, device)
        metrics["lr"] = self.learning_rate()
        return metrics

    def _recompute_anchor(self, shard: RolloutBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The learner's own (sampled, set) logprobs of a shard before any update of this batch, on the
        learner's device (the micro-steps use them there)."""
        config, device = self.config, self.engine.device
        set_logprobs = step.batch_logprobs(self.engine, shard, config.micro_batch_size, config.temperature)
        mask = shard.response_mask.to(device, non_blocking=True)
        return torch.where(mask, set_logprobs[..., 0], torch.zeros((), device=device)), set_logprobs

    def logprobs(self, batch: RolloutBatch) -> torch.Tensor:
        """float32 [N, T, S] log pi at `batch.topk_ids` with the current weights, on the host (callers get it
        through Ray; all ranks must call: each computes the whole batch, since ZeRO-3 forwards are collective)."""
        config = self.config
        return step.batch_logprobs(self.engine, batch, config.micro_batch_size, config.temperature).cpu()

    # -- weights --------------------------------------------------------------------------------------

    def gather_weights(self, names: Sequence[str] | None = None) -> list[tuple[str, torch.Tensor]]:
        """Full (unpartitioned) parameters by HF name, on rank 0; [] on other ranks. All ranks must call."""
        return weights.gather_weights(self.engine.module, self.rank, names)

    def weight_plan(self, budget_bytes: int) -> BucketPlan:
        """The bucket plan of a weight sync: every parameter, full (unpartitioned) shapes, HF names."""
        return weights.weight_plan(self.engine.module, budget_bytes)

    def join_weight_sync(
        self, address: str, port: int, world_size: int, timeout_s: float = DEFAULT_SYNC_TIMEOUT_S
    ) -> int:
        """Rank 0 only: join the weight-sync group as its rank 0 (the engines' TP workers are 1..world - 1);
        every collective of the group times out after `timeout_s`. Returns the rank (0)."""
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        self._sync_group = join_sync_group(address, port, 0, world_size, backend, timeout_s)
        return 0

    def broadcast_weights(self, plan: BucketPlan) -> None:
        """All ranks: one weight sync's buckets, gathered and broadcast by rank 0 (weights.broadcast_weights)."""
        group = self._sync_group  # rank 0's; the other ranks only take part in the gathers
        weights.broadcast_weights(self.engine.module, self.rank, group, plan, self.engine.device)

    # -- checkpoints ----------------------------------------------------------------------------------

    def save_checkpoint(
        self, root: str, step: int, metadata: dict | None = None, rollouts: SavedRollouts | None = None
    ) -> str | None:
        """All ranks: write DeepSpeed state (model, optimizer, scheduler, RNG) and a consolidated HF
        directory into a staging folder, then (rank 0) rename it into place with `metadata` (JSON, e.g.
        the controller's state) in its completion marker. Rank 0 also writes `rollouts` (the rollouts
        generated ahead of the learner, fetched by reference) into `rollouts/`. Returns the path on rank 0."""
        import torch.distributed as dist

        staged = staging_dir(root, step)
        if self.rank == 0:
            shutil.rmtree(staged, ignore_errors=True)
            staged.mkdir(parents=True)
        dist.barrier()
        client_state = {"learner_steps": self.steps, "torch_rng": torch.get_rng_state()}
        self.engine.save_checkpoint(str(staged / "deepspeed"), tag="state", client_state=client_state)
        weights = self.gather_weights()
        if self.rank == 0:
            self._save_hf(staged / "hf", weights)
            if rollouts:
                import ray

                write_rollouts(staged / ROLLOUTS_DIR, rollouts, ray.get)
        dist.barrier()
        if self.rank != 0:
            return None
        return str(finalize(root, step, {**(metadata or {}), "learner_steps": self.steps}))

    def _save_hf(self, directory: Path, weights: list[tuple[str, torch.Tensor]]) -> None:
        from safetensors.torch import save_file
        from transformers import AutoTokenizer, GenerationConfig

        directory.mkdir(parents=True)
        save_file({name: t.contiguous() for name, t in weights}, directory / "model.safetensors", {"format": "pt"})
        self.engine.module.config.save_pretrained(directory)
        for loader in (AutoTokenizer, GenerationConfig):
            try:
                loader.from_pretrained(self.config.model_path).save_pretrained(directory)
            except OSError:  # the source model has no tokenizer / generation config
                continue

    def load_checkpoint(self, path: str) -> int:
        """All ranks: restore model, optimizer, scheduler and RNG from a complete checkpoint; returns its
        learner step count."""
        _, client_state = self.engine.load_checkpoint(
            str(Path(path) / "deepspeed"), tag="state", load_optimizer_states=True, load_lr_scheduler_states=True
        )
        self.steps = client_state["learner_steps"]
        torch.set_rng_state(client_state["torch_rng"])
        return self.steps

    def learning_rate(self) -> float:
        return float(self.engine.get_lr()[0])


class LearnerGroup:
    """`world_size` LearnerWorker ranks as Ray actors, set up together; calls fan out to every rank and
    raise ActorFailure if a rank dies or a call outlasts `timeout_s` seconds (None: no limit; the set-up:
    `setup_timeout_s`, default `timeout_s`; the ranks are killed when it fails). Each rank runs
    `threads_per_rank` OpenMP threads (0: one per CPU it asks Ray for, at least 1)."""

    def __init__(
        self,
        config: LearnerConfig,
        loss_name: str,
        loss_config: PolicyLossConfig,
        world_size: int,
        *,
        num_cpus_per_rank: float = 1.0,
        use_gpu: bool = False,
        scheduling_strategies: Sequence[object] | None = None,
        timeout_s: float | None = None,
        threads_per_rank: int = 0,
        setup_timeout_s: float | None = None,
    ) -> None:
        import ray

        from cppo_rl.learner import ops_cache

        config.micro_steps(world_size)  # fail before any actor starts
        # one extensions build directory for every rank; a stale torch build lock there is refused here
        # instead of leaving every rank waiting in DeepSpeed's op build forever (ops_cache.py)
        env = ops_cache.learner_env(num_cpus_per_rank, use_gpu, threads_per_rank)
        ops_cache.check_build_locks(env["TORCH_EXTENSIONS_DIR"])
        actor_class = ray.remote(LearnerWorker)
        self.workers = []
        for rank in range(world_size):
            options = {"num_cpus": num_cpus_per_rank, "num_gpus": 1 if use_gpu else 0, "runtime_env": {"env_vars": env}}
            if scheduling_strategies is not None:
                options["scheduling_strategy"] = scheduling_strategies[rank]
            self.workers.append(actor_class.options(**options).remote(config, loss_name, loss_config, rank, world_size))
        self.timeout_s = timeout_s
        setup_timeout_s = timeout_s if setup_timeout_s is None else setup_timeout_s
        try:
            address, port = ray.get(self.workers[0].free_address.remote(), timeout=setup_timeout_s)
            with ops_cache.watch_setup(env["TORCH_EXTENSIONS_DIR"]):
                futures = [worker.setup.remote(address, port) for worker in self.workers]
                get_all(futures, "learner setup", setup_timeout_s)
        except BaseException:
            self.shutdown()
            raise

    def _all(self, method: str, *args: object) -> list:
        """Call `method` on every rank; raises ActorFailure at once if a rank dies (the others would wait
        in a collective forever), or after `timeout_s`."""
        futures = [getattr(worker, method).remote(*args) for worker in self.workers]
        return get_all(futures, f"learner {method}", self.timeout_s)

    def train_on_batch(self, batch: RolloutBatch | RolloutRefs) -> dict[str, float]:
        """Train every rank on `batch`; the metrics of rank 0 (already all-reduced). A RolloutRefs (the training
        loop's) goes by reference: each rank gets the chunk refs and the per-row data (`RolloutRefs.source`)
        and fetches only the chunks holding its rows. A RolloutBatch goes whole (one object-store copy)."""
        return self.training_result(self.start_training(batch))

    def start_training(self, batch: RolloutBatch | RolloutRefs) -> list:
        """`train_on_batch` without waiting: the ranks' calls (pass them to `training_result`)."""
        import ray

        if isinstance(batch, RolloutRefs):
            return [worker.train_on_refs.remote(batch.source()) for worker in self.workers]
        shared = ray.put(batch)
        return [worker.train_on_batch.remote(shared) for worker in self.workers]

    def training_result(self, calls: list) -> dict[str, float]:
        """The metrics of rank 0 once every rank's training call is done (ActorFailure as in `_all`)."""
        return get_all(calls, "learner training", self.timeout_s)[0]

    def logprobs(self, batch: RolloutBatch | RolloutRefs) -> torch.Tensor:
        """float32 [N, T, S] log pi at the batch's token sets, current weights (a diagnostic: every rank
        computes the whole batch, so a RolloutRefs is fetched whole here first)."""
        import ray

        if isinstance(batch, RolloutRefs):
            batch = batch.fetch()
        return self._all("logprobs", ray.put(batch))[0]

    def gather_weights(self) -> list[tuple[str, torch.Tensor]]:
        """The full parameters by HF name (gathered on rank 0)."""
        return self._all("gather_weights")[0]

    def save_checkpoint(
        self, root: str, step: int, metadata: dict | None = None, rollouts: SavedRollouts | None = None
    ) -> str:
        """A complete checkpoint of every rank under `root` (see `checkpoint.py`), `metadata` stored in its
        completion marker, `rollouts` (generated ahead) in its `rollouts/`; returns its path."""
        return self._all("save_checkpoint", root, step, metadata, rollouts)[0]

    def load_checkpoint(self, path: str) -> int:
        """Restore every rank from checkpoint `path`; returns the learner step count."""
        return self._all("load_checkpoint", path)[0]

    def shutdown(self) -> None:
        import ray

        for worker in self.workers:
            ray.kill(worker)
        self.workers = []
