"""The GPU and Colab paths, tested on a CPU (issue 12's eight bugs, one test or more each).

Every test here would have failed on the code before the fix: emulated bf16 counted as
native, fp16 models fed fp32 images, OpenAI TorchScript files handed to
``torch.load(weights_only=True)``, a raw socket that ignored ``HTTPS_PROXY``, single-process
image decoding, QuickGELU weights built with GELU, a torch floor without
``torch.amp.GradScaler``; and the GPU smoke script is run on the CPU.  The CLI's dataset
options are tested in ``tests/test_cli.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import threading
import urllib.error
import urllib.request
from pathlib import Path

import open_clip
import pytest
import torch
from fixtures_data import TINY_CLIP_CONFIG

from fewclip_tutorial import backbones as bbmod
from fewclip_tutorial import cli
from fewclip_tutorial import device as devmod
from fewclip_tutorial.backbones import (
    CheckpointFormatError,
    CheckpointIntegrityError,
    is_torchscript_archive,
    load_backbone,
    resolve_local_arch,
)
from fewclip_tutorial.features import cache_key, extract_features

REPO = Path(__file__).resolve().parents[1]
TINY = "fewclip-gpu-paths-tiny"
TINY_CONFIG = TINY_CLIP_CONFIG


@pytest.fixture(scope="module")
def tiny_arch(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 1-layer ViT CLIP (GELU) and its ``-quickgelu`` twin, registered with open_clip."""
    folder = tmp_path_factory.mktemp("cfg")
    (folder / f"{TINY}.json").write_text(json.dumps(TINY_CONFIG))
    (folder / f"{TINY}-quickgelu.json").write_text(json.dumps({**TINY_CONFIG, "quick_gelu": True}))
    open_clip.add_model_config(folder)
    return TINY


def _state_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _has_quick_gelu(model: torch.nn.Module) -> bool:
    return any(isinstance(m, open_clip.transformer.QuickGELU) for m in model.modules())


# --------------------------------------------------------------------------- 1. bf16 detection


def _fake_gpu(monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int], new_api: bool) -> None:
    """A CUDA GPU of this compute capability, as torch's functions describe it.

    torch >= 2.4: ``is_bf16_supported(including_emulation=True)`` is ``True`` on every GPU
    that can emulate bf16 (a T4 too); ``including_emulation=False`` asks for native bf16.
    Older torch has no argument.
    """
    native = capability >= (8, 0)
    if new_api:

        def is_bf16_supported(including_emulation: bool = True) -> bool:
            return native or including_emulation

    else:

        def is_bf16_supported() -> bool:  # the emulation-counting answer
            return True

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)


@pytest.mark.parametrize("new_api", [True, False])
@pytest.mark.parametrize(
    ("gpu", "capability", "expected"),
    [
        ("T4", (7, 5), torch.float16),
        ("V100", (7, 0), torch.float16),
        ("A100", (8, 0), torch.bfloat16),
        ("H100", (9, 0), torch.bfloat16),
    ],
)
def test_autocast_uses_bf16_only_where_it_is_native(
    monkeypatch: pytest.MonkeyPatch,
    gpu: str,
    capability: tuple[int, int],
    expected: torch.dtype,
    new_api: bool,
) -> None:
    _fake_gpu(monkeypatch, capability, new_api)
    assert devmod.autocast_dtype("cuda") == expected, gpu
    assert devmod.autocast_dtype("cpu") is None


# --------------------------------------------------------------------------- 2. fp16 encoders


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_model_encodes_images_and_text(
    tiny_arch: str, dtype: torch.dtype
) -> None:
    reference = load_backbone(tiny_arch, pretrained=None, device="cpu", seed=0)
    low = load_backbone(tiny_arch, pretrained=None, device="cpu", seed=0)
    low.model.to(dtype)
    assert low.dtype == dtype and reference.dtype == torch.float32
    images = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    f32 = reference.encode_images(images)
    f16 = low.encode_images(images, batch_size=4)  # fp32 input, reduced-precision weights
    assert f16.dtype == torch.float32 and f16.shape == (6, 16)
    # float32 unit rows (normalised after the cast to float32), D = 16: F.normalize's norm
    # (D/2 + 1) u, its division u, this norm (D/2 + 1) u: (D + 3) u, u = 2^-24
    torch.testing.assert_close(f16.norm(dim=-1), torch.ones(6), atol=19 * 2.0**-24, rtol=0)
    # The same weights, rounded: the features point the same way as the fp32 model's.
    assert (f16 * f32).sum(-1).min() > 0.98
    t32 = reference.encode_text(["a red circle", "a star"])
    t16 = low.encode_text(["a red circle", "a star"])
    assert t16.dtype == torch.float32 and (t16 * t32).sum(-1).min() > 0.98


# --------------------------------------------------------------------------- 3. TorchScript files


def _torchscript_copy(model: torch.nn.Module, path: Path) -> Path:
    """Save ``model`` as OpenAI's release does: a TorchScript archive whose state dict holds
    every weight under open_clip's names, plus ``input_resolution``, ``context_length`` and
    ``vocab_size``."""
    holder = _Holder(model)
    holder.register_buffer("input_resolution", torch.tensor(16))
    holder.register_buffer("context_length", torch.tensor(16))
    holder.register_buffer("vocab_size", torch.tensor(49408))
    with torch.no_grad():
        traced = torch.jit.trace(holder.eval(), torch.randn(1, 3, 16, 16), check_trace=False)
    traced.save(str(path))
    return path


class _Holder(torch.nn.Module):
    """Every parameter and buffer of ``inner`` under its own name, with a traceable forward."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        for name, child in inner.named_children():
            self.add_module(name, child)
        for name, param in inner.named_parameters(recurse=False):
            self.register_parameter(name, param)
        for name, buf in inner.named_buffers(recurse=False):
            if name not in inner._non_persistent_buffers_set:  # not weights (attn_mask)
                self.register_buffer(name, buf)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.visual(image)


def test_torchscript_archive_is_recognised(tiny_arch: str, tmp_path: Path) -> None:
    model = load_backbone(tiny_arch, pretrained=None, device="cpu", seed=3).model
    ts = _torchscript_copy(model, tmp_path / "ViT.pt")
    assert is_torchscript_archive(ts)
    plain = tmp_path / "plain.pt"
    torch.save(model.state_dict(), plain)  # torch.save writes a zip too, without code/
    assert not is_torchscript_archive(plain)
    text = tmp_path / "x.txt"
    text.write_text("not a zip")
    assert not is_torchscript_archive(text)


def _fake_openai_release(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, arch: str, sha: str | None
) -> tuple[torch.nn.Module, Path]:
    """A TorchScript file in a fake ``~/.cache/clip`` and an open_clip 'openai' tag whose URL
    carries its sha256 (as OpenAI's URLs do), like a Colab user's cache."""
    model = load_backbone(arch, pretrained=None, device="cpu", seed=11).model
    home = tmp_path / "home"
    cached = home / ".cache" / "clip" / "Tiny-32.pt"
    cached.parent.mkdir(parents=True)
    _torchscript_copy(model, cached)
    digest = hashlib.sha256(cached.read_bytes()).hexdigest() if sha is None else sha
    cfg = {
        "url": f"https://openaipublic.example/clip/models/{digest}/Tiny-32.pt",
        "hf_hub": "",
        "quick_gelu": True,
        "mean": open_clip.OPENAI_DATASET_MEAN,
        "std": open_clip.OPENAI_DATASET_STD,
    }
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, arch, {"openai": cfg})
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setattr(bbmod, "_hub_reachable", _fail_if_called)
    return model, cached


def _fail_if_called(*args: object, **kwargs: object) -> bool:
    raise AssertionError("the cached file must be used; no network check")


def test_cached_openai_torchscript_file_loads(
    tiny_arch: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    model, cached = _fake_openai_release(monkeypatch, tmp_path, tiny_arch, sha=None)
    bb = load_backbone(tiny_arch, pretrained="openai", device="cpu")
    assert bb.info["weights"] == str(cached)
    assert bb.arch == f"{tiny_arch}-quickgelu" and _has_quick_gelu(bb.model)
    assert _state_equal(bb.model, model)  # every weight, the extra settings dropped


def test_cached_torchscript_with_wrong_digest_is_named(
    tiny_arch: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _, cached = _fake_openai_release(monkeypatch, tmp_path, tiny_arch, sha="0" * 64)
    with pytest.raises(CheckpointIntegrityError) as info:
        load_backbone(tiny_arch, pretrained="openai", device="cpu")
    assert str(cached) in str(info.value) and "Delete the file" in str(info.value)


def test_unreadable_torchscript_gives_a_clear_cli_error(
    tiny_arch: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, cached = _fake_openai_release(monkeypatch, tmp_path, tiny_arch, sha=None)

    def no_jit(*args: object, **kwargs: object) -> None:
        raise RuntimeError("TorchScript support was removed")

    monkeypatch.setattr(torch.jit, "load", no_jit)
    with pytest.raises(CheckpointFormatError) as info:
        load_backbone(tiny_arch, pretrained="openai", device="cpu")
    msg = str(info.value)
    assert str(cached) in msg and "TorchScript" in msg and "Delete the file" in msg

    from fixtures_data import write_images

    for name in ("cats", "dogs"):
        write_images(tmp_path / "folder" / name, 6, start=10 * len(name))
    monkeypatch.setattr(cli, "run_method", _run_without_method)
    argv = ["run", "zero-shot", "--backbone", tiny_arch, "--pretrained", "openai"]
    argv += ["--dataset", f"imagefolder:{tmp_path / 'folder'}", "--device", "cpu", "--shots", "1"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("fewclip: error: ") and str(cached) in err
    assert "Traceback" not in err


def _run_without_method(method: str, **kwargs: object) -> dict:
    """The CLI's runner up to the backbone (the error under test is raised there)."""
    from fewclip_tutorial.episode import build_context

    build_context(
        kwargs["dataset"],
        kwargs["backbone"],
        kwargs["shots"],
        kwargs["seed"],
        pretrained=kwargs["pretrained"],
        device=kwargs["device"],
        cache_dir=None,
        progress=False,
    )
    raise AssertionError("load_backbone should have failed")


def test_local_torchscript_file_with_plain_arch_builds_quickgelu(
    tiny_arch: str, tmp_path: Path
) -> None:
    model = load_backbone(tiny_arch, pretrained=None, device="cpu", seed=4).model
    path = _torchscript_copy(model, tmp_path / "openai-release.pt")
    bb = load_backbone(str(path), arch=tiny_arch, device="cpu")
    assert bb.arch == f"{tiny_arch}-quickgelu" and _has_quick_gelu(bb.model)
    assert _state_equal(bb.model, model)


# --------------------------------------------------------------------------- 4. proxies


class _FakeProxy:
    """A local 'proxy' that records the first request line and refuses the tunnel."""

    def __init__(self) -> None:
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(1)
        self.server.settimeout(5)
        self.port = self.server.getsockname()[1]
        self.lines: list[str] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.server.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(5)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                data += chunk
            self.lines.append(data.split(b"\r\n", 1)[0].decode())
            conn.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")

    def close(self) -> None:
        self.server.close()
        self.thread.join(timeout=5)


def test_hub_check_goes_through_https_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    proxy = _FakeProxy()
    for var in ("NO_PROXY", "no_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{proxy.port}")
    monkeypatch.delenv("https_proxy", raising=False)

    def no_direct_connection(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"direct connection attempted: {args}")

    real = socket.create_connection

    def only_the_proxy(address: tuple, *args: object, **kwargs: object) -> socket.socket:
        if address[0] != "127.0.0.1":
            no_direct_connection(address)
        return real(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", only_the_proxy)
    try:
        reachable = bbmod._hub_reachable("huggingface.co", 443, timeout=5)
    finally:
        proxy.close()
    assert len(proxy.lines) == 1 and proxy.lines[0].startswith("CONNECT huggingface.co:443 ")
    assert reachable is False  # the (fake) proxy refused the tunnel


class _Opened:
    def __enter__(self) -> _Opened:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


@pytest.mark.parametrize(
    ("outcome", "expected"),
    [
        (_Opened(), True),
        (urllib.error.HTTPError("https://x/", 401, "Unauthorized", {}, None), True),  # type: ignore[arg-type]
        (urllib.error.URLError("proxy refused"), False),
        (TimeoutError("timed out"), False),
    ],
)
def test_hub_check_uses_the_environment_proxy_opener(
    monkeypatch: pytest.MonkeyPatch, outcome: object, expected: bool
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    monkeypatch.delenv("https_proxy", raising=False)
    seen: dict = {}

    class Opener:
        def open(self, request: urllib.request.Request, timeout: float) -> _Opened:
            seen["url"], seen["method"], seen["timeout"] = request.full_url, request.method, timeout
            if isinstance(outcome, BaseException):
                raise outcome
            return outcome  # type: ignore[return-value]

    def build_opener(*handlers: object) -> Opener:
        proxies = [h.proxies for h in handlers if isinstance(h, urllib.request.ProxyHandler)]
        seen["proxies"] = proxies
        return Opener()

    monkeypatch.setattr(urllib.request, "build_opener", build_opener)
    assert bbmod._hub_reachable("huggingface.co", 443, timeout=1.5) is expected
    assert seen["proxies"] and seen["proxies"][0]["https"] == "http://proxy.example:3128"
    assert seen["url"] == "https://huggingface.co/" and seen["method"] == "HEAD"
    assert seen["timeout"] == 1.5


# --------------------------------------------------------------------------- 5. image workers


def test_default_num_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(devmod.NUM_WORKERS_ENV_VAR, raising=False)
    assert devmod.default_num_workers("cpu") == 0
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert devmod.default_num_workers("cuda") == 8
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert devmod.default_num_workers("cuda:1") == 2
    monkeypatch.setenv(devmod.NUM_WORKERS_ENV_VAR, "3")
    assert devmod.default_num_workers("cpu") == 3
    monkeypatch.setenv(devmod.NUM_WORKERS_ENV_VAR, "many")
    with pytest.raises(ValueError, match="FEWCLIP_NUM_WORKERS"):
        devmod.default_num_workers("cuda")


def test_loader_kwargs_pin_and_persist_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(devmod.NUM_WORKERS_ENV_VAR, raising=False)
    cpu = devmod.loader_kwargs("cpu")
    assert cpu == {"num_workers": 0, "pin_memory": False, "persistent_workers": False}
    gpu = devmod.loader_kwargs("cuda", num_workers=4, epochs=5)
    assert gpu["pin_memory"] and gpu["persistent_workers"] and gpu["num_workers"] == 4
    assert not devmod.loader_kwargs("cuda", num_workers=4)["persistent_workers"]  # one pass
    with pytest.raises(ValueError, match=">= 0"):
        devmod.loader_kwargs("cpu", num_workers=-1)


def test_workers_give_the_same_features(tmp_path: Path) -> None:
    from fixtures_data import FakeBackbone, make_list_split

    split = make_list_split([5, 4, 3], name="tiny")
    for kwargs in ({"augment": True, "views": 3, "seed": 7}, {}):
        serial = extract_features(
            FakeBackbone(),
            split,
            batch_size=4,
            num_workers=0,
            cache_dir=None,
            progress=False,
            **kwargs,
        )
        parallel = extract_features(
            FakeBackbone(),
            split,
            batch_size=4,
            num_workers=2,
            cache_dir=None,
            progress=False,
            **kwargs,
        )
        assert torch.equal(serial.features, parallel.features)
        assert torch.equal(serial.labels, parallel.labels)
    # The number of workers is not part of the cache key: a cached run is reused.
    backbone = FakeBackbone()
    first = extract_features(backbone, split, num_workers=2, cache_dir=tmp_path, progress=False)
    calls = backbone.encode_calls
    again = extract_features(backbone, split, num_workers=0, cache_dir=tmp_path, progress=False)
    assert backbone.encode_calls == calls and torch.equal(first.features, again.features)
    assert "num_workers" not in cache_key.__code__.co_varnames


# --------------------------------------------------------------------------- 7. QuickGELU


def test_every_quickgelu_tag_builds_a_quickgelu_model() -> None:
    """Name resolution over open_clip's own tables (no download)."""
    checked = 0
    for arch, tag in open_clip.list_pretrained():
        cfg = open_clip.pretrained.get_pretrained_cfg(arch, tag)
        if not cfg.get("quick_gelu", False):
            continue
        built = bbmod._quickgelu_arch(arch, tag)
        assert (open_clip.get_model_config(built) or {}).get("quick_gelu"), (arch, tag, built)
        checked += 1
    assert checked >= 10  # openai, yfcc15m, cc12m, metaclip, dfn... tags exist


def test_local_openai_weights_are_recognised(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # A file from the Hugging Face cache of the OpenAI ViT-B/32 repository.
    snap = tmp_path / "models--timm--vit_base_patch32_clip_224.openai" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    hf_file = snap / "open_clip_pytorch_model.bin"
    hf_file.write_bytes(b"weights")
    assert resolve_local_arch("ViT-B-32", str(hf_file)) == "ViT-B-32-quickgelu"
    # A file whose sha256 is the one in OpenAI's RN50 URL.
    rn50_sha = open_clip.pretrained.get_pretrained_cfg("RN50", "openai")["url"].split("/")[-2]
    release = tmp_path / "RN50.pt"
    release.write_bytes(b"pretend")
    monkeypatch.setattr(bbmod, "file_sha256", lambda p: rn50_sha)
    assert resolve_local_arch("RN50", str(release)) == "RN50-quickgelu"
    monkeypatch.undo()
    # LAION weights and unknown files keep the architecture they were given.
    laion = tmp_path / "models--laion--CLIP-ViT-B-32-laion2B-s34B-b79K" / "open_clip_model.bin"
    laion.parent.mkdir(parents=True)
    laion.write_bytes(b"laion")
    assert resolve_local_arch("ViT-B-32", str(laion)) == "ViT-B-32"
    other = tmp_path / "finetuned.pt"
    other.write_bytes(b"mine")
    assert resolve_local_arch("ViT-B-32", str(other)) == "ViT-B-32"
    assert resolve_local_arch("ViT-B-32-quickgelu", str(hf_file)) == "ViT-B-32-quickgelu"


# --------------------------------------------------------------------------- 8. torch floor


def test_torch_floor_has_amp_grad_scaler() -> None:
    """``torch.amp.GradScaler("cuda")`` (training.py, the methods) arrived in torch 2.3."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = {Requirement(r).name: Requirement(r) for r in project["dependencies"]}
    floors = {
        name: max(Version(s.version) for s in req.specifier if s.operator == ">=")
        for name, req in reqs.items()
        if name in ("torch", "torchvision")
    }
    assert floors["torch"] >= Version("2.3") and floors["torchvision"] >= Version("0.18")
    uses = [
        p
        for p in (REPO / "fewclip_tutorial").rglob("*.py")
        if "torch.amp.GradScaler" in p.read_text()
    ]
    assert uses, "the floor protects torch.amp.GradScaler; update this test if it is gone"
    pinned = [r for r in project["dependencies"] if "==" in r]
    assert not pinned, f"the package pins exact versions: {pinned} (pins go to environment.yml)"


# --------------------------------------------------------------------------- GPU smoke script


@pytest.mark.slow
def test_gpu_smoke_script_runs_on_cpu(tmp_path: Path) -> None:
    env = {**os.environ, "FEWCLIP_DEVICE": "cpu", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    env.pop("FEWCLIP_NUM_WORKERS", None)
    out = tmp_path / "smoke.json"
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu_smoke.sh"), "--tiny", "--out", str(out)],
        cwd=tmp_path,  # the script must not depend on the working directory
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    from fewclip_tutorial.methods.registry import list_methods

    assert sorted(report["methods"]) == list_methods()
    for name, result in report["methods"].items():
        assert result["ok"], (name, result)
        assert 0.0 <= result["test_accuracy"] <= 100.0
    assert report["device"] == "cpu" and report["throughput"]["images_per_s"] > 0
    assert "images/s" in proc.stdout
