"""The policy-loss registry: every loss selectable by name from config.

A policy loss is `fn(inputs: PolicyLossInputs, config: PolicyLossConfig,
normaliser: LossNormaliser | None = None) -> PolicyLossOutput` (see `policy_losses.py`).
Register a new one with `@register_policy_loss("name")`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

PolicyLoss = Callable[..., Any]

POLICY_LOSSES: dict[str, PolicyLoss] = {}


def register_policy_loss(name: str) -> Callable[[PolicyLoss], PolicyLoss]:
    """Decorator: make `fn` selectable as `name`; a name can be registered once."""

    def decorator(fn: PolicyLoss) -> PolicyLoss:
        if name in POLICY_LOSSES:
            raise ValueError(f"policy loss {name!r} is already registered (by {POLICY_LOSSES[name].__name__})")
        POLICY_LOSSES[name] = fn
        return fn

    return decorator


def get_policy_loss(name: str) -> PolicyLoss:
    """Return the policy loss called `name`, or raise a ValueError listing the known names."""
    if name not in POLICY_LOSSES:
        raise ValueError(f"unknown policy loss {name!r}; known policy losses: {', '.join(sorted(POLICY_LOSSES))}")
    return POLICY_LOSSES[name]
