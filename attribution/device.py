"""The torch device a command computes on: `cpu` (default) or `cuda[:N]` where a GPU is present, and
the device of a Ray GPU worker (`dmm estimate --gpus-per-task`): its GPU, or the CPU under DMM_FORCE_DEVICE=cpu."""
from __future__ import annotations

import os

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


FORCE_DEVICE = "DMM_FORCE_DEVICE"  # `cpu`: Ray's GPU workers compute on the CPU (scheduling tests without a GPU)


def forced_cpu() -> bool:
    """Whether DMM_FORCE_DEVICE=cpu is set; any other non-empty value is refused."""
    value = os.environ.get(FORCE_DEVICE, "").strip()
    if value not in ("", "cpu"):
        raise DeviceError(f"{FORCE_DEVICE}={value!r} is not supported; set {FORCE_DEVICE}=cpu or unset it")
    return value == "cpu"


def gpu_worker_device(gpu_ids, force_cpu: bool = False) -> torch.device:
    """The device of a Ray worker that Ray assigned the GPUs `gpu_ids`: the CPU when forced, else cuda:0.

    Ray shows a worker only its own GPUs (CUDA_VISIBLE_DEVICES), so its first one is cuda:0.
    """
    if force_cpu:
        return torch.device("cpu")
    if not gpu_ids:
        raise DeviceError("this Ray worker was assigned no GPU; fix: give --gpus-per-task > 0")
    if not torch.cuda.is_available():
        raise DeviceError(f"Ray assigned GPU(s) {list(gpu_ids)} but torch {torch.__version__} here has no CUDA; "
                          f"fix: install a CUDA build of torch on the GPU nodes, or set {FORCE_DEVICE}=cpu")
    return torch.device("cuda", 0)
