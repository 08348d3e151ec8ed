"""Frozen CLIP-style backbones: the embedded ``shapeworld-tiny`` and any open_clip model.

:func:`load_backbone` returns a :class:`Backbone`: a frozen open_clip ``CLIP``
model plus everything a few-shot method needs around it (eval transform,
tokenizer, device, normalisation constants, a stable cache identifier, and
two encoders that return L2-normalised fp32 features).

Three ways to get one::

    load_backbone("shapeworld-tiny")                     # shipped with the package, offline
    load_backbone("ViT-B-32", pretrained="openai")       # hub weights -> ViT-B-32-quickgelu
    load_backbone("/path/to/ckpt.pt", arch="ViT-B-32")   # a local checkpoint file

Hub weights are only fetched when they are not in the local cache *and* the hub
answers; otherwise :class:`WeightsUnavailableError` is raised at once instead of
waiting for open_clip's retries.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import hashlib
import http.client
import json
import logging
import os
import pickle
import re
import urllib.error
import urllib.request
import warnings
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import open_clip
import torch
import torch.nn.functional as F

from fewclip_tutorial.device import autocast, get_device

__all__ = [
    "ASSETS_DIR",
    "EMBEDDED_BACKBONE",
    "Backbone",
    "BackboneError",
    "CheckpointFormatError",
    "CheckpointIntegrityError",
    "CheckpointNotFoundError",
    "UnknownBackboneError",
    "UnknownPretrainedTagError",
    "WeightsUnavailableError",
    "embedded_checkpoint_path",
    "file_sha256",
    "is_torchscript_archive",
    "list_backbones",
    "load_backbone",
    "load_state_dict_file",
    "register_embedded_config",
    "resolve_local_arch",
    "resolve_pretrained_tag",
    "state_dict_digest",
]

logger = logging.getLogger(__name__)

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
#: Name of the backbone shipped with the package.
EMBEDDED_BACKBONE = "shapeworld-tiny"
_EMBEDDED_CONFIG = ASSETS_DIR / f"{EMBEDDED_BACKBONE}.json"
_EMBEDDED_CHECKPOINT = ASSETS_DIR / f"{EMBEDDED_BACKBONE}.pt"
_EMBEDDED_TRAIN_INFO = ASSETS_DIR / f"{EMBEDDED_BACKBONE}.train.json"

_HUB_TIMEOUT_S = 2.0
_OFFLINE_VALUES = {"1", "true", "yes", "on"}
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".npz")


# --------------------------------------------------------------------------- errors


class BackboneError(Exception):
    """Base class of the errors raised while loading a backbone."""


class UnknownBackboneError(BackboneError, KeyError):
    """The backbone name is neither ``shapeworld-tiny``, an open_clip architecture nor a file."""

    def __str__(self) -> str:  # KeyError would wrap the message in quotes
        return str(self.args[0]) if self.args else ""


class UnknownPretrainedTagError(BackboneError, ValueError):
    """The pretrained tag does not exist for this architecture."""


class CheckpointNotFoundError(BackboneError, FileNotFoundError):
    """A checkpoint file that was asked for does not exist."""


class CheckpointIntegrityError(BackboneError, RuntimeError):
    """The shipped checkpoint does not match the sha256 recorded next to it."""


class WeightsUnavailableError(BackboneError, RuntimeError):
    """Hub weights are not cached locally and the hub cannot be reached."""


class CheckpointFormatError(BackboneError, ValueError):
    """A weights file cannot be read as a state dict (e.g. an unreadable TorchScript archive)."""


# --------------------------------------------------------------------------- Backbone


@dataclass
class Backbone:
    """A frozen image/text encoder pair with its preprocessing.

    Attributes:
        name: ``"shapeworld-tiny"``, an open_clip architecture (``"ViT-B-32-quickgelu"``)
            or the path of a local checkpoint.
        pretrained: the open_clip pretrained tag, ``"default"`` for the shipped
            checkpoint, a file path, or ``None`` for random initialisation.
        model: the open_clip ``CLIP`` model, in eval mode with ``requires_grad=False``.
        preprocess: eval transform ``PIL.Image -> (3, H, W)`` tensor.
        tokenizer: ``list[str] -> (T, context_length)`` int64 token ids.
        device: where the model lives; encoders return tensors on this device.
        image_size: input resolution ``H = W``.
        mean, std: per-channel normalisation used by ``preprocess``.
        identifier: stable id for feature-cache keys, ``"{name}:{pretrained}:{weights id}"``
            (``"{arch}:file:{sha256[:12]}"`` for local checkpoint files).
        logit_scale: ``exp(model.logit_scale)``, the learned softmax temperature.
        arch: the open_clip architecture actually built.
    """

    name: str
    pretrained: str | None
    model: Any
    preprocess: Callable[[Any], torch.Tensor]
    tokenizer: Callable[[list[str]], torch.Tensor]
    device: torch.device
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    identifier: str
    logit_scale: float
    arch: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def embed_dim(self) -> int:
        """``D``, the dimension of the joint embedding space."""
        proj = getattr(self.model, "text_projection", None)
        if isinstance(proj, torch.Tensor):
            return int(proj.shape[-1])
        if isinstance(proj, torch.nn.Linear):
            return int(proj.out_features)
        return int(self.encode_text(["a"]).shape[-1])

    @property
    def dtype(self) -> torch.dtype:
        """The floating dtype of the image tower's weights (``float32`` unless converted)."""
        for param in self.model.visual.parameters():
            if param.is_floating_point():
                return param.dtype
        return torch.float32

    def encode_images(
        self, images: torch.Tensor, batch_size: int | None = None, normalize: bool = True
    ) -> torch.Tensor:
        """Embed preprocessed images.

        Args:
            images: ``(B, 3, H, W)`` tensor produced by :attr:`preprocess`.
            batch_size: split the forward pass into chunks of this size (``None``: one pass).
            normalize: L2-normalise the features (``False``: the raw output of the image
                tower, ``model.encode_image``, as CoOp's linear probe uses it).

        Returns:
            ``(B, D)`` L2-normalised (or raw) fp32 features on :attr:`device` (usable in
            autograd graphs: the inference-mode forward is converted back to a normal
            tensor), whatever the dtype of ``images`` and of the model's weights
            (:attr:`dtype`).
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"encode_images expects a (B, 3, H, W) batch, got shape {tuple(images.shape)}; "
                "apply backbone.preprocess to each PIL image and torch.stack them."
            )
        chunks = [images] if not batch_size else list(torch.split(images, batch_size))
        dtype = self.dtype
        outs = []
        for chunk in chunks:
            # The input must have the weights' dtype: a model converted to fp16/bf16 (``.half()``)
            # rejects fp32 images.  Such a model already computes in reduced precision, so
            # autocast is only applied to fp32 models.
            with torch.inference_mode(), autocast(self.device, enabled=dtype == torch.float32):
                feats = self.model.encode_image(chunk.to(self.device, dtype, non_blocking=True))
            outs.append(feats)
        # Outside inference mode: functional ops turn inference tensors into normal ones.
        if not normalize:
            return torch.cat(outs).float().clone()
        return F.normalize(torch.cat(outs).float(), dim=-1)

    def encode_text(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """Embed captions/prompts.

        Args:
            texts: ``T`` strings.
            batch_size: prompts per forward pass.

        Returns:
            ``(T, D)`` L2-normalised fp32 features on :attr:`device`.
        """
        if isinstance(texts, str):
            raise TypeError(
                "encode_text expects a list of strings, got a single str; wrap it: [text]."
            )
        texts = list(texts)
        if not texts:
            raise ValueError("encode_text got an empty list of texts; pass at least one prompt.")
        outs = []
        full_precision = self.dtype == torch.float32
        for start in range(0, len(texts), batch_size):
            tokens = self.tokenizer(texts[start : start + batch_size]).to(self.device)
            with torch.inference_mode(), autocast(self.device, enabled=full_precision):
                outs.append(self.model.encode_text(tokens))
        return F.normalize(torch.cat(outs).float(), dim=-1)


# --------------------------------------------------------------------------- helpers


_embedded_registered = False


def register_embedded_config() -> None:
    """Register ``assets/shapeworld-tiny.json`` with open_clip (once per process).

    Raises:
        CheckpointNotFoundError: the config file is not in the package.
    """
    global _embedded_registered
    if _embedded_registered and EMBEDDED_BACKBONE in open_clip.list_models():
        return
    if not _EMBEDDED_CONFIG.is_file():
        raise CheckpointNotFoundError(
            f"The model config of {EMBEDDED_BACKBONE!r} is missing: {_EMBEDDED_CONFIG} does not "
            "exist. Reinstall the package (pip install -e .) or restore fewclip_tutorial/assets/."
        )
    open_clip.add_model_config(_EMBEDDED_CONFIG)
    _embedded_registered = True


def embedded_checkpoint_path() -> Path:
    """Path of the shipped ``shapeworld-tiny`` fp16 checkpoint (it may not exist yet)."""
    return _EMBEDDED_CHECKPOINT


def list_backbones() -> list[str]:
    """Every backbone name :func:`load_backbone` accepts: ``shapeworld-tiny`` first."""
    names = [m for m in open_clip.list_models() if m != EMBEDDED_BACKBONE]
    return [EMBEDDED_BACKBONE, *names]


_sha_cache: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file (memoised per path, size and mtime)."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _sha_cache:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _sha_cache[key] = h.hexdigest()
    return _sha_cache[key]


def _weights_short_id(path: str | os.PathLike) -> str:
    """12 hex digits identifying a weights file.

    Hugging Face cache blobs are named by their sha256, which saves hashing
    gigabytes; other files are hashed.
    """
    real = os.path.realpath(path)
    base = os.path.basename(real)
    if re.fullmatch(r"[0-9a-f]{64}", base):
        return base[:12]
    return file_sha256(real)[:12]


def state_dict_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for key, value in model.state_dict().items():
        h.update(key.encode())
        h.update(value.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


def is_torchscript_archive(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a TorchScript archive (a zip holding ``constants.pkl`` and ``code/``).

    OpenAI released CLIP as TorchScript files (the ``clip`` package caches them as
    ``~/.cache/clip/ViT-B-32.pt``); ``torch.load(weights_only=True)`` refuses them.
    """
    try:
        if not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile):
        return False
    has_constants = any(n == "constants.pkl" or n.endswith("/constants.pkl") for n in names)
    has_code = any(n.startswith("code/") or "/code/" in n for n in names)
    return has_constants and has_code


#: Entries of OpenAI's TorchScript state dicts that are settings, not weights.
_TORCHSCRIPT_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")


def _torchscript_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The state dict of a TorchScript archive (what open_clip's ``load_openai_model`` reads).

    Raises:
        CheckpointFormatError: this torch cannot open the archive; the message names the file
            and the two ways out.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit is deprecated in recent torch
            module = torch.jit.load(str(path), map_location="cpu")
        state = dict(module.state_dict())
    except Exception as err:  # noqa: BLE001 - any failure of the jit loader ends here
        raise CheckpointFormatError(
            f"{str(path)!r} is a TorchScript archive (the format of OpenAI's CLIP release, as "
            f"cached by the `clip` package) and torch {torch.__version__} cannot read it: {err}. "
            "Delete the file (open_clip then downloads the same weights as a state dict from "
            "the Hugging Face hub), or convert it once where torch.jit works: "
            "torch.save(torch.jit.load(path, map_location='cpu').state_dict(), 'weights.pt')."
        ) from err
    for key in _TORCHSCRIPT_EXTRA_KEYS:
        state.pop(key, None)
    return state


def load_state_dict_file(model: torch.nn.Module, path: str | os.PathLike) -> torch.nn.Module:
    """Load weights from ``path`` into ``model`` (strictly), casting to the model's dtypes.

    Accepts a plain state dict, a dict holding it under ``"state_dict"`` or
    ``"model"`` (training checkpoints), ``.safetensors`` files, DataParallel's
    ``"module."`` prefixes, fp16 weights (cast to the parameters' dtype, e.g.
    fp32) and OpenAI's TorchScript release files (``~/.cache/clip/ViT-B-32.pt``: their
    state dict is read through ``torch.jit.load``).  ``.npz`` (big_vision) files are
    delegated to open_clip.

    Raises:
        CheckpointNotFoundError: ``path`` does not exist.
        CheckpointFormatError: the file cannot be read (not a torch file, or a TorchScript
            archive this torch cannot open).
        ValueError: the file holds no state dict, or its keys/shapes do not fit ``model``.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(
            f"Checkpoint file {str(path)!r} does not exist; check the path."
        )
    if path.suffix in (".npz", ".npy"):
        open_clip.load_checkpoint(model, str(path))
        return model
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        obj: Any = load_file(str(path), device="cpu")
    elif is_torchscript_archive(path):
        obj = _torchscript_state_dict(path)
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as err:
            raise CheckpointFormatError(
                f"Cannot read {str(path)!r} as a weights file: {err}. A state dict saved with "
                "torch.save(model.state_dict(), path), a .safetensors file or an OpenAI "
                "TorchScript file is expected; a truncated download is re-fetched after deleting it."
            ) from err
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) for k in obj):
        raise ValueError(
            f"{str(path)!r} does not contain a state dict (a mapping name -> tensor, possibly "
            "under 'state_dict' or 'model'); save one with torch.save(model.state_dict(), path)."
        )
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    own = model.state_dict()
    state: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            continue
        target = own.get(key)
        if target is not None:
            if value.ndim != target.ndim and value.numel() == target.numel():
                value = value.reshape(target.shape)  # logit_scale: scalar vs (1,)
            if value.is_floating_point() and target.is_floating_point():
                value = value.to(target.dtype)
        state[key] = value
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(
            f"The weights in {str(path)!r} do not fit this architecture: {err}\n"
            "Pass the arch= the checkpoint was trained with."
        ) from err
    return model


def _is_offline_env() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _OFFLINE_VALUES


def _hub_reachable(host: str, port: int = 443, timeout: float = _HUB_TIMEOUT_S) -> bool:
    """Whether the hub at ``host:port`` answers an HTTP(S) ``HEAD`` within ``timeout`` seconds.

    The request goes through ``urllib`` with the environment's proxy settings
    (``HTTPS_PROXY``/``HTTP_PROXY``/``NO_PROXY``, as ``huggingface_hub`` uses them), so a
    machine that reaches the internet only through a proxy is not declared offline.  Any
    HTTP answer, an error status included, means the hub is reachable.
    """
    scheme = "http" if port == 80 else "https"
    netloc = host if port in (80, 443) else f"{host}:{port}"
    request = urllib.request.Request(f"{scheme}://{netloc}/", method="HEAD")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler())  # environment proxies
    try:
        with opener.open(request, timeout=timeout):
            return True
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError, http.client.HTTPException):  # URLError, timeouts, refused
        return False


def _hub_host(pretrained_cfg: dict) -> tuple[str, int]:
    if pretrained_cfg.get("hf_hub"):
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    else:
        endpoint = pretrained_cfg.get("url", "https://huggingface.co")
    parsed = urlparse(endpoint)
    return parsed.hostname or "huggingface.co", parsed.port or 443


def _find_cached_weights(pretrained_cfg: dict) -> str | None:
    """Local path of the weights of an open_clip pretrained config, if already downloaded."""
    if pretrained_cfg.get("file") and os.path.isfile(pretrained_cfg["file"]):
        return str(pretrained_cfg["file"])
    hf_hub = pretrained_cfg.get("hf_hub", "")
    if hf_hub:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:  # pragma: no cover - huggingface_hub is an open_clip dependency
            try_to_load_from_cache = None
        if try_to_load_from_cache is not None:
            model_id, filename = os.path.split(hf_hub)
            filename = filename or "open_clip_pytorch_model.bin"
            candidates = []
            if filename == "open_clip_pytorch_model.bin":
                candidates.append("open_clip_model.safetensors")
            elif filename.endswith((".bin", ".pth")):
                candidates.append(filename[:-4] + ".safetensors")
            candidates.append(filename)
            for candidate in candidates:
                found = try_to_load_from_cache(repo_id=model_id, filename=candidate)
                if isinstance(found, str) and os.path.isfile(found):
                    return found
    url = pretrained_cfg.get("url", "")
    if url:
        local = os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(url))
        if os.path.isfile(local):
            return local
    return None


def resolve_pretrained_tag(arch: str, pretrained: str) -> str:
    """Turn ``"default"`` into a concrete tag and validate the tag for ``arch``.

    ``"default"`` means ``"openai"`` when OpenAI weights exist for ``arch``,
    otherwise the first tag open_clip lists.

    Raises:
        UnknownPretrainedTagError: the tag does not exist (the message lists the valid ones).
    """
    tags = open_clip.list_pretrained_tags_by_model(arch)
    if pretrained == "default":
        if not tags:
            raise UnknownPretrainedTagError(
                f"open_clip has no pretrained weights for {arch!r}. Use pretrained=None for a "
                "random initialisation, or a local file: "
                f'load_backbone("/path/to/weights.bin", arch="{arch}").'
            )
        return "openai" if "openai" in tags else tags[0]
    if open_clip.pretrained.is_pretrained_cfg(arch, pretrained):
        return pretrained
    close = difflib.get_close_matches(pretrained, tags, n=3)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    raise UnknownPretrainedTagError(
        f"Unknown pretrained tag {pretrained!r} for {arch!r}.{hint} "
        f"Valid tags: {', '.join(tags) if tags else '(none)'}; or pass a local file path."
    )


def _quickgelu_arch(arch: str, tag: str) -> str:
    """The architecture to build so that the activation matches the weights.

    OpenAI trained CLIP with QuickGELU (``x * sigmoid(1.702 x)``).  open_clip's
    plain names (``ViT-B-32``, ``RN50``, ...) use the exact GELU, and loading
    OpenAI weights into them only *warns*: the model then runs with the wrong
    activation and loses accuracy silently.  When the pretrained tag says
    ``quick_gelu`` and the architecture does not, we build ``<arch>-quickgelu``
    instead (same weights, right activation).
    """
    cfg = open_clip.pretrained.get_pretrained_cfg(arch, tag)
    model_cfg = open_clip.get_model_config(arch) or {}
    if cfg.get("quick_gelu", False) and not model_cfg.get("quick_gelu", False):
        candidate = f"{arch}-quickgelu"
        if candidate in open_clip.list_models():
            logger.info(
                "Pretrained tag %r was trained with QuickGELU: building %r instead of %r.",
                tag,
                candidate,
                arch,
            )
            return candidate
    return arch


def _unknown_backbone(name: str) -> UnknownBackboneError:
    names = list_backbones()
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    return UnknownBackboneError(
        f"Unknown backbone {name!r}.{hint} Use {EMBEDDED_BACKBONE!r} (shipped, works offline), "
        "an open_clip architecture, or a local file with arch=... . "
        f"Known names ({len(names)}): {', '.join(names)}"
    )


def _looks_like_path(name: str) -> bool:
    return os.sep in name or name.startswith((".", "~")) or name.endswith(_CHECKPOINT_SUFFIXES)


@contextlib.contextmanager
def _quiet_random_init_warning() -> Iterator[None]:
    """Hide open_clip's "initialized randomly" warning when we load weights ourselves."""

    class _Filter(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "No pretrained weights loaded" not in record.getMessage()

    root = logging.getLogger()
    flt = _Filter()
    root.addFilter(flt)
    try:
        yield
    finally:
        root.removeFilter(flt)


@functools.lru_cache(maxsize=16)
def _tokenizer(arch: str) -> Callable[[list[str]], torch.Tensor]:
    """open_clip's tokenizer for ``arch`` (stateless, so shared: building it reads the BPE vocab)."""
    return open_clip.get_tokenizer(arch)


def _build(arch: str, **kwargs: Any) -> tuple[torch.nn.Module, Callable]:
    model, _, preprocess = open_clip.create_model_and_transforms(arch, **kwargs)
    return model, preprocess


def _finalise(
    model: torch.nn.Module,
    preprocess: Callable,
    *,
    name: str,
    arch: str,
    pretrained: str | None,
    weights_id: str,
    device: torch.device,
    info: dict[str, Any],
) -> Backbone:
    model = model.to(device).eval()
    model.requires_grad_(False)
    pcfg = open_clip.get_model_preprocess_cfg(model)
    size = pcfg.get("size", 224)
    image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
    mean = tuple(float(x) for x in pcfg.get("mean", open_clip.OPENAI_DATASET_MEAN))
    std = tuple(float(x) for x in pcfg.get("std", open_clip.OPENAI_DATASET_STD))
    return Backbone(
        name=name,
        pretrained=pretrained,
        model=model,
        preprocess=preprocess,
        tokenizer=_tokenizer(arch),
        device=device,
        image_size=image_size,
        mean=mean,  # type: ignore[arg-type]
        std=std,  # type: ignore[arg-type]
        identifier=f"{name}:{pretrained}:{weights_id}",
        logit_scale=float(model.logit_scale.detach().float().exp().item()),
        arch=arch,
        info=info,
    )


def _verify_embedded_checkpoint(path: Path) -> str:
    """Check the shipped checkpoint against the sha256 in ``shapeworld-tiny.train.json``."""
    if not path.is_file():
        raise CheckpointNotFoundError(
            f"The shipped {EMBEDDED_BACKBONE!r} checkpoint {path} does not exist. Reinstall the "
            "package, or train it with `fewclip pretrain`. (pretrained=None gives an untrained "
            "model.)"
        )
    fix = "Reinstall the package (pip install -e .) or re-run `fewclip pretrain`."
    try:
        expected = str(json.loads(_EMBEDDED_TRAIN_INFO.read_text())["sha256"]).lower()
    except FileNotFoundError as err:
        raise CheckpointIntegrityError(
            f"Cannot verify {path}: {_EMBEDDED_TRAIN_INFO} (which records its sha256) is missing. "
            + fix
        ) from err
    except (KeyError, json.JSONDecodeError, TypeError) as err:
        raise CheckpointIntegrityError(
            f"Cannot verify {path}: {_EMBEDDED_TRAIN_INFO} has no valid 'sha256' entry. " + fix
        ) from err
    actual = file_sha256(path)
    if actual != expected:
        raise CheckpointIntegrityError(
            f"Checkpoint {path} is corrupted or was replaced: sha256 {actual} does not match "
            f"the expected {expected} recorded in {_EMBEDDED_TRAIN_INFO.name}. " + fix
        )
    return actual


# --------------------------------------------------------------------------- load_backbone


def load_backbone(
    name: str = EMBEDDED_BACKBONE,
    pretrained: str | None = "default",
    device: torch.device | str | None = None,
    arch: str | None = None,
    seed: int | None = None,
) -> Backbone:
    """Load a frozen backbone.

    Args:
        name: ``"shapeworld-tiny"``, an open_clip architecture (``"ViT-B-32"``;
            ``"ViT-B/32"`` also works), or the path of a local checkpoint file
            (then ``arch`` is required).
        pretrained: ``"default"`` (shipped checkpoint for ``shapeworld-tiny``;
            ``"openai"`` or the first available tag for open_clip models), an open_clip
            tag, a file path, or ``None`` for a random initialisation.
        device: defaults to :func:`fewclip_tutorial.device.get_device`.
        arch: the open_clip architecture of a local checkpoint file.
        seed: with ``pretrained=None``, seeds the random initialisation (without
            touching the global RNG state).

    Returns:
        A frozen :class:`Backbone` (eval mode, ``requires_grad=False``).

    Raises:
        UnknownBackboneError: unknown name (with suggestions and the list of names).
        UnknownPretrainedTagError: unknown tag for this architecture.
        CheckpointNotFoundError: a file that was asked for does not exist.
        CheckpointIntegrityError: the shipped checkpoint fails its sha256 check.
        WeightsUnavailableError: hub weights are not cached and the hub is unreachable.
    """
    device = get_device(device) if not isinstance(device, torch.device) else device
    try:
        register_embedded_config()
    except CheckpointNotFoundError:
        if name == EMBEDDED_BACKBONE or arch == EMBEDDED_BACKBONE:
            raise
    models = open_clip.list_models()

    # 1. A local checkpoint: either the name or `pretrained` is a file.
    name_is_file = os.path.isfile(os.path.expanduser(name))
    if name_is_file or (arch is not None and _looks_like_path(name)):
        if arch is None:
            raise ValueError(
                f"{name!r} is a checkpoint file; say which architecture it holds, e.g. "
                f'load_backbone("{name}", arch="ViT-B-32").'
            )
        return _load_local(name, arch, name, device)
    if arch is not None and arch != name and name not in models:
        raise CheckpointNotFoundError(
            f"Checkpoint file {name!r} does not exist (arch={arch!r} was given, so {name!r} "
            "must be a path); check the path."
        )

    resolved = name if name in models else name.replace("/", "-")
    if resolved not in models:
        if _looks_like_path(name):
            raise CheckpointNotFoundError(
                f"Checkpoint file {name!r} does not exist; check the path "
                f'(usage: load_backbone("/path/to/weights.bin", arch="ViT-B-32")).'
            )
        raise _unknown_backbone(name)

    if pretrained is not None and pretrained != "default" and _looks_like_path(pretrained):
        return _load_local(pretrained, resolved, name, device, pretrained=pretrained)

    # 2. Random initialisation.
    if pretrained is None:
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            if seed is not None:
                torch.manual_seed(seed)
            with _quiet_random_init_warning():
                model, preprocess = _build(resolved, pretrained=None)
        weights_id = f"random-init-seed{seed}" if seed is not None else state_dict_digest(model)
        if seed is None:
            weights_id = f"random-init-{weights_id}"
        return _finalise(
            model,
            preprocess,
            name=resolved,
            arch=resolved,
            pretrained=None,
            weights_id=weights_id,
            device=device,
            info={"weights": "random"},
        )

    # 3. The shipped shapeworld-tiny checkpoint.
    if resolved == EMBEDDED_BACKBONE:
        if pretrained != "default":
            raise UnknownPretrainedTagError(
                f"{EMBEDDED_BACKBONE!r} has one shipped checkpoint: use pretrained='default', "
                "None (random init) or the path of a checkpoint file."
            )
        path = embedded_checkpoint_path()
        digest = _verify_embedded_checkpoint(path)
        with _quiet_random_init_warning():
            model, preprocess = _build(resolved, pretrained=None)
        load_state_dict_file(model, path)
        return _finalise(
            model,
            preprocess,
            name=resolved,
            arch=resolved,
            pretrained="default",
            weights_id=digest[:12],
            device=device,
            info={"weights": str(path)},
        )

    # 4. open_clip hub weights.
    tag = resolve_pretrained_tag(resolved, pretrained)
    build_arch = _quickgelu_arch(resolved, tag)
    pcfg = open_clip.pretrained.get_pretrained_cfg(resolved, tag)
    weights = _find_cached_weights(pcfg)
    if weights is None:
        host, port = _hub_host(pcfg)
        offline = _is_offline_env()
        if offline or not _hub_reachable(host, port):
            why = "HF_HUB_OFFLINE=1 is set" if offline else f"{host}:{port} is unreachable"
            raise WeightsUnavailableError(
                f"Weights {resolved}:{tag} are not in the local cache and cannot be downloaded "
                f"({why}). Use the embedded backbone {EMBEDDED_BACKBONE!r}, which works offline, "
                "or download the weights elsewhere and load the file: "
                f'load_backbone("/path/to/weights.bin", arch="{build_arch}").'
            )
        logger.info("Downloading %s:%s ...", resolved, tag)
        weights = open_clip.pretrained.download_pretrained(pcfg)
        if not weights or not os.path.isfile(weights):
            raise WeightsUnavailableError(
                f"Downloading {resolved}:{tag} returned no file; retry, or use {EMBEDDED_BACKBONE!r}."
            )
    torchscript = is_torchscript_archive(weights)
    if torchscript:
        _check_release_digest(weights, pcfg)
    kwargs: dict[str, Any] = {
        # open_clip reads the file with torch.load(weights_only=True), which refuses the
        # TorchScript archives of OpenAI's release: those are loaded below by us.
        "pretrained": None if torchscript else weights,
        "image_mean": pcfg.get("mean"),
        "image_std": pcfg.get("std"),
        "image_interpolation": pcfg.get("interpolation"),
        "image_resize_mode": pcfg.get("resize_mode"),
    }
    if pcfg.get("quick_gelu", False) and build_arch == resolved:
        kwargs["force_quick_gelu"] = True
    if torchscript:
        with _quiet_random_init_warning():
            model, preprocess = _build(build_arch, **kwargs)
        load_state_dict_file(model, weights)
    else:
        model, preprocess = _build(build_arch, **kwargs)
    return _finalise(
        model,
        preprocess,
        name=build_arch,
        arch=build_arch,
        pretrained=tag,
        weights_id=_weights_short_id(weights),
        device=device,
        info={"weights": weights, "requested": name},
    )


def _check_release_digest(path: str, pretrained_cfg: dict) -> None:
    """Compare a cached release file with the sha256 its download URL carries (OpenAI's URLs
    hold it as a folder name), so a truncated or foreign file is named, not half-loaded.

    Raises:
        CheckpointIntegrityError: the digests differ.
    """
    match = re.search(r"/([0-9a-f]{64})/", pretrained_cfg.get("url", ""))
    if not match:
        return
    actual = file_sha256(path)
    if actual != match.group(1):
        raise CheckpointIntegrityError(
            f"Cached weights {path!r} are corrupted or not the released file: sha256 {actual} "
            f"does not match {match.group(1)} in its URL {pretrained_cfg['url']}. Delete the "
            "file and load the backbone again (it is then downloaded afresh)."
        )


def _quickgelu_origin(path: str) -> str | None:
    """Why the weights in ``path`` need QuickGELU, or ``None`` when nothing says so.

    Recognised: a TorchScript archive (OpenAI's release format), a file whose sha256 is the
    one in the URL of an open_clip pretrained config trained with QuickGELU (OpenAI's URLs
    carry it), and a path in the Hugging Face cache of such a config's repository
    (``models--timm--vit_base_patch32_clip_224.openai``).
    """
    if is_torchscript_archive(path):
        return "it is a TorchScript archive, the format of OpenAI's CLIP release"
    real = os.path.realpath(path)
    sha = None
    for arch, tag in open_clip.list_pretrained():
        cfg = open_clip.pretrained.get_pretrained_cfg(arch, tag)
        if not cfg.get("quick_gelu", False):
            continue
        repo = cfg.get("hf_hub", "").strip("/")
        if repo and ("models--" + repo.replace("/", "--") in real or repo in real):
            return f"it comes from the Hugging Face repository {repo} ({arch}:{tag})"
        match = re.search(r"/([0-9a-f]{64})/", cfg.get("url", ""))
        if match:
            sha = sha or file_sha256(real)
            if sha == match.group(1):
                return f"its sha256 is that of the released {arch}:{tag} weights"
    return None


def resolve_local_arch(arch: str, path: str) -> str:
    """The architecture to build for the local weights ``path`` declared as ``arch``.

    OpenAI's CLIP (and the other weights open_clip marks ``quick_gelu``) was trained with
    QuickGELU.  Building the plain ``arch`` (``ViT-B-32``: exact GELU) and loading such
    weights into it raises no error; the model just computes something else and loses
    accuracy silently.  When :func:`_quickgelu_origin` recognises the weights, the
    ``<arch>-quickgelu`` twin is built instead (same weights, the right activation), with a
    warning that says so.

    Raises:
        ValueError: the weights need QuickGELU and open_clip has no ``-quickgelu`` twin.
    """
    model_cfg = open_clip.get_model_config(arch) or {}
    if model_cfg.get("quick_gelu", False):
        return arch
    origin = _quickgelu_origin(path)
    if origin is None:
        return arch
    candidate = f"{arch}-quickgelu"
    if candidate not in open_clip.list_models():
        raise ValueError(
            f"{path!r} holds weights trained with QuickGELU ({origin}), but {arch!r} uses GELU "
            f"and open_clip has no {candidate!r}; pass an architecture with quick_gelu=true."
        )
    logger.warning(
        "%s holds QuickGELU weights (%s): building %r instead of %r.", path, origin, candidate, arch
    )
    return candidate


def _load_local(
    path: str,
    arch: str,
    name: str,
    device: torch.device,
    pretrained: str | None = None,
) -> Backbone:
    """Build ``arch`` (or its ``-quickgelu`` twin, see :func:`resolve_local_arch`) and load the
    local checkpoint ``path`` into it."""
    models = open_clip.list_models()
    resolved = arch if arch in models else arch.replace("/", "-")
    if resolved not in models:
        raise _unknown_backbone(arch)
    full = os.path.expanduser(path)
    if not os.path.isfile(full):
        raise CheckpointNotFoundError(f"Checkpoint file {path!r} does not exist; check the path.")
    resolved = resolve_local_arch(resolved, full)
    with _quiet_random_init_warning():
        model, preprocess = _build(resolved, pretrained=None)
    load_state_dict_file(model, full)
    backbone = _finalise(
        model,
        preprocess,
        name=name,
        arch=resolved,
        pretrained=pretrained if pretrained is not None else full,
        weights_id=file_sha256(full)[:12],
        device=device,
        info={"weights": full},
    )
    # The content hash identifies the weights; the path does not (files move).
    backbone.identifier = f"{resolved}:file:{file_sha256(full)[:12]}"
    return backbone
