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
import os
import random
from collections.abc import Iterator

import numpy as np
import torch

__all__ = ["DEVICE_ENV_VAR", "autocast", "autocast_dtype", "get_device", "seed_everything"]

#: Environment variable that overrides the automatic device choice (e.g. ``cpu``).
DEVICE_ENV_VAR = "FEWCLIP_DEVICE"


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


def autocast_dtype(device: torch.device | str) -> torch.dtype | None:
    """The reduced-precision dtype used on ``device``: bf16 if the GPU supports it, else fp16.

    Returns ``None`` on devices where no autocast is applied (CPU, MPS).
    """
    device = torch.device(device)
    if device.type != "cuda":
        return None
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


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
