"""Model registry: `mlp`, `cnn1d`, `resnet9`, `linear`, or `module:callable` for a user factory.

A factory takes (input_shape, num_classes) and returns an `nn.Module` mapping a batch of inputs to
k logits. Initialisation is seeded by the caller (`build_model(..., seed=s)`), so a seed fixes θ's init.

Resolving `module:callable` imports the module, which runs its code. A name the user typed is trusted;
a name read from a file (a model sidecar, a store's attributes) is resolved only with consent:
`require_consent` refuses it unless the user passed --trust-code (`trust_code=True`).
"""
from __future__ import annotations

import importlib
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from .errors import DmmError


class ModelError(DmmError):
    """An unknown or unusable model name; the message names the fix."""


def linear(input_shape, num_classes) -> nn.Module:
    """Softmax regression: one nn.Linear on flattened inputs, logits z = W x + b (PRU's linear model).
    It has no default recipe: train it with --recipe."""
    return nn.Sequential(nn.Flatten(), nn.Linear(int(torch.tensor(input_shape).prod()), num_classes))


def mlp(input_shape, num_classes, hidden=(256,)) -> nn.Module:
    """Fully connected ReLU network on flattened inputs (digits, mnist1d).

    Width 256 by default: on digits it takes the datamodels' held-out LDS at m = 2,000 subset models
    from 0.53 per logit / 0.67 margin (width 32) to 0.78 / 0.84, at 4.5× the training time and the
    same fit time (README, "Datamodel quality")."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = int(torch.tensor(input_shape).prod())
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


MATMUL_MAX_BATCH = 128  # the matching's batch (64) and the mnist1d recipe's (128) take the matmul


class MatmulConv1d(nn.Conv1d):
    """nn.Conv1d (the same parameters, init and function) computed as one matmul over its windows on batches of
    up to `MATMUL_MAX_BATCH` points, and by nn.Conv1d (oneDNN on a CPU) above.

    out[n, o, l] = b_o + Σ_{c,j} W[o, c, j] · x_pad[n, c, s·l + j]: the windows (N·L', k·C) times W laid out
    (O, k·C), transposed. At `cnn1d`'s sizes oneDNN's fixed cost per call is much of a small step, so a matching step
    (batch 64) is cheaper so (`benchmarks/bench_unlearn.py`), while on thousands of points (θ0's logits,
    evaluations) the window copies cost more than oneDNN's kernel saves. The windows are k strided slices of
    x_pad, stacked: slicing's backward is cheaper than `unfold`'s and has a vmap batching rule (the engine's
    stacked models), which `unfold_backward` lacks. They are laid out (k, C) — runs of C contiguous
    channels, W permuted to match — since stacking k interleaved single floats, the (C, k) layout, is a
    scattered copy several times slower. It takes only what the matmul computes: no dilation or
    groups, always a bias, zero padding.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > MATMUL_MAX_BATCH:
            return super().forward(x)
        return self.from_windows(self.windows(x))

    def windows(self, x: torch.Tensor) -> torch.Tensor:
        """The matmul's input side: x's windows (N, L', k·C), laid out (k, C)."""
        (k,), (stride,), (pad,) = self.kernel_size, self.stride, self.padding
        rows = F.pad(x.transpose(1, 2), (0, 0, pad, pad))  # (N, L + 2·pad, C), channels contiguous
        n, padded, c = rows.shape
        length = (padded - k) // stride + 1
        last = stride * (length - 1) + 1
        return torch.stack([rows[:, j: j + last: stride] for j in range(k)], dim=-2).view(n, length, k * c)

    def from_windows(self, windows: torch.Tensor) -> torch.Tensor:
        """The convolution's output (N, O, L') from its input's `windows` (N, L', k·C): one matmul with W laid out
        (O, k·C), transposed."""
        n, length, width = windows.shape
        out = torch.addmm(self.bias, windows.reshape(n * length, width),
                          self.weight.transpose(1, 2).reshape(self.out_channels, width).t())
        return out.view(n, length, self.out_channels).transpose(1, 2)


class WindowedConv1d(nn.Module):
    """A `MatmulConv1d` fed its input's windows instead of the input, sharing its parameters: where the input is
    frozen (the matching's head on the frozen trunk's outputs) the windows are computed once, not at every step."""

    def __init__(self, conv: MatmulConv1d):
        super().__init__()
        self.conv = conv

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        return self.conv.from_windows(windows)


def cnn1d(input_shape, num_classes, channels=32) -> nn.Module:
    """Small 1-D CNN for mnist1d (3 strided convolutions, no normalisation so it batches with vmap)."""
    length = int(input_shape[-1])
    out_len = length
    for _ in range(3):
        out_len = (out_len + 2 * 1 - 3) // 2 + 1
    return nn.Sequential(
        nn.Unflatten(1, (1, length)),
        MatmulConv1d(1, channels, 3, stride=2, padding=1), nn.ReLU(),
        MatmulConv1d(channels, channels, 3, stride=2, padding=1), nn.ReLU(),
        MatmulConv1d(channels, channels, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(),
        nn.Linear(channels * out_len, num_classes),
    )


class Residual(nn.Module):
    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x):
        return x + self.module(x)


class Scale(nn.Module):
    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor


def _conv_bn(c_in, c_out, kernel_size=3, stride=1, padding=1) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size, stride=stride, padding=padding, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


def resnet9(input_shape, num_classes, width: int = 64) -> nn.Module:
    """The CIFAR-10 ResNet-9 of the datamodels/TRAK/KLoM papers (ffcv example architecture): stages of
    width, 2·width and 4·width channels (width 64 in the papers; smaller for quick runs and tests)."""
    c, w = int(input_shape[0]), int(width)
    return nn.Sequential(
        _conv_bn(c, w),
        _conv_bn(w, 2 * w, kernel_size=5, stride=2, padding=2),
        Residual(nn.Sequential(_conv_bn(2 * w, 2 * w), _conv_bn(2 * w, 2 * w))),
        _conv_bn(2 * w, 4 * w),
        nn.MaxPool2d(2),
        Residual(nn.Sequential(_conv_bn(4 * w, 4 * w), _conv_bn(4 * w, 4 * w))),
        _conv_bn(4 * w, 2 * w, padding=0),
        nn.AdaptiveMaxPool2d((1, 1)),
        nn.Flatten(),
        nn.Linear(2 * w, num_classes, bias=False),
        Scale(0.2),
    )


def parameter_blocks(model: nn.Module) -> list[str]:
    """Names of the model's blocks, input to output: a block is a top-level child module holding parameters
    (CF-k's and EU-k's unit, and the matching's `train_blocks`)."""
    return [name for name, child in model.named_children() if any(True for _ in child.parameters())]


# The blocks DMM's matching trains by default per model (`matching.finetune`, `train_blocks`; 0: every weight).
# cnn1d: its last convolution and the output layer, on the frozen trunk's outputs: the same KLoM as every weight on
# mnist1d's six settings at three seeds, at half the request's wall time (README, "Matching the last blocks").
MATCHING_BLOCKS: dict[str, int] = {"cnn1d": 2}


def matching_blocks(model_name: str | None) -> int:
    """The number of last blocks DMM/OM's matching trains on `model_name` by default (0: every weight)."""
    return MATCHING_BLOCKS.get(model_name, 0)


# The cap on R (|R| at most; 0: none) DMM/OM's matching uses by default per model, as (on a request that deletes part
# of its classes, on one that deletes whole classes); `matching.finetune.retain_cap`, 100 on both for a model not
# listed. mlp: all of R on whole classes, within 2× of the floor and 1.15× of DM-Direct on all three digits classes
# measured, where 100 points left R 1.14–1.33× DM-Direct's (README, "Whole-class deletions"). cnn1d: 50 on partial
# requests, since its matching trains only its last two blocks (MATCHING_BLOCKS), which R's points share with F's:
# mnist1d's class:3:200 within 2× of the floor at three seeds, where 100 missed (README, "The cap on R"); 100 on
# whole classes, where R carries the class's shift (50: R 1.24–1.27× DM-Direct's on class 3; all of R: F 2.11–2.28×
# the floor on class 7).
RETAIN_CAPS: dict[str, tuple[int, int]] = {"mlp": (100, 0), "cnn1d": (50, 100)}


MODELS: dict[str, Callable[..., nn.Module]] = {"mlp": mlp, "cnn1d": cnn1d, "resnet9": resnet9,
                                               "linear": linear}
DEFAULT_MODEL = {"digits": "mlp", "mnist1d": "cnn1d", "cifar10": "resnet9"}


def resolve_factory(name: str) -> Callable[..., nn.Module]:
    if name in MODELS:
        return MODELS[name]
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            raise ModelError(f"cannot load model factory {name!r} ({e}); give an importable module:callable") from None
        if not callable(factory):
            raise ModelError(f"{name!r} is not callable; give a function (input_shape, num_classes) -> nn.Module")
        return factory
    raise ModelError(f"unknown model {name!r}; choose one of {', '.join(MODELS)} or module:callable")


def build_model(name: str, input_shape, num_classes: int, seed: int) -> nn.Module:
    """Instantiate model `name` with its initialisation drawn from `seed` (global RNG left untouched)."""
    factory = resolve_factory(name)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)  # the CPU generator only: models are built on the CPU
        model = factory(tuple(input_shape), num_classes)
    if not isinstance(model, nn.Module):
        raise ModelError(f"factory {name!r} returned {type(model).__name__}; return a torch.nn.Module")
    return model


def default_model(dataset_name: str) -> str:
    """The model a dataset gets without --model; only the registered datasets have one."""
    if dataset_name not in DEFAULT_MODEL:
        raise ModelError(f"no default model for dataset {dataset_name!r}; pass --model "
                         f"({', '.join(MODELS)} or module:callable) and --recipe")
    return DEFAULT_MODEL[dataset_name]


def names_code(name: str) -> bool:
    """Whether resolving `name` would import a module (a `module:callable`, not a registry name)."""
    return name not in MODELS and ":" in name


def require_consent(name: str, source: str, trust_code: bool) -> None:
    """Refuse a `module:callable` that `source` (a file) names unless the user consented; imports nothing."""
    if names_code(name) and not trust_code:
        module = name.partition(":")[0]
        raise ModelError(f"{source} names the model factory {name!r}: loading it would import module {module!r} "
                         "and run its code; if you trust this file, pass --trust-code (API: trust_code=True)")
