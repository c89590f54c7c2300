"""Argument checks shared by the algorithm core: every error names the argument and the fix."""

from __future__ import annotations

import math

import torch


def check_floating(name: str, tensor: torch.Tensor, caller: str) -> None:
    """Raise TypeError unless `tensor` is a floating-point tensor."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{caller}: `{name}` must be a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise TypeError(
            f"{caller}: `{name}` must be a floating-point tensor, got dtype {tensor.dtype}; "
            f"convert it with `{name}.float()`"
        )


def check_bool(name: str, tensor: torch.Tensor, caller: str) -> None:
    """Raise TypeError unless `tensor` is a bool tensor (masks are never 0/1 floats here)."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{caller}: `{name}` must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype != torch.bool:
        raise TypeError(
            f"{caller}: `{name}` must be a bool tensor, got dtype {tensor.dtype}; "
            f"convert a 0/1 mask with `{name}.bool()`"
        )


def check_same_shape(caller: str, reference: str, tensors: dict[str, torch.Tensor]) -> None:
    """Raise ValueError unless every tensor has the shape of `tensors[reference]`."""
    expected = tuple(tensors[reference].shape)
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != expected:
            raise ValueError(
                f"{caller}: `{name}` has shape {tuple(tensor.shape)} but `{reference}` has shape "
                f"{expected}; these inputs must have the same shape"
            )


def check_rank(name: str, tensor: torch.Tensor, ndim: int, layout: str, caller: str) -> None:
    """Raise ValueError unless `tensor` has `ndim` dimensions (`layout` names them, e.g. "[B, T]")."""
    if tensor.dim() != ndim:
        raise ValueError(
            f"{caller}: `{name}` must have shape {layout}, got {tuple(tensor.shape)} "
            f"({tensor.dim()} dimensions instead of {ndim})"
        )


def check_positive(name: str, value: float, caller: str) -> None:
    """Raise ValueError unless `value` is a finite number > 0."""
    if not _is_number(value) or not (value > 0) or math.isinf(value):
        raise ValueError(f"{caller}: `{name}` must be a finite number > 0, got {value!r}")


def check_non_negative(name: str, value: float, caller: str) -> None:
    """Raise ValueError unless `value` is a number >= 0 (inf allowed: it disables a bound)."""
    if not _is_number(value) or not (value >= 0):
        raise ValueError(f"{caller}: `{name}` must be a number >= 0, got {value!r}")


def check_in_interval(name: str, value: float, low: float, high: float, caller: str, *, low_open: bool = False) -> None:
    """Raise ValueError unless low <= value <= high (low < value when `low_open`)."""
    above_low = value > low if low_open else value >= low
    if not _is_number(value) or not (above_low and value <= high):
        bracket = "(" if low_open else "["
        raise ValueError(f"{caller}: `{name}` must lie in {bracket}{low}, {high}], got {value!r}")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
