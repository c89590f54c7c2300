"""The weight sync's receiving side as the GPU path uses it (cppo_rl/sync/receiver.py), without a GPU:

- recording fakes of the engine's TP workers: every TP worker of every engine joins with its own
  rank and receives every bucket itself, in plan order, between one start and one finalise, and no
  bucket's buffer outlives the next bucket's arrival;
- the NCCL group's construction (its timeout), against a recording fake of `ProcessGroupNCCL`;
- the gloo group's timeout, for real: a member that never comes, and a learner that never sends.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import weakref
from datetime import timedelta
from types import SimpleNamespace

import pytest
import torch

from cppo_rl.sync.buckets import plan_buckets


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- recording fakes ----------------------------------------------------------------------------------


class _Work:
    def wait(self) -> bool:
        return True


class FakeSyncGroup:
    """One member's view of the sync group: its broadcasts receive the learner's packed buckets in turn.
    Records each receive and checks that no earlier receive buffer of this member is still alive."""

    def __init__(self, rank: int, sent: list[torch.Tensor], log: list) -> None:
        self.rank, self.sent, self.log = rank, sent, log
        self.buffers: list[weakref.ref] = []

    def broadcast(self, tensor: torch.Tensor, root: int) -> _Work:
        assert root == 0
        alive = sum(ref() is not None for ref in self.buffers)
        index = len(self.buffers)
        source = self.sent[index % len(self.sent)]  # one sync after another
        assert tensor.dtype == source.dtype and tensor.numel() == source.numel()
        tensor.copy_(source)
        self.buffers.append(weakref.ref(tensor))
        self.log.append(("receive", self.rank, index, tensor.numel(), tensor.dtype, alive))
        return _Work()


class FakeWorker:
    """Stands for one vLLM worker process; `WeightReceiver` is mixed in as vLLM does it."""

    def __init__(self, tp_rank: int) -> None:
        self.vllm_config = SimpleNamespace(parallel_config=SimpleNamespace(rank=tp_rank), model_config=None)
        self.device = torch.device("cpu")
        self.events: list = []
        self.loaded: dict[str, torch.Tensor] = {}

    @contextlib.contextmanager
    def cppo_loading(self):
        self.events.append("enter")
        yield
        self.events.append("exit")

    def cppo_start_update(self) -> None:
        self.events.append("start")

    def cppo_load_bucket(self, named_tensors) -> None:
        self.events.append(("load", [name for name, _ in named_tensors]))
        for name, tensor in named_tensors:  # a weight loader copies its shard out of the bucket
            self.loaded[name] = tensor.clone()

    def cppo_finish_update(self) -> None:
        self.events.append("finish")


class FakeLLM:
    """`vllm.LLM.collective_rpc`: runs the method on every worker of the engine, returns their results."""

    def __init__(self, workers: list) -> None:
        self.workers, self.prefix_resets = workers, 0

    def collective_rpc(self, method: str, timeout=None, args: tuple = (), kwargs: dict | None = None) -> list:
        return [getattr(worker, method)(*args, **(kwargs or {})) for worker in self.workers]

    def reset_prefix_cache(self) -> bool:
        self.prefix_resets += 1
        return True


def _learner_weights():
    generator = torch.Generator().manual_seed(0)
    shapes = [(8, 4), (4,), (16, 4), (4, 4), (3,), (32, 4), (4,)]
    return [(f"layer.{i}.weight", torch.randn(shape, generator=generator)) for i, shape in enumerate(shapes)]


def test_every_tp_worker_receives_every_bucket_in_order_one_at_a_time(monkeypatch):
    from cppo_rl.rollout.worker import RolloutWorker
    from cppo_rl.sync import receiver
    from cppo_rl.sync.weight_sync import sync_ranks

    class Worker(FakeWorker, receiver.WeightReceiver):
        pass

    weights = _learner_weights()
    plan = plan_buckets([(n, t.shape, t.dtype) for n, t in weights], budget_bytes=160)
    assert len(plan.buckets) >= 4
    tensors = dict(weights)
    sent = [bucket.pack([tensors[slot.name] for slot in bucket.slots]) for bucket in plan.buckets]

    log, joins = [], []

    def join(address, port, rank, world_size, backend, timeout_s):
        joins.append((address, port, rank, world_size, backend, timeout_s))
        return FakeSyncGroup(rank, sent, log)

    monkeypatch.setattr(receiver, "join_sync_group", join)
    engines, tp = 2, 2
    offsets, world_size = sync_ranks([tp] * engines)
    assert (offsets, world_size) == ([1, 3], 5)
    actors = []
    for offset in offsets:
        actor = object.__new__(RolloutWorker)  # the Ray actor's class, its vLLM engine faked
        actor.llm, actor.policy_version = FakeLLM([Worker(t) for t in range(tp)]), 0
        assert actor.join_weight_sync("10.0.0.1", 29500, offset, world_size, plan, 12.5) == [offset, offset + 1]
        actors.append(actor)
    assert joins == [("10.0.0.1", 29500, rank, 5, "gloo", 12.5) for rank in range(1, 5)]

    for version in (1, 2):
        log.clear()
        for actor in actors:
            actor.receive_weights(version)
            assert actor.policy_version == version and actor.llm.prefix_resets == version
        for actor, offset in zip(actors, offsets, strict=True):
            for worker in actor.llm.workers:
                rank = offset + worker.vllm_config.parallel_config.rank
                mine = [entry for entry in log if entry[1] == rank]
                # each TP worker receives every bucket itself, in plan order, with the plan's sizes
                assert [(i, n, d) for _, _, i, n, d, _ in mine] == [
                    (i + len(plan.buckets) * (version - 1), b.numel, b.dtype) for i, b in enumerate(plan.buckets)
                ]
                # no earlier bucket's buffer is alive when the next one arrives
                assert [alive for *_, alive in mine] == [0] * len(plan.buckets)
                loads = [("load", [s.name for s in b.slots]) for b in plan.buckets]
                expected = ["enter", "start", *loads, "finish", "exit"]
                assert worker.events[-len(expected) :] == expected
                assert worker.events.count("finish") == version  # one finalise per sync
                for name, tensor in weights:
                    assert torch.equal(worker.loaded[name], tensor), name
        for group in [w.cppo_channel.group for a in actors for w in a.llm.workers]:
            assert all(ref() is None for ref in group.buffers)  # nothing held after the sync


def test_receive_before_join_is_refused():
    from cppo_rl.sync.receiver import WeightReceiver

    class Worker(FakeWorker, WeightReceiver):
        pass

    with pytest.raises(RuntimeError, match="before cppo_join_weight_sync"):
        Worker(0).cppo_receive_weights()


def test_the_layerwise_loaders_pending_views_are_copied_out_of_the_bucket():
    """vLLM's layerwise reload keeps a layer's loader arguments until the layer is complete: a layer
    split across two buckets must not keep the first bucket alive."""
    import inspect

    from vllm.model_executor.model_loader.reload.layerwise import LAYERWISE_INFO, get_layerwise_info

    from cppo_rl.sync.receiver import _detach_pending_views

    def weight_loader(param, loaded_weight, shard_id=None): ...

    layer = torch.nn.Linear(2, 2)
    flat = torch.arange(12, dtype=torch.float32)
    param = torch.nn.Parameter(torch.empty(2, 3, device="meta"))
    info = get_layerwise_info(layer)
    try:
        info.loaded_weights.append(("weight", inspect.signature(weight_loader).bind(param, flat[:6].view(2, 3), "q")))
        bucket = weakref.ref(flat)
        assert _detach_pending_views(flat) == 1
        del flat
        assert bucket() is None
        kept = info.loaded_weights[0][1].arguments
        assert torch.equal(kept["loaded_weight"], torch.arange(6, dtype=torch.float32).view(2, 3))
        assert kept["param"] is param and kept["shard_id"] == "q"
    finally:
        LAYERWISE_INFO.pop(layer, None)


# -- the group's timeout --------------------------------------------------------------------------------


def test_the_nccl_group_is_built_with_the_sync_timeout(monkeypatch):
    """Checked against torch 2.13's own NCCL group construction (torch/distributed/distributed_c10d.py
    `_new_process_group_helper`): Options() with `_timeout`, then ProcessGroupNCCL(store, rank, size, options)."""
    import torch.distributed as dist

    from cppo_rl.sync import transport

    calls = []

    class FakeNCCL:
        class Options:
            def __init__(self, is_high_priority_stream: bool = False) -> None:
                self.is_high_priority_stream = is_high_priority_stream
                self._timeout = None

        def __init__(self, store, rank, size, options) -> None:
            calls.append((store, rank, size, options))

    class FakeStore:
        def __init__(self, *args, **kwargs) -> None:
            calls.append(("store", args, kwargs))

    monkeypatch.setattr(dist, "ProcessGroupNCCL", FakeNCCL, raising=False)
    monkeypatch.setattr(dist, "TCPStore", FakeStore)
    monkeypatch.setattr(dist, "PrefixStore", lambda prefix, store: ("prefixed", prefix, store))
    group = transport.join_sync_group("10.0.0.1", 29500, 3, 5, "nccl", timeout_s=42.0)
    (_, args, kwargs), (store, rank, size, options) = calls
    assert isinstance(group, FakeNCCL)
    assert args == ("10.0.0.1", 29500, 5) and kwargs == {"is_master": False, "timeout": timedelta(seconds=42)}
    assert store[:2] == ("prefixed", "cppo_weight_sync") and (rank, size) == (3, 5)
    assert isinstance(options, FakeNCCL.Options)
    assert options._timeout == timedelta(seconds=42) and options.is_high_priority_stream is False


class _GlooWorker(FakeWorker):
    pass


def test_a_gloo_member_that_never_comes_fails_the_join_within_the_timeout():
    from cppo_rl.sync.receiver import WeightReceiver

    class Worker(_GlooWorker, WeightReceiver):
        pass

    plan = plan_buckets([("w", (4,), torch.float32)], 64)
    start = time.monotonic()
    with pytest.raises(RuntimeError):  # (DistStoreError / DistNetworkError are RuntimeErrors)
        # rank 1 (TP worker 0 of engine 0) of a group of 2; the learner's rank 0 never hosts the store
        Worker(0).cppo_join_weight_sync("127.0.0.1", _free_port(), 1, 2, plan, timeout_s=2.0)
    assert time.monotonic() - start < 15.0


def test_a_gloo_receive_fails_within_the_timeout_when_the_learner_never_sends():
    from cppo_rl.sync.receiver import WeightReceiver
    from cppo_rl.sync.transport import join_sync_group

    class Worker(_GlooWorker, WeightReceiver):
        pass

    plan = plan_buckets([("w", (4,), torch.float32)], 64)
    port = _free_port()
    learner, done = {}, threading.Event()

    def learner_joins_and_stays_silent() -> None:
        learner["group"] = join_sync_group("127.0.0.1", port, 0, 2, "gloo", timeout_s=2.0)
        done.wait(30)

    thread = threading.Thread(target=learner_joins_and_stays_silent, daemon=True)
    thread.start()
    worker = Worker(0)
    assert worker.cppo_join_weight_sync("127.0.0.1", port, 1, 2, plan, timeout_s=2.0) == 1
    start = time.monotonic()
    try:
        with pytest.raises(RuntimeError, match=r"(?i)timed out|timeout"):
            worker.cppo_receive_weights()
        assert time.monotonic() - start < 15.0
        assert worker.events == ["enter", "start"]  # nothing was loaded, no finalise
    finally:
        done.set()
        thread.join(10)
