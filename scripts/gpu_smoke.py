"""GPU smoke test: every method once through the CLI, plus feature-extraction throughput.

Run it with ``bash scripts/gpu_smoke.sh`` on a machine with one CUDA GPU (sized to finish
well within 10 minutes, though not yet timed on a GPU; nothing is downloaded): a random-init
ViT-B-32 on a fake EuroSAT written in torchvision's exact layout
(``<root>/eurosat/2750/<Class>/<Class>_<i>.jpg``, 64 px JPEGs).  It checks the code paths a
GPU takes and a CPU does not (autocast dtype, a fp16 model, image-decoding workers, pinned
memory, GradScaler), not accuracy: the model is untrained.

``--tiny`` (or ``FEWCLIP_SMOKE_TINY=1``) shrinks everything (a 2-layer ViT on 32 px images,
a few images per class, a few training steps) so that it also runs on a CPU in about 30 s;
``tests/test_gpu_paths.py`` runs it that way.  ``--arch`` and ``--per-class`` change the
model and the data size (``--tiny --arch ViT-B-32``: the real architecture, small data).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

# The smoke test runs from a checkout: make the package importable without installing it.
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import open_clip  # noqa: E402

from fewclip_tutorial import cli  # noqa: E402
from fewclip_tutorial.backbones import load_backbone  # noqa: E402
from fewclip_tutorial.data.registry import load_dataset  # noqa: E402
from fewclip_tutorial.data.torchvision_datasets import EUROSAT_CLASSNAMES, ConcatSplit  # noqa: E402
from fewclip_tutorial.device import autocast_dtype, default_num_workers, get_device  # noqa: E402
from fewclip_tutorial.features import extract_features  # noqa: E402
from fewclip_tutorial.methods.registry import get_method, list_methods  # noqa: E402

TINY_ARCH = "smoke-tiny-vit"
TINY_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}

#: (images per class, shots, method options) of the two sizes.  Options a method does not
#: have are skipped, so the script follows the registry as methods change.
SIZES: dict[str, dict[str, Any]] = {
    "full": {"per_class": 200, "shots": 16, "options": {}},
    "tiny": {
        "per_class": 12,
        "shots": 2,
        "options": {
            "steps": 20,
            "iters": 50,
            "epochs": 1,
            "views": 2,
            "beta_steps": 10,
            "alpha_steps": 5,
            "max_iter": 100,
            "n_clusters": 4,
        },
    },
}


def write_fake_eurosat(root: Path, per_class: int, size: int = 64) -> int:
    """EuroSAT RGB in torchvision's layout: ``root/eurosat/2750/<Class>/<Class>_<i>.jpg``.

    Each class has its own mean colour plus noise, so the images differ by class (the
    methods have something to fit) and JPEG decoding costs what a real 64 px tile costs.
    """
    rng = np.random.default_rng(0)
    base = root / "eurosat" / "2750"
    for folder in EUROSAT_CLASSNAMES:
        target = base / folder
        target.mkdir(parents=True, exist_ok=True)
        colour = rng.integers(40, 216, size=3)
        for i in range(per_class):
            noise = rng.normal(0, 40, size=(size, size, 3))
            pixels = np.clip(colour + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(target / f"{folder}_{i + 1}.jpg", quality=90)
    return per_class * len(EUROSAT_CLASSNAMES)


def _options_for(method: str, wanted: dict[str, Any]) -> list[str]:
    spec = get_method(method)
    argv: list[str] = []
    for name, value in wanted.items():
        if name in spec.options:
            argv += [f"--{name.replace('_', '-')}", str(value)]
    return argv


def run_methods(
    arch: str, root: Path, cache: Path, device: str, shots: int, options: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """``fewclip run METHOD --json`` for every registered method, in this process."""
    results: dict[str, dict[str, Any]] = {}
    for method in list_methods():
        argv = ["run", method, "--dataset", "eurosat", "--data-root", str(root)]
        argv += ["--backbone", arch, "--pretrained", "none", "--shots", str(shots), "--seed", "1"]
        argv += ["--device", device, "--cache-dir", str(cache), "--json", "--no-progress"]
        argv += _options_for(method, options)
        out, err = io.StringIO(), io.StringIO()
        start = time.perf_counter()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli.main(argv)
            except Exception as exc:  # noqa: BLE001 - a smoke test reports every failure
                code = 1
                err.write(f"{type(exc).__name__}: {exc}")
        seconds = time.perf_counter() - start
        entry: dict[str, Any] = {"ok": code == 0, "seconds": round(seconds, 1), "argv": argv}
        if code == 0:
            payload = json.loads(out.getvalue())
            entry["val_accuracy"] = payload["val_accuracy"]
            entry["test_accuracy"] = payload["test_accuracy"]
        else:
            entry["error"] = err.getvalue()[-2000:]
        results[method] = entry
        status = "ok  " if entry["ok"] else "FAIL"
        acc = f"test {entry['test_accuracy']:5.1f}%" if entry["ok"] else entry["error"][-200:]
        print(f"  {status} {method:<14} {seconds:7.1f} s  {acc}", flush=True)
    return results


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def throughput(arch: str, root: Path, device: torch.device, tiny: bool) -> dict[str, Any]:
    """Images per second: decoding + encoding the whole fake EuroSAT (default workers and one
    process), and the model alone on random batches."""
    backbone = load_backbone(arch, pretrained=None, device=device, seed=0)
    spec = load_dataset("eurosat", root=root)
    split = ConcatSplit([spec.train, spec.val, spec.test], name="eurosat:all")
    batch = 64 if tiny else 256
    extract_features(backbone, split, batch_size=batch, cache_dir=None, progress=False)  # warm-up
    report: dict[str, Any] = {"images": len(split), "batch_size": batch}
    workers = default_num_workers(device)
    for label, n_workers in (("images_per_s", workers), ("images_per_s_one_process", 0)):
        _sync(device)
        start = time.perf_counter()
        extract_features(
            backbone, split, batch_size=batch, cache_dir=None, progress=False, num_workers=n_workers
        )
        _sync(device)
        report[label] = round(len(split) / (time.perf_counter() - start), 1)
    report["num_workers"] = workers
    images = torch.randn(batch, 3, backbone.image_size, backbone.image_size, device=device)
    backbone.encode_images(images)
    _sync(device)
    reps = 3 if tiny else 10
    start = time.perf_counter()
    for _ in range(reps):
        backbone.encode_images(images)
    _sync(device)
    report["model_images_per_s"] = round(reps * batch / (time.perf_counter() - start), 1)
    # A model converted to fp16 encodes fp32 images (bf16 on CPU, where fp16 kernels are few).
    low = torch.float16 if device.type == "cuda" else torch.bfloat16
    backbone.model.to(low)
    feats = backbone.encode_images(images[:4].float())
    report["reduced_precision_model"] = str(low).replace("torch.", "")
    report["reduced_precision_ok"] = bool(
        feats.dtype == torch.float32 and torch.isfinite(feats).all().item()
    )
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--tiny",
        action="store_true",
        default=os.environ.get("FEWCLIP_SMOKE_TINY", "") not in ("", "0"),
        help="a tiny model and data set (runs on a CPU in about 30 s)",
    )
    parser.add_argument(
        "--arch",
        default=None,
        help="open_clip architecture (default: ViT-B-32; --tiny: a tiny ViT)",
    )
    parser.add_argument("--per-class", type=int, default=None, help="fake images per class")
    parser.add_argument("--out", default=None, help="write the report as JSON here")
    parser.add_argument("--workdir", default=None, help="folder for the fake data (default: temp)")
    args = parser.parse_args(argv)

    size = dict(SIZES["tiny" if args.tiny else "full"])
    if args.per_class is not None:
        size["per_class"] = args.per_class
    device = get_device()
    arch = args.arch or (TINY_ARCH if args.tiny else "ViT-B-32")
    if arch == TINY_ARCH:
        folder = Path(tempfile.mkdtemp(prefix="fewclip-smoke-cfg-"))
        (folder / f"{TINY_ARCH}.json").write_text(json.dumps(TINY_CONFIG))
        open_clip.add_model_config(folder)
    report: dict[str, Any] = {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "",
        "torch": torch.__version__,
        "autocast_dtype": str(autocast_dtype(device)).replace("torch.", ""),
        "arch": arch,
        "size": "tiny" if args.tiny else "full",
    }
    if device.type != "cuda":
        print(f"note: no CUDA GPU here; running on {device.type} (slow without --tiny)", flush=True)
    with contextlib.ExitStack() as stack:
        if args.workdir:
            work = Path(args.workdir)
            work.mkdir(parents=True, exist_ok=True)
        else:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fewclip-smoke-")))
        root, cache = work / "data", work / "cache"
        t0 = time.perf_counter()
        n = write_fake_eurosat(root, size["per_class"])
        print(f"fake EuroSAT: {n} images in {root} ({time.perf_counter() - t0:.1f} s)", flush=True)
        print(f"methods on {device} ({report['device_name'] or device.type}), {arch}:", flush=True)
        report["methods"] = run_methods(
            arch, root, cache, str(device), size["shots"], size["options"]
        )
        report["throughput"] = throughput(arch, root, device, args.tiny)
    tp = report["throughput"]
    print(
        f"feature extraction: {tp['images_per_s']:.1f} images/s with {tp['num_workers']} workers, "
        f"{tp['images_per_s_one_process']:.1f} images/s in one process; "
        f"model alone {tp['model_images_per_s']:.1f} images/s (batch {tp['batch_size']}); "
        f"autocast {report['autocast_dtype']}; {tp['reduced_precision_model']} model encodes: "
        f"{tp['reduced_precision_ok']}",
        flush=True,
    )
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    failed = [m for m, r in report["methods"].items() if not r["ok"]]
    if failed or not tp["reduced_precision_ok"]:
        print(f"FAILED: {', '.join(failed) or 'reduced-precision encoding'}", flush=True)
        return 1
    print(f"all {len(report['methods'])} methods ran", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
