"""Templates, torchvision wrappers (on tiny fake files), image folders and the registry."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torchvision.datasets as tvd

sys.path.insert(0, str(Path(__file__).parent))
from fixtures_data import (  # noqa: E402
    EUROSAT_FOLDERS,
    solid_image,
    write_fake_caltech101,
    write_fake_cifar10,
    write_fake_dtd,
    write_fake_eurosat,
    write_fake_food101,
    write_fake_pets,
    write_images,
)

from fewclip_tutorial.data import (  # noqa: E402
    DATASET_TEMPLATES,
    IMAGENET_TEMPLATES,
    SIMPLE_IMAGENET_TEMPLATES,
    TIP_ADAPTER_TEMPLATES,
    DatasetNotFoundError,
    EmptyImageFolderError,
    UnknownDatasetError,
    format_prompts,
    list_datasets,
    load_dataset,
    load_imagefolder,
    make_few_shot,
)
from fewclip_tutorial.data.torchvision_datasets import TORCHVISION_LOADERS  # noqa: E402

# --------------------------------------------------------------------------- templates


def test_imagenet_templates_from_open_clip():
    assert len(IMAGENET_TEMPLATES) == 80
    assert len(set(IMAGENET_TEMPLATES)) == 80
    assert IMAGENET_TEMPLATES[0] == "a bad photo of a {}."
    assert all(t.count("{}") == 1 for t in IMAGENET_TEMPLATES)


def test_tip_adapter_templates_are_subset_of_80():
    assert len(TIP_ADAPTER_TEMPLATES) == 7
    assert set(TIP_ADAPTER_TEMPLATES) <= set(IMAGENET_TEMPLATES)
    assert TIP_ADAPTER_TEMPLATES == SIMPLE_IMAGENET_TEMPLATES  # open_clip ships the same 7


def test_dataset_templates_cover_every_torchvision_dataset():
    assert set(TORCHVISION_LOADERS) <= set(DATASET_TEMPLATES)
    assert DATASET_TEMPLATES["eurosat"] == ["a centered satellite photo of {}."]
    for templates in DATASET_TEMPLATES.values():
        assert templates and all(t.count("{}") == 1 for t in templates)


def test_format_prompts():
    out = format_prompts(["a photo of a {}.", "art of the {}."], "red circle")
    assert out == ["a photo of a red circle.", "art of the red circle."]
    assert format_prompts(["{} texture {with braces}"], "banded") == [
        "banded texture {with braces}"
    ]
    with pytest.raises(ValueError, match="exactly one"):
        format_prompts(["no placeholder"], "x")
    with pytest.raises(ValueError, match="wrap it in a list"):
        format_prompts("a photo of a {}.", "x")


# --------------------------------------------------------------------------- torchvision


@pytest.fixture
def no_cifar_md5(monkeypatch):
    """torchvision checks CIFAR files against the real md5s; our fake files skip that."""
    monkeypatch.setattr(tvd.CIFAR10, "train_list", [[f"data_batch_{i}", None] for i in range(1, 6)])
    monkeypatch.setattr(tvd.CIFAR10, "test_list", [["test_batch", None]])
    monkeypatch.setattr(tvd.CIFAR10, "meta", {**tvd.CIFAR10.meta, "md5": None})


def test_cifar10_from_fake_batches(tmp_path, no_cifar_md5):
    written = write_fake_cifar10(tmp_path)
    spec = load_dataset("cifar10", root=tmp_path)
    assert spec.name == "cifar10" and spec.num_classes == 10
    assert spec.classnames[:3] == ["airplane", "automobile", "bird"]
    assert spec.templates == DATASET_TEMPLATES["cifar10"]
    assert spec.val is None
    assert len(spec.train) == 30 and len(spec.test) == 5
    np.testing.assert_array_equal(spec.train.labels, written["train_labels"])
    np.testing.assert_array_equal(spec.test.labels, written["test_labels"])
    # Image 7 of train is row 7 of the stacked batches, CHW-planar -> HWC.
    img, label = spec.train[7]
    expected = written["train_data"][7].reshape(3, 32, 32).transpose(1, 2, 0)
    np.testing.assert_array_equal(np.asarray(img), expected)
    assert img.mode == "RGB" and label == written["train_labels"][7]
    assert spec.train.fingerprint() != spec.test.fingerprint()


def test_eurosat_from_fake_folder(tmp_path):
    write_fake_eurosat(tmp_path, per_class=5)
    spec = load_dataset("eurosat", root=tmp_path)
    assert spec.classnames[0] == "Annual Crop Land"
    assert spec.classnames[EUROSAT_FOLDERS.index("SeaLake")] == "Sea or Lake"
    assert spec.num_classes == 10
    # 60/20/20 per class of 5 images: 3 / 1 / 1.
    for split, n in ((spec.train, 3), (spec.val, 1), (spec.test, 1)):
        assert np.bincount(split.labels, minlength=10).tolist() == [n] * 10
    ids = [set(s.indices) for s in (spec.train, spec.val, spec.test)]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    # Deterministic: a second load gives the same split.
    again = load_dataset("eurosat", root=tmp_path)
    np.testing.assert_array_equal(spec.test.indices, again.test.indices)
    img, label = spec.test[0]
    assert img.size == (8, 8) and img.mode == "RGB"
    # The image really belongs to its label's folder.
    path, folder_label = spec.test.parent.dataset.samples[int(spec.test.indices[0])]
    assert folder_label == label and EUROSAT_FOLDERS[label] in path
    ep = make_few_shot(spec, shots=1, seed=1)
    assert np.bincount(ep.train.labels).tolist() == [1] * 10
    assert ep.val.parent is spec.val  # drawn from the dataset's own val split
    assert np.bincount(ep.val.labels).tolist() == [1] * 10


def test_dtd_from_fake_files(tmp_path):
    write_fake_dtd(tmp_path)
    spec = load_dataset("dtd", root=tmp_path)
    assert spec.classnames == ["banded", "zig zagged"]
    assert spec.val is not None
    assert [len(s) for s in (spec.train, spec.val, spec.test)] == [6, 6, 6]
    np.testing.assert_array_equal(spec.val.labels, [0, 0, 0, 1, 1, 1])
    img, _ = spec.val[4]  # val (s_i=1), class 1, image 1
    np.testing.assert_array_equal(np.asarray(img), np.asarray(_reload(solid_image(1011))))


def _reload(img):
    """JPEG round trip of a fixture image, to compare with what was written."""
    import io

    buf = io.BytesIO()
    img.save(buf, format="JPEG")
    buf.seek(0)
    from PIL import Image

    return Image.open(buf).convert("RGB")


def test_food101_from_fake_files(tmp_path):
    write_fake_food101(tmp_path)
    spec = load_dataset("food101", root=tmp_path)
    assert spec.classnames == ["apple pie", "baby back ribs"]
    assert len(spec.train) == 8 and len(spec.test) == 4 and spec.val is None
    assert np.bincount(spec.train.labels).tolist() == [4, 4]


def test_caltech101_drops_faces_easy_and_remaps_labels(tmp_path):
    write_fake_caltech101(tmp_path, per_class=5)
    spec = load_dataset("caltech101", root=tmp_path)
    # torchvision drops BACKGROUND_Google; we also drop Faces_easy (as CoOp does).
    assert spec.classnames == ["face", "airplane", "cougar body"]
    full = spec.train.parent
    assert len(full) == 15 and sorted(set(full.labels.tolist())) == [0, 1, 2]
    for split, n in ((spec.train, 3), (spec.val, 1), (spec.test, 1)):
        assert np.bincount(split.labels, minlength=3).tolist() == [n] * 3
    # Label 1 ("airplane") images come from the airplanes folder.
    i = int(np.flatnonzero(spec.test.labels == 1)[0])
    raw = int(spec.test.indices[i])
    tv_index = int(full.indices[raw])
    assert full.dataset.categories[full.dataset.y[tv_index]] == "airplanes"
    assert spec.test[i][0].mode == "RGB"


def test_oxford_pets_from_fake_files(tmp_path):
    write_fake_pets(tmp_path)
    spec = load_dataset("oxford_pets", root=tmp_path)
    assert spec.classnames == ["abyssinian", "american bulldog"]
    assert spec.val is None and len(spec.train) == 6 and len(spec.test) == 4
    np.testing.assert_array_equal(spec.test.labels, [0, 0, 1, 1])
    assert spec.templates == ["a photo of a {}, a type of pet."]


@pytest.mark.parametrize("name", sorted(TORCHVISION_LOADERS))
def test_missing_files_clear_error(tmp_path, name):
    root = tmp_path / "nothing_here"
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset(name, root=root)
    msg = str(info.value)
    assert str(root) in msg and "download=True" in msg and "shapeworld" in msg
    assert "off by default" in msg
    cli_msg = info.value.cli_message  # the same advice, worded for `fewclip run`
    assert str(root) in cli_msg and "--download" in cli_msg and "--data-root" in cli_msg
    assert "--dataset shapeworld" in cli_msg and "download=True" not in cli_msg
    assert isinstance(info.value, FileNotFoundError)
    assert not root.exists()  # nothing was created or downloaded


# --------------------------------------------------------------------------- image folders


def test_imagefolder_flat_layout(tmp_path):
    write_images(tmp_path / "golden_retriever", 10, start=0)
    write_images(tmp_path / "tabby_cat", 5, start=50)
    spec = load_imagefolder(tmp_path, name="pets", seed=0)
    assert spec.classnames == ["golden retriever", "tabby cat"]
    assert spec.templates == ["a photo of a {}."]
    assert np.bincount(spec.train.labels).tolist() == [6, 3]
    assert np.bincount(spec.val.labels).tolist() == [2, 1]
    assert np.bincount(spec.test.labels).tolist() == [2, 1]
    img, label = spec.test[0]
    assert label == 0 and img.mode == "RGB"
    path = spec.test.parent.paths[int(spec.test.indices[0])]
    assert path.parent.name == "golden_retriever"


def test_imagefolder_split_layout_via_registry(tmp_path):
    for split, n in (("train", 4), ("test", 2)):
        write_images(tmp_path / split / "a_b", n, start=0)
        write_images(tmp_path / split / "c", n, start=100)
    spec = load_dataset(f"imagefolder:{tmp_path}")
    assert spec.name == tmp_path.name and spec.classnames == ["a b", "c"]
    assert spec.val is None and len(spec.train) == 8 and len(spec.test) == 4
    np.testing.assert_array_equal(spec.test.labels, [0, 0, 1, 1])


def test_imagefolder_errors(tmp_path):
    with pytest.raises(EmptyImageFolderError, match="No class sub-folders"):
        load_imagefolder(tmp_path)
    write_images(tmp_path / "cat", 3)
    (tmp_path / "dog").mkdir()
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    with pytest.raises(EmptyImageFolderError, match=r"dog.*has no images"):
        load_imagefolder(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_imagefolder(tmp_path / "missing")


# --------------------------------------------------------------------------- registry


def test_list_datasets():
    names = list_datasets()
    assert names[0] == "shapeworld"
    for n in ("eurosat", "oxford_pets", "dtd", "flowers102", "caltech101", "food101"):
        assert n in names
    assert "cifar10" in names and "cifar100" in names and "imagefolder:<path>" in names


def test_unknown_dataset_suggests_close_name():
    with pytest.raises(UnknownDatasetError) as info:
        load_dataset("eurosatt")
    assert isinstance(info.value, KeyError)
    msg = str(info.value)
    assert "Did you mean 'eurosat'?" in msg and "shapeworld" in msg and "cifar100" in msg


def test_shapeworld_via_registry_forwards_kwargs():
    pytest.importorskip("fewclip_tutorial.data.shapeworld")
    spec = load_dataset("shapeworld", train_per_class=2, val_per_class=1, test_per_class=1)
    assert spec.name == "shapeworld"
    assert len(spec.train) == 2 * spec.num_classes  # train_per_class was passed through
    assert len(spec.val) == spec.num_classes
    ep = make_few_shot(spec, shots=1, seed=1)
    assert np.bincount(ep.train.labels).tolist() == [1] * spec.num_classes
    assert set(ep.ood_test) == set(spec.ood_test)


def test_corrupted_cifar_reports_integrity(tmp_path):
    write_fake_cifar10(tmp_path)  # real md5 checks are on: the fake files fail them
    with pytest.raises(
        DatasetNotFoundError, match="torchvision said: Dataset not found or corrupted"
    ):
        load_dataset("cifar10", root=tmp_path)


def test_check_dataset_name_loads_nothing(monkeypatch):
    from fewclip_tutorial.data import registry

    def no_loading(**kwargs):
        raise AssertionError("check_dataset_name must not load a dataset")

    monkeypatch.setitem(TORCHVISION_LOADERS, "eurosat", no_loading)
    assert registry.check_dataset_name(" EuroSAT ") == "eurosat"
    assert registry.check_dataset_name("shapeworld-blueprint") == "shapeworld-blueprint"
    assert registry.check_dataset_name("ImageFolder:/data/x") == "imagefolder:/data/x"
    assert registry.is_downloadable("dtd") and not registry.is_downloadable("shapeworld")
    with pytest.raises(UnknownDatasetError, match="Did you mean 'eurosat'"):
        registry.check_dataset_name("eurosatt")
    with pytest.raises(ValueError, match="needs a path"):
        registry.check_dataset_name("imagefolder:")


def test_download_flag_for_local_and_generated_datasets(tmp_path):
    write_images(tmp_path / "a", 5)
    write_images(tmp_path / "b", 5, start=50)
    spec = load_dataset(f"imagefolder:{tmp_path}", download=False)  # accepted, nothing to do
    assert spec.classnames == ["a", "b"]
    with pytest.raises(ValueError, match="nothing to download"):
        load_dataset(f"imagefolder:{tmp_path}", download=True)


# --------------------------------------------------------------------------- failed downloads


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """A machine without network: every ``urlopen`` fails as it does without DNS.

    Nothing is contacted; the list collects the URLs torchvision asked for.
    """
    import socket
    import urllib.error
    import urllib.request

    asked: list[str] = []

    def urlopen(request: object, *args: object, **kwargs: object) -> None:
        asked.append(getattr(request, "full_url", str(request)))
        raise urllib.error.URLError(socket.gaierror(-3, "Temporary failure in name resolution"))

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    return asked


def test_failed_download_is_one_clear_error_and_removes_what_it_created(tmp_path, offline):
    from fewclip_tutorial.data import DatasetDownloadError

    root = tmp_path / "new" / "data"  # neither folder exists: the download would create both
    with pytest.raises(DatasetDownloadError) as info:
        load_dataset("eurosat", root=root, download=True)
    assert offline, "the download was not attempted"
    msg = str(info.value)
    assert msg.startswith(f"Could not download dataset 'eurosat' from {offline[0]}: ")
    assert "Temporary failure in name resolution" in msg and "\n" not in msg
    assert "download=True" in msg and "root=" in msg and "load_dataset('shapeworld')" in msg
    cli_msg = info.value.cli_message
    assert cli_msg.startswith(f"Could not download dataset 'eurosat' from {offline[0]}: ")
    assert "--download" in cli_msg and "--data-root" in cli_msg
    assert "--dataset shapeworld" in cli_msg and "download=True" not in cli_msg
    assert isinstance(info.value, DatasetNotFoundError)  # the dataset is still not there
    assert not (tmp_path / "new").exists()  # created folders removed, up to the first one
    assert tmp_path.exists()


@pytest.mark.parametrize("name", sorted(TORCHVISION_LOADERS))
def test_failed_download_keeps_what_existed_before(tmp_path, offline, name):
    from fewclip_tutorial.data import DatasetDownloadError

    root = tmp_path / "data"
    root.mkdir()
    (root / "other_dataset").mkdir()
    (root / "other_dataset" / "file.bin").write_bytes(b"x")
    with pytest.raises(DatasetDownloadError, match=f"Could not download dataset '{name}'"):
        load_dataset(name, root=root, download=True)
    assert offline
    # the dataset's folder (and archive) the download made are gone, the rest is untouched
    assert sorted(p.name for p in root.iterdir()) == ["other_dataset"]
    assert (root / "other_dataset" / "file.bin").read_bytes() == b"x"


def test_failed_download_keeps_a_dataset_folder_that_existed(tmp_path, offline):
    from fewclip_tutorial.data import DatasetDownloadError

    (tmp_path / "eurosat").mkdir()  # e.g. made by hand, or by an earlier attempt
    with pytest.raises(DatasetDownloadError):
        load_dataset("eurosat", root=tmp_path, download=True)
    assert (tmp_path / "eurosat").is_dir()


def test_failed_download_under_the_cli_is_one_line_with_cli_advice(tmp_path, offline, capsys):
    from fewclip_tutorial import cli

    def never_run(*args: object, **kwargs: object) -> dict:
        raise AssertionError("the backbone must not be loaded when the download failed")

    root = tmp_path / "data"
    argv = ["run", "zero-shot", "--dataset", "eurosat", "--download", "--data-root", str(root)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cli, "run_method", never_run)
        assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("fewclip: error: Could not download dataset 'eurosat' from http")
    assert "name resolution" in err and "--data-root" in err and "--dataset shapeworld" in err
    assert "download=True" not in err and "load_dataset" not in err
    assert not root.exists()
