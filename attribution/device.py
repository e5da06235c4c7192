"""The torch device a command computes on: `cpu` (default) or `cuda[:N]` where a GPU is present."""
from __future__ import annotations

import torch

from .errors import DmmError


class DeviceError(DmmError):
    """A device name that is malformed or not present on this machine; the message names the fix."""


def resolve_device(name: str) -> torch.device:
    """`name` as a torch.device, refused unless it is the CPU or a CUDA device this machine has."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise DeviceError(f"unknown device {name!r}; use --device cpu or --device cuda[:N]") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise DeviceError(f"device {name!r} is not supported; use --device cpu or --device cuda[:N]")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise DeviceError(f"device {name!r}: this machine has no CUDA GPU (or torch has no CUDA support); "
                          "use --device cpu")
    if device.index is not None and device.index >= count:
        raise DeviceError(f"device {name!r}: this machine has {count} CUDA GPU(s), cuda:0..cuda:{count - 1}; "
                          "pick one of them")
    return device
