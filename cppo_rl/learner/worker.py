"""The learner: DeepSpeed ZeRO-3 ranks that train the policy on rollout batches.

`LearnerWorker` is one rank (a plain class; `LearnerGroup` runs one per Ray actor). The ranks form a
torch.distributed group themselves (gloo on CPU, nccl on GPU) and wrap the policy in ZeRO stage 3.

One `train_on_batch(batch)`: the batch (N responses, prompt groups adjacent) is cut into
`updates_per_rollout` contiguous mini-batches; each rank takes a contiguous 1/world share of a
mini-batch and runs it in micro-batches of `micro_batch_size` responses, then the optimizer steps
once per mini-batch. Each micro-batch: chunked log pi at the sampled token and at mu's token set
(no [B, T, V] logits), the policy loss from the registry, backward.

Normalisation is global: every rank sees the whole batch, so the mini-batch's token and sequence
counts are known without communication; each micro-batch loss is its *sum* over those global
counts, multiplied by the world size to undo DeepSpeed's averaging across ranks and backpropagated
without DeepSpeed's division by the accumulation steps. The gradient is then the exact gradient of
the mini-batch loss whatever the micro-batch size or world size.
"""

from __future__ import annotations

import math
import os
import shutil
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cppo_rl.algorithms import LossNormaliser, PolicyLossConfig, PolicyLossInputs, get_policy_loss, local_counts
from cppo_rl.algorithms.divergence import topk_tv
from cppo_rl.batch import RolloutBatch
from cppo_rl.config import AlgorithmConfig, LearnerSettings, RolloutConfig, TrainerConfig
from cppo_rl.learner.checkpoint import finalize, staging_dir
from cppo_rl.learner.logprobs import LogprobPolicy
from cppo_rl.learner.moe import mark_leaf_modules
from cppo_rl.remote import get_all
from cppo_rl.sync.buckets import BucketPlan, plan_buckets
from cppo_rl.sync.transport import join_sync_group


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

    def micro_steps(self, world_size: int) -> int:
        """Micro-batches per rank per mini-batch; raises naming the user's keys whose sizes do not divide."""
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
        if problems:
            raise ValueError("LearnerConfig: " + "\n".join(problems))  # one problem a line


@dataclass
class _Shard:
    """One rank's part of one mini-batch, and the mini-batch's global counts."""

    batch: RolloutBatch
    normaliser: LossNormaliser
    first: bool  # the batch's first mini-batch (the weights still equal the rollout's)
    anchor: tuple[torch.Tensor, torch.Tensor] | None = field(default=None)


def _unlink_shared_allreduce_buffer(master_addr: str, master_port: int, rank: int) -> None:
    """Remove the name of this rank's /dev/shm all-reduce segment (DeepSpeed's CPU backend, 66 MB per rank).

    DeepSpeed never unlinks it, so every learner that is killed rather than closed (Ray kills actors) left
    it behind in RAM until reboot. Once every rank has mapped every other rank's segment (they do so in
    `init_distributed`; the barrier waits for all of them) the names are not needed: the memory stays
    mapped and is freed when the last rank exits.
    """
    import torch.distributed as dist

    dist.barrier()
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{master_addr}_{master_port}_{rank}"
    Path("/dev/shm", name).unlink(missing_ok=True)


class LearnerWorker:
    """One ZeRO-3 rank. Construct on every rank, then call `setup` on all of them together."""

    def __init__(self, config: LearnerConfig, loss_name: str, loss_config: PolicyLossConfig, rank: int, world: int):
        self.config, self.rank, self.world_size = config, rank, world
        self.loss_fn = get_policy_loss(loss_name)
        self.loss_config = loss_config
        self.engine = None
        self.steps = 0

    @staticmethod
    def free_address() -> tuple[str, int]:
        """This node's IP and a free TCP port: the rendezvous address when this is rank 0."""
        import ray

        with socket.socket() as probe:
            probe.bind(("", 0))
            port = probe.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def setup(self, master_addr: str, master_port: int) -> None:
        """Join the process group and build the ZeRO-3 engine (a collective: all ranks at once)."""
        on_gpu = torch.cuda.is_available()
        os.environ.update(
            MASTER_ADDR=master_addr,
            MASTER_PORT=str(master_port),
            RANK=str(self.rank),
            WORLD_SIZE=str(self.world_size),
            LOCAL_RANK="0" if on_gpu else str(self.rank),
            LOCAL_SIZE="1" if on_gpu else str(self.world_size),
        )
        if not on_gpu:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed
        from transformers import AutoModelForCausalLM
        from transformers.integrations import HfDeepSpeedConfig

        config = self.config
        backend = config.backend if config.backend != "auto" else ("nccl" if on_gpu else "gloo")
        dtype = config.dtype if config.dtype != "auto" else ("bfloat16" if on_gpu else "float32")
        deepspeed.init_distributed(dist_backend=backend)
        if not on_gpu:
            _unlink_shared_allreduce_buffer(master_addr, master_port, self.rank)
        torch.manual_seed(config.seed)
        micro_steps = config.micro_steps(self.world_size)
        self._micro_steps_total = micro_steps * self.world_size
        ds_config = {
            "train_micro_batch_size_per_gpu": config.micro_batch_size,
            "gradient_accumulation_steps": micro_steps,
            "gradient_clipping": config.grad_clip,
            "zero_optimization": {"stage": config.zero_stage, "overlap_comm": False, "contiguous_gradients": True},
            "bf16": {"enabled": dtype == "bfloat16"},
            "zero_allow_untested_optimizer": config.optimizer == "sgd",  # torch SGD: exact, for checks
            "steps_per_print": 1 << 30,
            "wall_clock_breakdown": False,
        }
        keep_alive = HfDeepSpeedConfig(ds_config)  # makes from_pretrained partition the weights (ZeRO-3 init)
        model = AutoModelForCausalLM.from_pretrained(config.model_path, dtype=getattr(torch, dtype))
        del keep_alive
        self.moe_leaf_modules = mark_leaf_modules(model)
        # the router's load-balancing loss joins the policy loss when the model's config asks for it
        self.router_aux_coef = (
            float(model.config.router_aux_loss_coef) if getattr(model.config, "output_router_logits", False) else 0.0
        )
        if config.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        model = LogprobPolicy(model, config.logprob_chunk_size)
        optimizer = self._optimizer(model)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self._lr_factor)
        self.engine, *_ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
        )

    def _optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        config = self.config
        if config.optimizer == "sgd":
            return torch.optim.SGD(model.parameters(), lr=config.lr)
        return torch.optim.AdamW(model.parameters(), lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)

    def _lr_factor(self, step: int) -> float:
        config = self.config
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        if config.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - config.warmup_steps) / max(1, config.total_steps - config.warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    # -- training -----------------------------------------------------------------------------------

    def train_on_batch(self, batch: RolloutBatch) -> dict[str, float]:
        """`updates_per_rollout` optimizer steps on `batch` (which must carry advantages).

        Returns metrics averaged over the batch's valid tokens (all ranks), including
        `rollout_learner_logprob_mismatch` (mean |log mu - log pi| on the first mini-batch before its
        update), `rollout_learner_topk_tv` and `skipped_updates` (updates not applied because their
        loss or gradient was not finite).
        """
        if batch.advantages is None:
            raise ValueError("LearnerWorker.train_on_batch: the batch has no advantages; compute them first")
        if batch.num_responses != self.config.responses_per_step:
            raise ValueError(
                f"LearnerWorker.train_on_batch: got {batch.num_responses} responses, configured for "
                f"responses_per_step={self.config.responses_per_step}"
            )
        shards = self._shards(batch)
        if self.config.anchor == "recompute":
            for shard in shards:
                shard.anchor = self._recompute_anchor(shard.batch)
        self.engine.train()
        totals: dict[str, torch.Tensor] = {}
        skipped_before = self.engine.skipped_steps
        for shard in shards:
            for start in range(0, shard.batch.num_responses, self.config.micro_batch_size):
                micro = shard.batch.select(range(start, start + self.config.micro_batch_size))
                anchor = None
                if shard.anchor is not None:
                    anchor = tuple(
                        a[start : start + self.config.micro_batch_size, : micro.response_ids.shape[1]]
                        for a in shard.anchor
                    )
                metrics = self._micro_step(micro, shard, anchor)
                for name, value in metrics.items():
                    totals[name] = totals.get(name, torch.zeros(2)) + value
            self.steps += 1
            grad_norm = self.engine.get_global_grad_norm()  # of the update just applied, before clipping
            if grad_norm is not None and math.isfinite(grad_norm):  # mean over applied updates (same on every rank)
                totals["grad_norm"] = totals.get("grad_norm", torch.zeros(2)) + torch.tensor([float(grad_norm), 1.0])
        # DeepSpeed skips an update whose global gradient norm is inf / nan (weights, optimizer state and
        # lr schedule unchanged); each rank counts the same updates, so the all-reduced mean is the count
        totals["skipped_updates"] = torch.tensor([float(self.engine.skipped_steps - skipped_before), 1.0])
        metrics = self._reduce_metrics(totals)
        metrics["lr"] = self.learning_rate()
        return metrics

    def _shards(self, batch: RolloutBatch) -> list[_Shard]:
        size = batch.num_responses // self.config.updates_per_rollout
        share = size // self.world_size
        shards = []
        for update in range(self.config.updates_per_rollout):
            minibatch = batch.select(range(update * size, (update + 1) * size))
            tokens, sequences = local_counts(minibatch.response_mask)
            # seq-mean-token-sum-norm's horizon: the loss config's constant, else the mini-batch's padded width
            # (one width for every micro-batch and rank: micro-batches are trimmed to their own longest response)
            width = None if isinstance(self.loss_config.horizon, int) else minibatch.response_mask.shape[1]
            normaliser = LossNormaliser(num_tokens=tokens, num_sequences=sequences, horizon=width)
            mine = minibatch.select(range(self.rank * share, (self.rank + 1) * share))
            shards.append(_Shard(batch=mine, normaliser=normaliser, first=update == 0))
        return shards

    def _micro_step(
        self, micro: RolloutBatch, shard: _Shard, anchor: tuple[torch.Tensor, torch.Tensor] | None
    ) -> dict[str, torch.Tensor]:
        set_logprobs, entropy = self._set_logprobs(micro, return_entropy=True)
        mu_sampled, mu_set = anchor if anchor is not None else (micro.rollout_logprobs, micro.topk_logprobs)
        inputs = PolicyLossInputs(
            logprobs=set_logprobs[..., 0],
            rollout_logprobs=mu_sampled,
            advantages=micro.advantages,
            response_mask=micro.response_mask,
            topk_logprobs=set_logprobs,
            rollout_topk_logprobs=mu_set,
        )
        output = self.loss_fn(inputs, self.loss_config, shard.normaliser)
        loss, router = output.loss, self.engine.module.router
        if router is not None and self.router_aux_coef:  # the mini-batch's mean aux loss, over micro-steps
            loss = loss + self.router_aux_coef * router.aux_loss / self._micro_steps_total
        self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
        self.engine.step()
        tokens = micro.response_mask.sum().float()
        reported = {**output.metrics, **(router.metrics() if router is not None else {})}
        metrics = {
            name: torch.stack([value.detach().float() * tokens, tokens])
            for name, value in reported.items()
            if torch.isfinite(value)
        }
        metrics["entropy"] = torch.stack([entropy.sum(), tokens])
        # summed over micro-batches and ranks, then divided by the update count: the mean mini-batch loss
        metrics["loss"] = torch.stack([output.loss.detach().float(), torch.tensor(1.0 / self._micro_steps_total)])
        if shard.first:
            valid = micro.response_mask
            gap = (set_logprobs[..., 0].detach() - micro.rollout_logprobs).abs()[valid].sum()
            tv = topk_tv(micro.topk_logprobs, set_logprobs.detach())[valid].sum()
            metrics["rollout_learner_logprob_mismatch"] = torch.stack([gap, tokens])
            metrics["rollout_learner_topk_tv"] = torch.stack([tv, tokens])
        return metrics

    def _set_logprobs(
        self, micro: RolloutBatch, return_entropy: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """float32 [B, T, S] log pi at `micro.topk_ids` (slot 0: the sampled token), -inf at unused slots;
        with `return_entropy` also the float32 [valid tokens] entropy (nats) of pi at each valid response token."""
        device = self.engine.device
        prompts = [len(p) for p in micro.prompt_ids]
        lengths = micro.response_lengths.tolist()
        width = max(p + r for p, r in zip(prompts, lengths, strict=True))
        input_ids = torch.zeros(len(prompts), width, dtype=torch.int64)
        attention = torch.zeros(len(prompts), width, dtype=torch.int64)
        for row, (prompt, length) in enumerate(zip(prompts, lengths, strict=True)):
            input_ids[row, :prompt] = torch.tensor(micro.prompt_ids[row])
            input_ids[row, prompt : prompt + length] = micro.response_ids[row, :length]
            attention[row, : prompt + length] = 1
        valid = micro.response_mask
        rows, columns = valid.nonzero(as_tuple=True)
        positions = torch.tensor(prompts)[rows] - 1 + columns  # the hidden state that predicts token t
        result = self.engine(
            input_ids.to(device),
            attention.to(device),
            rows.to(device),
            positions.to(device),
            micro.topk_ids[valid].to(device),
            self.config.temperature,
            return_entropy=return_entropy,
        )
        logprobs, entropy = result if return_entropy else (result, None)
        out = torch.full(micro.topk_ids.shape, -float("inf"), dtype=torch.float32, device=device)
        out[valid.to(device)] = logprobs
        out = out.cpu() if device.type != "cpu" else out
        return (out, entropy.detach().cpu()) if return_entropy else out

    def _recompute_anchor(self, shard: RolloutBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The learner's own (sampled, set) logprobs of a shard before any update of this batch."""
        set_logprobs = self.logprobs(shard)
        return torch.where(shard.response_mask, set_logprobs[..., 0], torch.zeros(())), set_logprobs

    def _reduce_metrics(self, totals: dict[str, torch.Tensor]) -> dict[str, float]:
        """Token-weighted means over all ranks (one all-reduce)."""
        import torch.distributed as dist

        names = sorted(totals)
        stacked = torch.stack([totals[name] for name in names]) if names else torch.zeros(0, 2)
        if self.world_size > 1:
            dist.all_reduce(stacked)
        return {
            name: float(value / count)
            for name, (value, count) in zip(names, stacked.tolist(), strict=True)
            if count > 0
        }

    @torch.no_grad()
    def logprobs(self, batch: RolloutBatch) -> torch.Tensor:
        """float32 [N, T, S] log pi at `batch.topk_ids` with the current weights (all ranks must call;
        each computes the whole batch, since ZeRO-3 forwards are collective)."""
        self.engine.eval()
        size = self.config.micro_batch_size
        width = batch.response_ids.shape[1]
        pieces = [
            self._set_logprobs(batch.select(range(s, min(s + size, batch.num_responses))))
            for s in range(0, batch.num_responses, size)
        ]
        return torch.cat(
            [torch.nn.functional.pad(p, (0, 0, 0, width - p.shape[1]), value=-float("inf")) for p in pieces]
        )

    # -- weights --------------------------------------------------------------------------------------

    def gather_weights(self, names: Sequence[str] | None = None) -> list[tuple[str, torch.Tensor]]:
        """Full (unpartitioned) parameters by HF name, on rank 0; [] on other ranks. All ranks must call."""
        import deepspeed

        wanted = set(names) if names is not None else None
        gathered = []
        for name, parameter in self.engine.module.named_parameters():
            if wanted is not None and name not in wanted:
                continue
            with deepspeed.zero.GatheredParameters([parameter], modifier_rank=None):
                if self.rank == 0:
                    gathered.append((name, parameter.detach().clone().cpu()))
        return gathered

    def weight_plan(self, budget_bytes: int) -> BucketPlan:
        """The bucket plan of a weight sync: every parameter, full (unpartitioned) shapes, HF names."""
        specs = [
            (name, tuple(getattr(p, "ds_shape", p.shape)), p.dtype) for name, p in self.engine.module.named_parameters()
        ]
        return plan_buckets(specs, budget_bytes)

    def join_weight_sync(self, address: str, port: int, world_size: int) -> None:
        """Rank 0 only: join the weight-sync group as its rank 0 (the rollout workers are 1..E)."""
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        self._sync_group = join_sync_group(address, port, 0, world_size, backend)

    def broadcast_weights(self, plan: BucketPlan) -> None:
        """All ranks: gather each bucket's parameters (ZeRO-3 collective); rank 0 packs it into one flat
        buffer and broadcasts it to the rollout workers with one collective.

        If a broadcast fails (a rollout worker died), rank 0 still takes part in the remaining gathers, so
        the other ranks are not left waiting in one, and raises at the end."""
        import deepspeed

        parameters = dict(self.engine.module.named_parameters())
        failure = None
        for bucket in plan.buckets:
            members = [parameters[slot.name] for slot in bucket.slots]
            with deepspeed.zero.GatheredParameters(members, modifier_rank=None):
                if self.rank == 0 and failure is None:
                    flat = bucket.pack([p.detach() for p in members], self.engine.device)
                    try:
                        self._sync_group.broadcast(flat, 0).wait()
                    except RuntimeError as error:  # gloo / NCCL: a peer is gone
                        failure = error
        if failure is not None:
            raise RuntimeError(f"weight sync broadcast failed: {failure}") from failure

    # -- checkpoints ----------------------------------------------------------------------------------

    def save_checkpoint(self, root: str, step: int, metadata: dict | None = None) -> str | None:
        """All ranks: write DeepSpeed state (model, optimizer, scheduler, RNG) and a consolidated HF
        directory into a staging folder, then (rank 0) rename it into place with `metadata` (JSON, e.g.
        the controller's state) in its completion marker. Returns the path on rank 0."""
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
    raise ActorFailure if a rank dies or a call outlasts `timeout_s` seconds (None: no limit). Each rank
    runs `threads_per_rank` OpenMP threads (0: one per CPU it asks Ray for, at least 1)."""

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
    ) -> None:
        import ray

        config.micro_steps(world_size)  # fail before any actor starts
        actor_class = ray.remote(LearnerWorker)
        env = {"OMP_NUM_THREADS": str(threads_per_rank or max(1, int(num_cpus_per_rank)))}
        if not use_gpu:
            env["DS_ACCELERATOR"] = "cpu"
        self.workers = []
        for rank in range(world_size):
            options = {"num_cpus": num_cpus_per_rank, "num_gpus": 1 if use_gpu else 0, "runtime_env": {"env_vars": env}}
            if scheduling_strategies is not None:
                options["scheduling_strategy"] = scheduling_strategies[rank]
            self.workers.append(actor_class.options(**options).remote(config, loss_name, loss_config, rank, world_size))
        self.timeout_s = timeout_s
        address, port = ray.get(self.workers[0].free_address.remote(), timeout=timeout_s)
        get_all([worker.setup.remote(address, port) for worker in self.workers], "learner setup", timeout_s)

    def _all(self, method: str, *args: object) -> list:
        """Call `method` on every rank; raises ActorFailure at once if a rank dies (the others would wait
        in a collective forever), or after `timeout_s`."""
        futures = [getattr(worker, method).remote(*args) for worker in self.workers]
        return get_all(futures, f"learner {method}", self.timeout_s)

    def train_on_batch(self, batch: RolloutBatch) -> dict[str, float]:
        """Train every rank on `batch` (one object-store copy); the metrics of rank 0 (already all-reduced)."""
        import ray

        return self._all("train_on_batch", ray.put(batch))[0]

    def logprobs(self, batch: RolloutBatch) -> torch.Tensor:
        """float32 [N, T, S] log pi at the batch's token sets, current weights."""
        import ray

        return self._all("logprobs", ray.put(batch))[0]

    def gather_weights(self) -> list[tuple[str, torch.Tensor]]:
        """The full parameters by HF name (gathered on rank 0)."""
        return self._all("gather_weights")[0]

    def save_checkpoint(self, root: str, step: int, metadata: dict | None = None) -> str:
        """A complete checkpoint of every rank under `root` (see `checkpoint.py`), `metadata` stored in its
        completion marker; returns its path."""
        return self._all("save_checkpoint", root, step, metadata)[0]

    def load_checkpoint(self, path: str) -> int:
        """Restore every rank from checkpoint `path`; returns the learner step count."""
        return self._all("load_checkpoint", path)[0]

    def shutdown(self) -> None:
        import ray

        for worker in self.workers:
            ray.kill(worker)
        self.workers = []
