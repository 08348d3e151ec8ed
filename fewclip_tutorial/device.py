"""Device selection, mixed precision and seeding.

Every module of the package runs on whatever hardware is there: a CUDA GPU
(with automatic mixed precision), an Apple GPU (``mps``) or the CPU.  Code asks
:func:`get_device` once and wraps forward passes in :func:`autocast`.

Examples:
    >>> device = get_device()              # cuda > mps > cpu, or $FEWCLIP_DEVICE
    >>> with autocast(device):             # fp16/bf16 on CUDA, a no-op elsewhere
    ...     pass
    >>> seed_everything(1)                 # random, numpy, torch (and CUDA)
"""

from __future__ import annotations

import contextlib
import inspect
import os
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

__all__ = [
    "DEVICE_ENV_VAR",
    "NUM_WORKERS_ENV_VAR",
    "autocast",
    "autocast_dtype",
    "bf16_supported",
    "default_num_workers",
    "float32_or_64",
    "get_device",
    "loader_kwargs",
    "seed_everything",
]

#: Environment variable that overrides the automatic device choice (e.g. ``cpu``).
DEVICE_ENV_VAR = "FEWCLIP_DEVICE"
#: Environment variable that overrides :func:`default_num_workers` (e.g. ``0`` or ``4``).
NUM_WORKERS_ENV_VAR = "FEWCLIP_NUM_WORKERS"
#: Most image-decoding workers used by default on a GPU machine.
MAX_DEFAULT_WORKERS = 8


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def get_device(prefer: str | torch.device | None = None) -> torch.device:
    """Return the device to compute on.

    Order of precedence: the ``prefer`` argument, then the ``FEWCLIP_DEVICE``
    environment variable, then the first available of ``cuda``, ``mps``, ``cpu``.

    Args:
        prefer: an explicit device such as ``"cpu"``, ``"cuda"`` or ``"cuda:1"``.

    Raises:
        ValueError: the requested device string is not a valid torch device, or
            it names CUDA/MPS on a machine that has none.
    """
    requested = prefer if prefer is not None else os.environ.get(DEVICE_ENV_VAR) or None
    if requested is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")

    source = "prefer" if prefer is not None else f"${DEVICE_ENV_VAR}"
    try:
        device = torch.device(requested)
    except (RuntimeError, TypeError) as err:
        raise ValueError(
            f"{source}={requested!r} is not a torch device; use 'cpu', 'cuda', 'cuda:0' or 'mps'."
        ) from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"{source}={requested!r} asks for CUDA but no CUDA GPU is available; "
            f"use 'cpu' or unset ${DEVICE_ENV_VAR}."
        )
    if device.type == "mps" and not _mps_available():
        raise ValueError(
            f"{source}={requested!r} asks for MPS but it is not available; "
            f"use 'cpu' or unset ${DEVICE_ENV_VAR}."
        )
    return device


def bf16_supported(device: torch.device | str = "cuda") -> bool:
    """Whether the GPU computes in bf16 natively (compute capability 8.0 and up: A100, L4, H100).

    ``torch.cuda.is_bf16_supported()`` also says ``True`` where bf16 is only *emulated*
    (a T4 or V100, capability 7.x): autocast to bf16 then runs slower than fp16 and loses
    precision for nothing.  So emulation is excluded: with ``including_emulation=False``
    where torch has that argument (2.4 and later), else by the compute capability.
    """
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    check = torch.cuda.is_bf16_supported
    try:
        accepts = "including_emulation" in inspect.signature(check).parameters
    except (TypeError, ValueError):  # a builtin without a signature
        accepts = False
    if accepts:
        return bool(check(including_emulation=False))
    major, _minor = torch.cuda.get_device_capability(device)
    return major >= 8 and bool(check())


def autocast_dtype(device: torch.device | str) -> torch.dtype | None:
    """The reduced-precision dtype used on ``device``: bf16 where the GPU has it natively
    (:func:`bf16_supported`), else fp16 (with a ``GradScaler`` when training).

    Returns ``None`` on devices where no autocast is applied (CPU, MPS).
    """
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return torch.bfloat16 if bf16_supported(device) else torch.float16


def default_num_workers(device: torch.device | str) -> int:
    """DataLoader workers for decoding images: ``min(8, CPUs)`` on CUDA, ``0`` elsewhere.

    On a GPU, decoding a JPEG and resizing it to 224 px costs a few ms per image on one core,
    an order of magnitude more than the forward pass, so a single process starves the GPU.
    On CPU and MPS the model competes with the workers for the same cores, and one process
    keeps runs deterministic and quiet.  ``$FEWCLIP_NUM_WORKERS`` overrides the choice.

    Raises:
        ValueError: ``$FEWCLIP_NUM_WORKERS`` is not a non-negative integer.
    """
    env = os.environ.get(NUM_WORKERS_ENV_VAR, "").strip()
    if env:
        try:
            value = int(env)
        except ValueError:
            value = -1
        if value < 0:
            raise ValueError(
                f"${NUM_WORKERS_ENV_VAR}={env!r} is not a number of workers; "
                "use a non-negative integer such as 0 or 4, or unset it."
            )
        return value
    if torch.device(device).type != "cuda":
        return 0
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cpus = os.cpu_count() or 1
    return max(0, min(MAX_DEFAULT_WORKERS, cpus))


def loader_kwargs(
    device: torch.device | str, num_workers: int | None = None, epochs: int = 1
) -> dict[str, Any]:
    """Keyword arguments of a ``DataLoader`` of images for ``device``.

    Args:
        device: where the batches go (``pin_memory`` on CUDA).
        num_workers: decoding processes (``None``: :func:`default_num_workers`).
        epochs: how often the loader is iterated; above 1, workers persist between epochs
            (``persistent_workers``) instead of being started again for each.

    Returns:
        ``{"num_workers", "pin_memory", "persistent_workers"}`` (+ ``"prefetch_factor"`` with
        workers).

    Raises:
        ValueError: ``num_workers`` is negative.
    """
    device = torch.device(device)
    workers = default_num_workers(device) if num_workers is None else int(num_workers)
    if workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}.")
    kwargs: dict[str, Any] = {
        "num_workers": workers,
        "pin_memory": device.type == "cuda",
        "persistent_workers": workers > 0 and epochs > 1,
    }
    if workers > 0:
        kwargs["prefetch_factor"] = 4
    return kwargs


@contextlib.contextmanager
def autocast(device: torch.device | str, enabled: bool = True) -> Iterator[None]:
    """Mixed precision on CUDA, nothing elsewhere.

    On CUDA this is ``torch.autocast("cuda", dtype=bf16 or fp16)``; on CPU/MPS it
    is a ``nullcontext`` so results stay bit-exact fp32 (and deterministic on CPU).
    """
    dtype = autocast_dtype(device) if enabled else None
    if dtype is None:
        with contextlib.nullcontext():
            yield
    else:
        with torch.autocast("cuda", dtype=dtype):
            yield


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy, and torch (CPU and every CUDA device)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an integer, got {seed!r}.")
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def float32_or_64(x: torch.Tensor) -> torch.Tensor:
    """``x.float()``, except that a float64 tensor stays float64.

    fp16/bf16 (and integer) tensors become float32 exactly as with ``x.float()``, and a float32
    tensor is returned as is, so no float32 result changes.  Keeping float64 lets tests run a
    function in float64, where two summation orders differ by rounding (~1e-16 relative)
    instead of float32's ~1e-7, and compare it to a reference with a tight tolerance.
    """
    return x if x.dtype == torch.float64 else x.float()


def cpu_info() -> dict[str, Any]:
    """The CPU a measurement ran on: ``cpu_model`` (from /proc/cpuinfo where there is one),
    ``cpu_capability`` (the instruction set torch's kernels use, e.g. ``AVX512``; set by
    ``ATEN_CPU_CAPABILITY``) and ``threads`` (torch's thread count)."""
    import platform

    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    return {
        "cpu_model": model,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
    }
