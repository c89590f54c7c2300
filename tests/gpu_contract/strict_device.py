"""A simulated host / accelerator split on the CPU: it raises where CUDA (or NCCL) would.

There is one real device here, so every tensor carries a tag instead: "host" or "device".

- host: tensors handed in as host data (`mark_host`: the rollout batch as it arrives), tensors made by
  factory functions (torch.zeros / tensor / full / arange / empty / ones / rand ...) without an explicit
  `device=`, results of `.cpu()`, `.to("cpu")` and `torch.from_numpy`;
- device: tensors made with an explicit device (`device=x.device`, `.to(engine.device)`), and every tensor
  this mode did not see being made (parameters, the DeepSpeed engine's outputs);
- any other op: its result is host only when all its tensor inputs are host.

An op that mixes a host tensor with a device tensor raises `DeviceMixError`, except a 0-dim host
tensor in an elementwise op (CUDA allows those); stack / cat never mix. Explicit transfers (`.to`,
`copy_`) are allowed. `torch.distributed.all_reduce` / `broadcast` raise when handed a host tensor (NCCL
has no CPU backend). The DeepSpeed engine's own forward / backward / step run unchecked (its internals
are not ours), except the engine's inputs, which must be device tensors, and `moe.router_stats`, ours,
which is checked inside the forward. Blind spot: `device="cpu"` given as a torch.device (not the string)
counts as the device.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

HOST, DEVICE = "host", "device"
_TAG = "_strict_device_tag"

FACTORIES = {
    torch.zeros,
    torch.ones,
    torch.full,
    torch.empty,
    torch.tensor,
    torch.as_tensor,
    torch.arange,
    torch.linspace,
    torch.rand,
    torch.randn,
    torch.randint,
    torch.eye,
    torch.scalar_tensor,
}
NO_SCALAR_EXEMPTION = {torch.stack, torch.cat, torch.concat, torch.concatenate, torch.hstack, torch.vstack}
TRANSFERS = {torch.Tensor.to, torch.Tensor.copy_, torch.Tensor.cpu, torch.Tensor.cuda}


class DeviceMixError(RuntimeError):
    """An op that CUDA / NCCL would refuse: a host tensor met a device tensor."""


def tag_of(tensor: torch.Tensor) -> str:
    return getattr(tensor, _TAG, DEVICE)


def _tag(value, where: str):
    if isinstance(value, torch.Tensor):
        with contextlib.suppress(AttributeError, RuntimeError):
            setattr(value, _TAG, where)
    return value


def mark_host(*values) -> None:
    """Tag every tensor in `values` (tensors, containers, dataclasses with tensor fields) as host data."""
    for value in values:
        if hasattr(value, "__dataclass_fields__"):
            mark_host(*(getattr(value, name) for name in value.__dataclass_fields__))
            continue
        leaves, _ = tree_flatten(value)
        for leaf in leaves:
            _tag(leaf, HOST)


def _explicit(device) -> str:
    if isinstance(device, str) and device == "cpu":
        return HOST
    return DEVICE


class StrictDevice(TorchFunctionMode):
    """The mode; `paused()` lets code run unchecked and untagged (its tensors count as device)."""

    def __init__(self) -> None:
        super().__init__()
        self.depth = 0  # > 0: paused
        self.checked_ops = 0

    @contextlib.contextmanager
    def paused(self):
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1

    @contextlib.contextmanager
    def checking(self):
        saved, self.depth = self.depth, 0
        try:
            yield
        finally:
            self.depth = saved

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.depth:
            return func(*args, **kwargs)
        self.checked_ops += 1
        leaves, _ = tree_flatten((args, kwargs))
        tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
        if func not in TRANSFERS:
            exempt = func not in NO_SCALAR_EXEMPTION
            hosts = [t for t in tensors if tag_of(t) == HOST and not (exempt and t.dim() == 0)]
            devices = [t for t in tensors if tag_of(t) == DEVICE]
            if hosts and devices:
                raise DeviceMixError(
                    f"{getattr(func, '__qualname__', func)} mixes host tensor(s) "
                    f"{[tuple(t.shape) for t in hosts]} with device tensor(s) {[tuple(t.shape) for t in devices]}"
                )
        result = func(*args, **kwargs)
        if func in (torch.Tensor.to, torch.Tensor.cpu, torch.Tensor.cuda) and result is args[0]:
            # one real device: a "transfer" returns its input; tag a new alias, not the input itself
            result = result.view(result.shape)
        where = self._result_tag(func, args, kwargs, tensors)
        return tree_map(lambda v: _tag(v, where), result)

    @staticmethod
    def _result_tag(func, args, kwargs, tensors) -> str:
        if func is torch.Tensor.cpu:
            return HOST
        if func is torch.Tensor.cuda:
            return DEVICE
        if func is torch.from_numpy:
            return HOST
        if func is torch.Tensor.to:
            for target in [*args[1:], kwargs.get("device"), kwargs.get("other")]:
                if isinstance(target, torch.Tensor):
                    return tag_of(target)
                if isinstance(target, (str, torch.device, int)) and not isinstance(target, bool):
                    return _explicit(target)
            return tag_of(args[0])
        if func is torch.Tensor.copy_:
            return tag_of(args[0])
        if "device" in kwargs and kwargs["device"] is not None:
            return _explicit(kwargs["device"])
        if func in FACTORIES:
            return HOST
        if not tensors:
            return HOST
        return HOST if all(tag_of(t) == HOST for t in tensors) else DEVICE


def _checked_collective(mode: StrictDevice, original):
    @functools.wraps(original)
    def collective(tensor, *args, **kwargs):
        if not mode.depth and tag_of(tensor) == HOST:
            raise DeviceMixError(
                f"{original.__name__} got a host tensor {tuple(tensor.shape)} (NCCL has no CPU backend)"
            )
        mode.collectives.append((original.__name__, tag_of(tensor)))
        return original(tensor, *args, **kwargs)

    return collective


@contextlib.contextmanager
def strict_device(engine=None):
    """Run the block under the strict mode; `engine` (a DeepSpeed engine) runs its forward / backward /
    step unchecked, with its forward's tensor inputs required on the device."""
    import cppo_rl.learner.moe as moe

    mode = StrictDevice()
    mode.collectives = []
    saved = {name: getattr(dist, name) for name in ("all_reduce", "broadcast")}
    saved_router_stats = moe.router_stats
    for name, original in saved.items():
        setattr(dist, name, _checked_collective(mode, original))

    @functools.wraps(saved_router_stats)
    def router_stats(*args, **kwargs):
        with mode.checking():
            return saved_router_stats(*args, **kwargs)

    moe.router_stats = router_stats
    patched = []
    if engine is not None:
        for name in ("forward", "backward", "step"):
            original = getattr(engine, name)

            def unchecked(*args, _original=original, _name=name, **kwargs):
                if _name == "forward" and not mode.depth:
                    leaves, _ = tree_flatten((args, kwargs))
                    hosts = [tuple(t.shape) for t in leaves if isinstance(t, torch.Tensor) and tag_of(t) == HOST]
                    if hosts:
                        raise DeviceMixError(f"the engine's forward got host tensor(s) {hosts}")
                with mode.paused():
                    return _original(*args, **kwargs)

            setattr(engine, name, unchecked)
            patched.append(name)
    try:
        with mode:
            yield mode
    finally:
        for name, original in saved.items():
            setattr(dist, name, original)
        moe.router_stats = saved_router_stats
        for name in patched:
            delattr(engine, name)
