"""One-at-a-time vs model-batched training of the same K subset models (α = 0.5, the pair's recipe):
models per hour, achieved vs peak FLOP/s, and peak memory per model, for each trainer.

Run: python benchmarks/bench_training.py [--dataset digits] [--model M] [--models 256] [--block B]
     python benchmarks/bench_training.py --dataset cifar10 --model resnet9 --tiny     # 2 CPU cores, minutes
     python benchmarks/bench_training.py --dataset cifar10 --model resnet9 --device cuda [--amp bf16] [--channels-last]
`--tiny` trains a narrow ResNet-9 (--width, default 16) for --epochs (default 2) on a generated CIFAR-format
dataset (--images random uint8 images, normalised as CIFAR-10 is; nothing is downloaded). Both trainers
produce what `dmm estimate` stores: every model's logits on every point. Torch's CPU allocator is asked for
transparent huge pages (THP_MEM_ALLOC_ENABLE=1, both trainers). Prints a summary, then one JSON line last
("ratio": batched over one-at-a-time models per hour).
"""
from __future__ import annotations

import os

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # read once, at torch's first CPU allocation

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import ctypes  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from attribution.datasets import CIFAR10_MEAN, CIFAR10_STD, load_dataset, make_dataset  # noqa: E402
from attribution.device import DeviceError, resolve_device  # noqa: E402
from attribution.engine import train_batched, train_model  # noqa: E402
from attribution.evaluation import accuracy, model_logits  # noqa: E402
from attribution.models import build_model, default_model, resnet9  # noqa: E402
from attribution.recipes import default_recipe  # noqa: E402
from attribution.subsets import block_subsets  # noqa: E402

TINY_WIDTH = 16


def tiny_resnet9(input_shape, num_classes):
    """ResNet-9 at --width (the `--tiny` model)."""
    return resnet9(input_shape, num_classes, width=TINY_WIDTH)


def tiny_cifar(n_train: int, n_test: int = 256, seed: int = 0):
    """CIFAR-format data: random uint8 images (3×32×32), normalised as CIFAR-10 is, 10 random classes."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n_train + n_test, 3, 32, 32), dtype=np.uint8)
    x = (images / np.float32(255) - CIFAR10_MEAN[:, None, None]) / CIFAR10_STD[:, None, None]
    y = rng.integers(0, 10, n_train + n_test)
    return make_dataset("cifar10-tiny", x[:n_train], y[:n_train], x[n_train:], y[n_train:], num_classes=10)


def matmul_peak_gflops(device: torch.device, dtype: torch.dtype, repeats: int = 5) -> float:
    """Best-of n×n matmul rate on the device in `dtype` (n = 8192 on a GPU, 2048 on a CPU): the ceiling any
    trainer could reach."""
    n = 8192 if device.type == "cuda" else 2048
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = min(_timed(lambda: a @ b, device) for _ in range(repeats + 1))
    return 2 * n**3 / best / 1e9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _clocked(fn, device: torch.device):
    """fn's result, wall seconds and this process's CPU seconds."""
    _sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - wall, time.process_time() - cpu


def flops(model_name: str, data, batch: int) -> tuple[float, float]:
    """(training FLOPs of one sample: forward + backward, eval FLOPs of one point), by FlopCounterMode."""
    model = build_model(model_name, data.input_shape, data.num_classes, seed=0)
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(data.x_train[:batch]), data.y_train[:batch]).backward()
    train = counter.get_total_flops() / batch
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(data.x_train[:batch])
    return train, counter.get_total_flops() / batch


class PeakMemory:
    """Peak memory in use while the block runs, above what was in use when it started: the GPU's allocated
    bytes, or on a CPU malloc's bytes in use (glibc's mallinfo2, main arena) sampled every 10 ms."""

    def __init__(self, device: torch.device):
        self.device, self.peak, self._stop = device, 0, threading.Event()

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            self.start = self.peak = _malloc_in_use()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, _malloc_in_use())

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
        self.bytes = max(0, self.peak - self.start)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


def _malloc_in_use() -> int:
    """Bytes malloc has handed out and not taken back: heap chunks in use plus mmapped chunks."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--model", default=None, help="default: the dataset's")
    parser.add_argument("--models", type=int, default=None, help="K (default 256; --tiny 4)")
    parser.add_argument("--block", type=int, default=None, help="models per batched pass (default: the engine's)")
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--epochs", type=int, default=None, help="default: the recipe's (--tiny 2)")
    parser.add_argument("--tiny", action="store_true", help="narrow ResNet-9 on generated CIFAR-format images")
    parser.add_argument("--width", type=int, default=TINY_WIDTH, help="--tiny's ResNet-9 width (papers: 64)")
    parser.add_argument("--images", type=int, default=1024, help="--tiny's training images")
    parser.add_argument("--repeats", type=int, default=1, help="time both trainers this many times, best of")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", choices=["none", "bf16"], default="none", help="bf16 autocast (GPU)")
    parser.add_argument("--channels-last", action="store_true", help="channels-last images, both trainers")
    args = parser.parse_args(argv)
    if args.tiny and (args.dataset, args.model or "resnet9") != ("cifar10", "resnet9"):
        parser.error("--tiny is for --dataset cifar10 --model resnet9; drop it or change the pair")
    try:
        args.device = resolve_device(args.device)
    except DeviceError as e:
        parser.error(str(e))
    if args.amp == "bf16" and args.device.type != "cuda":
        parser.error("--amp bf16 is measured on a GPU: pass --device cuda (this CPU would emulate bf16 matmuls)")
    return args


def main(argv=None) -> None:
    global TINY_WIDTH
    args = parse_args(argv)
    device = args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tiny:
        TINY_WIDTH = args.width
        data, model_name = tiny_cifar(args.images), f"{__name__}:tiny_resnet9"
        recipe = default_recipe("cifar10", "resnet9").with_epochs(args.epochs or 2)
    else:
        data = load_dataset(args.dataset, download=True)
        model_name = args.model or default_model(data.name)
        recipe = default_recipe(data.name, model_name)
        recipe = recipe if args.epochs is None else recipe.with_epochs(args.epochs)
    k = args.models or (4 if args.tiny else 256)
    masks, seeds = block_subsets(0, 0, k, data.n_train, args.alpha)
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if args.amp == "bf16" else contextlib.nullcontext()
    x_all = data.all_inputs()

    def one_at_a_time(seeds, masks, recipe=recipe):
        accs, peak = [], 0
        for seed, mask in zip(seeds, masks):
            with PeakMemory(device) as mem, amp:
                model = train_model(model_name, data, recipe, int(seed), mask, device, channels_last=args.channels_last)
                logits = model_logits(model, x_all)  # what a store keeps: logits on every point
            peak = max(peak, mem.bytes)
            accs.append(accuracy(logits[data.n_train:], data.y_test))
        return accs, peak

    def batched(seeds, masks, recipe=recipe):
        accs, peak, block = [], 0, args.block or len(seeds)
        for lo in range(0, len(seeds), block):
            with PeakMemory(device) as mem, amp:
                result = train_batched(model_name, data, recipe, seeds[lo:lo + block], masks[lo:lo + block], device,
                                       group_size=args.block, channels_last=args.channels_last)
            peak = max(peak, mem.bytes / min(result.group_size, len(seeds[lo:lo + block])))  # models held at once
            accs += [accuracy(lg.cpu(), data.y_test) for lg in result.logits[:, data.n_train:]]
        return accs, peak, result.group_size

    warm_up = recipe.with_epochs(1)  # first calls pay for kernel set-up and fresh memory: not timed
    one_at_a_time(seeds[:1], masks[:1], warm_up)
    batched(seeds[:1], masks[:1], warm_up)
    seq_s = seq_cpu = batched_s = batched_cpu = float("inf")
    for _ in range(args.repeats):  # alternating, best of: a shared machine's load hits both trainers alike
        (seq_acc, seq_peak), wall, cpu = _clocked(lambda: one_at_a_time(seeds, masks), device)
        seq_s, seq_cpu = min(seq_s, wall), min(seq_cpu, cpu)
        (batched_acc, batched_peak, group), wall, cpu = _clocked(lambda: batched(seeds, masks), device)
        batched_s, batched_cpu = min(batched_s, wall), min(batched_cpu, cpu)

    train_flops, eval_flops = flops(model_name, data, min(8, data.n_train))
    total_flops = train_flops * recipe.epochs * masks.sum() + eval_flops * k * data.n_points
    peak = matmul_peak_gflops(device, torch.bfloat16 if args.amp == "bf16" else torch.float32)
    row = {
        "bench": "training", "dataset": data.name, "model": model_name.rpartition(":")[2], "models": k,
        "device": str(device), "threads": torch.get_num_threads(), "repeats": args.repeats, "amp": args.amp,
        "channels_last": args.channels_last, "epochs": recipe.epochs, "batch_size": recipe.batch_size,
        "one_at_a_time_models_per_hour": round(k / seq_s * 3600, 1),
        "batched_models_per_hour": round(k / batched_s * 3600, 1),
        "ratio": round(seq_s / batched_s, 2),
        "cpu_ratio": round(seq_cpu / batched_cpu, 2), "group_size": group,
        "one_at_a_time_gflops": round(total_flops / seq_s / 1e9, 2),
        "batched_gflops": round(total_flops / batched_s / 1e9, 2),
        "peak_gflops": round(peak, 1),
        "one_at_a_time_peak_mib_per_model": round(seq_peak / 2**20, 1),
        "batched_peak_mib_per_model": round(batched_peak / 2**20, 1),
        "one_at_a_time_acc": round(float(np.mean(seq_acc)), 4), "batched_acc": round(float(np.mean(batched_acc)), 4),
    }
    if args.tiny:
        row.update(width=args.width, images=args.images)
    print(f"{k} {row['model']} models on {data.name} ({device}, {row['threads']} threads, amp {args.amp}, "
          f"channels-last {args.channels_last}, {recipe.epochs} epochs):")
    for name, s, peak_bytes, acc in (("one at a time", seq_s, seq_peak, seq_acc), ("batched", batched_s,
                                                                                  batched_peak, batched_acc)):
        print(f"  {name:14s} {s:8.1f} s  {k / s * 3600:9.1f} models/h  {total_flops / s / 1e9:8.2f} GFLOP/s of "
              f"{peak:.0f} peak  {peak_bytes / 2**20:8.1f} MiB peak per model  held-out acc {np.mean(acc):.4f}")
    print(f"  batched (groups of {group}) / one at a time: x{row['ratio']} in wall time, x{row['cpu_ratio']} in "
          f"CPU time ({seq_cpu:.1f} vs {batched_cpu:.1f} s)")
    print(json.dumps(row))


if __name__ == "__main__":
    main()
