"""Prepare on slices of the real data, and every kind of bad input a user's folder can hold."""
import gzip
import io
import pickle
import shutil
import struct
import subprocess
import sys
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from components import fetch
from components.artifacts import read_json
from components.config import parse_params
from components.data import DataError, class_file_counts, load_splits, prepare, prepared_sizes
from deploy.contract import Contract
from deploy.model import decode_image
from tests.conftest import (
    PROJECT,
    RAW,
    make_small_source,
    make_small_target,
    tiny_params,
)


def _prepare_target(root: Path, tmp_path: Path, sizes=(28,), **overrides):
    params = parse_params(tiny_params(**{"data.target.path": str(root), **overrides}))
    result = prepare(params.data.target, params.data, params.data.channels, list(sizes), params.seed, tmp_path / "out.npz",
                     tmp_path / "report.json")
    return result, read_json(tmp_path / "report.json")


def _prepare_source(root: Path, tmp_path: Path):
    params = parse_params(tiny_params(**{"sources.pipeline.fashion-mnist.data.path": str(root)}))
    return prepare(params.sources.pipeline["fashion-mnist"].data, params.data, 1, [28], 0, tmp_path / "s.npz", tmp_path / "s.json")


def test_folder_prepare_splits_stratified_and_k_per_class(tmp_path):
    root = make_small_target(tmp_path / "raw")
    result, report = _prepare_target(root, tmp_path)
    splits = load_splits(result.path)
    assert splits.x_train.shape[1:] == (1, 28, 28) and splits.x_train.dtype == np.uint8
    assert result.counts == {"train": 50, "val": 40, "test": 60}
    assert set(report["per_class"]["test"].values()) == {6}
    assert set(report["per_class"]["train"].values()) == {5}
    assert splits.classes == tuple(sorted(p.name for p in root.iterdir()))


def test_splits_are_disjoint_and_seeded(tmp_path):
    root = make_small_target(tmp_path / "raw")
    first, _ = _prepare_target(root, tmp_path / "a")
    again, _ = _prepare_target(root, tmp_path / "b")
    other_seed, _ = _prepare_target(root, tmp_path / "c", seed=7)
    assert first.data_version == again.data_version
    a, c = load_splits(first.path), load_splits(other_seed.path)
    assert np.array_equal(a.x_test, c.x_test), "the test split depends on split_seed only"
    assert not np.array_equal(a.x_train, c.x_train), "seed draws a different k-per-class subset"
    rows = lambda x: {r.tobytes() for r in x}  # noqa: E731
    assert not rows(a.x_train) & rows(a.x_test) and not rows(a.x_val) & rows(a.x_test)


def test_idx_source_uses_t10k_as_test(tmp_path):
    root = make_small_source(tmp_path / "fm", train=500, test=120)
    result = _prepare_source(root, tmp_path)
    assert result.counts["test"] == 120 and result.counts["val"] == 100
    assert result.counts["train"] + result.counts["val"] + result.quarantined == 500


def test_truncated_idx_file_is_named(tmp_path):
    root = make_small_source(tmp_path / "fm", train=200, test=50)
    images = root / "train-images-idx3-ubyte.gz"
    images.write_bytes(gzip.compress(gzip.decompress(images.read_bytes())[:-100]))
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz: truncated IDX file"):
        _prepare_source(root, tmp_path)


def test_bad_files_are_quarantined_by_name(tmp_path):
    root = make_small_target(tmp_path / "raw")
    clean, _ = _prepare_target(root, tmp_path / "clean")  # the real slice has a few duplicates of its own
    good = sorted((root / "cat").iterdir())[0]
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "cat" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 20)
    (root / "dog" / "truncated.png").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    shutil.copy(good, root / "cat" / "copy-of-first.png")          # duplicate within a class
    shutil.copy(sorted((root / "cow").iterdir())[3], root / "horse" / "mislabelled.png")  # same image, two labels
    result, report = _prepare_target(root, tmp_path)
    reasons = {Path(e["file"]).name: e["reason"] for e in report["quarantine"]}
    assert reasons["notes.txt"] == "not an image file"
    assert reasons["corrupt.png"].startswith("cannot decode") or reasons["corrupt.png"] == "not an image file"
    assert reasons["truncated.png"].startswith("cannot decode")
    assert reasons["copy-of-first.png"].startswith("exact duplicate of") and good.name in reasons["copy-of-first.png"]
    assert reasons["mislabelled.png"] == "conflicting labels (cow, horse)"
    assert result.quarantined == len(report["quarantine"]) == clean.quarantined + 6  # both mislabelled copies go


def test_a_class_folders_subfolders_are_that_class_and_hidden_files_are_not_read(tmp_path):
    root = make_small_target(tmp_path / "raw")
    every_label = {"data.target.labels_per_class": None}  # every usable image is counted in a split
    flat_counts = class_file_counts(root)
    flat, _ = _prepare_target(root, tmp_path / "flat", **every_label)
    # A third of the cat images moved into day/ and night/, and the files a system or a tool leaves: the same data.
    for index, image in enumerate(sorted((root / "cat").iterdir())[::3]):
        (root / "cat" / ("day", "night")[index % 2]).mkdir(exist_ok=True)
        image.rename(root / "cat" / ("day", "night")[index % 2] / image.name)
    (root / "cat" / ".DS_Store").write_bytes(b"Bud1\x00")
    (root / "dog" / ".ipynb_checkpoints").mkdir()
    shutil.copy(sorted((root / "dog").glob("*.png"))[0], root / "dog" / ".ipynb_checkpoints" / "stale.png")
    assert class_file_counts(root) == flat_counts
    nested, report = _prepare_target(root, tmp_path / "nested", **every_label)
    assert sum(nested.counts.values()) + nested.quarantined == sum(flat_counts.values())
    assert (nested.counts, nested.quarantined) == (flat.counts, flat.quarantined)
    assert report["per_class"]["train"]["cat"] == read_json(tmp_path / "flat" / "report.json")["per_class"]["train"]["cat"]
    assert not [entry["file"] for entry in report["quarantine"] if "/." in entry["file"]]  # neither read nor listed


def test_bad_files_fail_mode_stops_at_the_file(tmp_path):
    root = make_small_target(tmp_path / "raw")
    (root / "cat" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=r"notes.txt: not an image file; fix or remove the file"):
        _prepare_target(root, tmp_path, **{"data.bad_files": "fail"})


def test_empty_class_folder_is_an_error(tmp_path):
    root = make_small_target(tmp_path / "raw")
    (root / "unicorn").mkdir()
    with pytest.raises(DataError, match="empty class folder.*unicorn"):
        _prepare_target(root, tmp_path)


def test_class_too_small_for_the_split_names_class_and_fix(tmp_path):
    root = make_small_target(tmp_path / "raw")
    for image in sorted((root / "zebra").iterdir())[5:]:
        image.unlink()
    with pytest.raises(DataError, match=r"zebra has \d+, need 5.*lower val_size / test_size / labels_per_class"):
        _prepare_target(root, tmp_path)


def test_class_with_too_few_usable_images(tmp_path):
    root = make_small_target(tmp_path / "raw")
    for image in sorted((root / "bird").iterdir())[2:]:
        image.write_bytes(b"broken")
    with pytest.raises(DataError, match=r"fewer than 3 usable images: bird \(2\)"):
        _prepare_target(root, tmp_path)


def test_odd_images_are_converted(tmp_path):
    """Colour, alpha, palette, odd sizes and JPEG all become 1x28x28 gray."""
    root = make_small_target(tmp_path / "raw", per_class=20, classes=2)
    rng = np.random.default_rng(0)
    first = sorted(root.iterdir())[0]
    Image.fromarray(rng.integers(0, 255, (60, 100, 3), dtype=np.uint8)).save(first / "wide.jpg", quality=90)
    Image.fromarray(rng.integers(0, 255, (33, 17, 4), dtype=np.uint8), "RGBA").save(first / "alpha.png")
    Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).convert("P").save(first / "palette.png")
    Image.fromarray(rng.integers(0, 65535, (30, 30), dtype=np.uint16)).save(first / "sixteen-bit.png")
    result, report = _prepare_target(root, tmp_path, **{"data.target.test_size": 10, "data.target.val_size": 4,
                                                       "data.target.labels_per_class": None})
    assert report["quarantined"] == 0
    assert sum(result.counts.values()) == 44
    assert load_splits(result.path).x_test.shape[1:] == (1, 28, 28)


def test_rgb_channels(tmp_path):
    root = make_small_target(tmp_path / "raw", per_class=20, classes=2)
    result, _ = _prepare_target(root, tmp_path, **{"data.channels": 3, "data.target.test_size": 10, "data.target.val_size": 4})
    x = load_splits(result.path).x_train
    assert x.shape[1:] == (3, 28, 28) and np.array_equal(x[:, 0], x[:, 2]), "gray files become RGB by copying"


def test_every_input_size_holds_what_the_server_would_decode(tmp_path):
    """One prepare, two sizes; each stored image equals the server's decoding of its file at that size."""
    root = make_small_target(tmp_path / "raw", per_class=20, classes=3)
    first = sorted(root.iterdir())[0]
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (90, 140, 3), dtype=np.uint8)).save(first / "photo.png")
    result, report = _prepare_target(root, tmp_path, sizes=(28, 64), **{"data.target.test_size": 21, "data.target.val_size": 6,
                                                                         "data.target.labels_per_class": None})
    assert prepared_sizes(result.path) == [28, 64] and report["sizes"] == [28, 64]
    small, large = load_splits(result.path, 28), load_splits(result.path, 64)
    assert small.data_version == large.data_version == result.data_version
    assert np.array_equal(small.y_test, large.y_test) and list(small.origin_test) == list(large.origin_test)
    for splits in (small, large):
        contract = Contract("L", splits.image_size, splits.image_size, (0.5,), (0.5,))
        for origin, pixels in zip(splits.origin_test, splits.x_test):
            assert np.array_equal(decode_image(Path(origin).read_bytes(), contract), pixels), origin
    with pytest.raises(DataError, match=r"holds images at \[28, 64\] px, not 32"):
        load_splits(result.path, 32)


def test_missing_folder_and_single_class(tmp_path):
    with pytest.raises(DataError, match="no such folder"):
        _prepare_target(tmp_path / "nowhere", tmp_path)
    root = make_small_target(tmp_path / "raw", classes=1)
    with pytest.raises(DataError, match="need at least 2"):
        _prepare_target(root, tmp_path)


def _wheel_with(tmp_path: Path, data_blob: bytes) -> Path:
    wheel = tmp_path / "animal_mnist-0.4-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for member in fetch.ANIMAL_MNIST_MEMBERS:
            archive.writestr(member, data_blob)
    return wheel


def test_fetch_refuses_a_pickle_that_is_not_the_pinned_one(tmp_path):
    wheel = _wheel_with(tmp_path, gzip.compress(pickle.dumps(np.zeros((2, 28, 28), np.uint8))))
    with pytest.raises(fetch.FetchError, match="differs from the pinned value; refusing to unpickle"):
        fetch.fetch_animal_mnist(tmp_path / "out", wheel)


def test_numpy_only_unpickler_refuses_code():
    payload = pickle.dumps(print)
    with pytest.raises(pickle.UnpicklingError, match="refusing to load builtins.print"):
        fetch._NumpyOnlyUnpickler(io.BytesIO(payload)).load()


def test_fetched_default_data_is_pinned_and_complete():
    """data/raw (written by `graft fetch-data`) matches the DVC-pinned version committed in git."""
    counts = {d.name: len(list(d.iterdir())) for d in (RAW / "animal-mnist").iterdir()}
    assert sorted(counts) == sorted(fetch.ANIMAL_MNIST_CLASSES) and sum(counts.values()) == 10000
    status = subprocess.run([sys.executable, "-m", "dvc", "status", "data/raw/animal-mnist.dvc", "data/raw/fashion-mnist.dvc"],
                            cwd=PROJECT, capture_output=True, text=True, check=True)
    assert "changed" not in status.stdout, status.stdout


def _png_bytes(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _stored(tmp_path: Path, name: str) -> np.ndarray:
    """The prepared 28 px image (C, H, W) that came from the file `name`, wherever the split put it."""
    splits = load_splits(tmp_path / "out.npz")
    for split in ("train", "val", "test"):
        origins = [Path(o).name for o in getattr(splits, f"origin_{split}")]
        if name in origins:
            return getattr(splits, f"x_{split}")[origins.index(name)].astype(float)
    raise AssertionError(f"{name} was not kept")


def test_odd_images_are_converted_correctly_or_quarantined(tmp_path):
    """16-bit, palette, CMYK, alpha and EXIF-rotated images become the pixels a viewer sees; floating-point and
    tiny images are quarantined; two blank images of different sizes are one example at the training size."""
    root = make_small_target(tmp_path / "raw")
    cat = root / "cat"
    gradient16 = np.tile(np.linspace(0, 65535, 64), (64, 1)).astype(np.uint16)  # 16-bit gray, mean half scale
    (cat / "sixteen-bit.png").write_bytes(_png_bytes(Image.fromarray(gradient16)))
    (cat / "palette.png").write_bytes(_png_bytes(Image.fromarray(np.full((32, 32), 200, np.uint8)).convert("P")))
    (cat / "cmyk.jpg").write_bytes(_png_bytes(Image.new("CMYK", (32, 32), (0, 0, 0, 0)), "JPEG"))  # white ink-free paper
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., :3], rgba[:16, :, 3] = 255, 255  # white; top half opaque, bottom half transparent
    (cat / "alpha.png").write_bytes(_png_bytes(Image.fromarray(rgba, "RGBA")))
    sideways = np.zeros((20, 40), np.uint8)
    sideways[:, :20] = 255  # stored: left half white; EXIF orientation 6 shows it turned 90 degrees clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    (cat / "rotated.jpg").write_bytes(_png_bytes(Image.fromarray(sideways), "JPEG", exif=exif, quality=95))
    (cat / "float.tif").write_bytes(_png_bytes(Image.fromarray(np.random.default_rng(0).random((32, 32), np.float32)), "TIFF"))
    (cat / "tiny.png").write_bytes(_png_bytes(Image.fromarray(np.full((4, 4), 90, np.uint8))))
    (cat / "blank-big.png").write_bytes(_png_bytes(Image.new("L", (1600, 1200), 0)))
    (cat / "blank-small.png").write_bytes(_png_bytes(Image.new("L", (160, 120), 0)))

    _, report = _prepare_target(root, tmp_path)
    reasons = {Path(e["file"]).name: e["reason"] for e in report["quarantine"]}
    assert abs(_stored(tmp_path, "sixteen-bit.png")[0].mean() - 127.5) < 3, "scaled to 8 bits, not clipped to white"
    assert abs(_stored(tmp_path, "palette.png")[0].mean() - 200) < 1
    assert _stored(tmp_path, "cmyk.jpg")[0].mean() > 250
    alpha = _stored(tmp_path, "alpha.png")[0]
    assert alpha[:12].mean() > 250 and alpha[-12:].mean() < 5, "transparent pixels are black, opaque ones white"
    rotated = _stored(tmp_path, "rotated.jpg")[0]
    assert rotated[:12].mean() > 200 and rotated[-12:].mean() < 50, "turned upright by its EXIF orientation"
    assert reasons["float.tif"].startswith("cannot decode: a floating-point image has no defined pixel range")
    assert reasons["tiny.png"] == "too small: 4x4 px, below data.min_image_side (8)"
    assert reasons["blank-small.png"] == f"the same image at 28x28 px as {cat / 'blank-big.png'}"


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height gray pixels and holds none: all a decompression bomb's header needs."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)) + chunk(b"IDAT", b"")


def test_an_image_with_more_pixels_than_allowed_is_quarantined_by_the_setting_unread(tmp_path, recwarn):
    """The header decides: a 200 Mpx declaration is refused without decoding (it holds no pixels, so decoding
    would say "truncated"), and a real image over a lowered data.max_image_pixels too; PIL's own guard stays
    silent (no DecompressionBombWarning on the user's terminal)."""
    root = make_small_target(tmp_path / "raw")
    (root / "cat" / "bomb.png").write_bytes(_png_header(20000, 10000))
    (root / "dog" / "wide.png").write_bytes(_png_bytes(Image.new("L", (300, 200), 255)))
    _, report = _prepare_target(root, tmp_path, **{"data.max_image_pixels": 50_000})
    reasons = {Path(e["file"]).name: e["reason"] for e in report["quarantine"]}
    assert reasons["bomb.png"] == ("too large: 20000x10000 px (200.0 Mpx), above data.max_image_pixels (50,000); "
                                   "downscale it, or raise data.max_image_pixels")
    assert reasons["wide.png"].startswith("too large: 300x200 px (0.1 Mpx), above data.max_image_pixels (50,000)")
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]


def test_the_server_decodes_a_16_bit_upload_as_preparation_does():
    contract = Contract("L", 28, 28, (0.5,), (0.5,))
    gradient16 = np.tile(np.linspace(0, 65535, 64), (64, 1)).astype(np.uint16)
    served = decode_image(_png_bytes(Image.fromarray(gradient16)), contract)
    assert abs(served.mean() - 127.5) < 3


def test_an_image_reached_through_a_symlink_out_of_the_data_folder_is_refused(tmp_path):
    root = make_small_target(tmp_path / "raw")
    outside = tmp_path / "elsewhere.png"
    outside.write_bytes(_png_bytes(Image.fromarray(np.full((28, 28), 7, np.uint8))))
    (root / "cat" / "link.png").symlink_to(outside)
    (root / "dog" / "inside-link.png").symlink_to(sorted((root / "dog").iterdir())[0])  # stays inside: fine
    with pytest.raises(DataError, match=r"cat/link.png: a symlink out of the data folder .*copy the image\(s\) into"):
        _prepare_target(root, tmp_path)


def test_a_file_given_for_the_folder_is_named_as_a_file(tmp_path):
    image = tmp_path / "one.png"
    image.write_bytes(_png_bytes(Image.fromarray(np.full((28, 28), 7, np.uint8))))
    with pytest.raises(DataError, match=r"one.png is a file, not a folder; give the folder holding <class name>/<image files>"):
        _prepare_target(image, tmp_path)


def test_transparent_pixels_become_black_in_colour_too(tmp_path):
    root = make_small_target(tmp_path / "raw", per_class=20, classes=2)
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., 0], rgba[:, :16, 3] = 255, 255  # red; left half opaque, right half transparent
    (root / "bear" / "alpha.png").write_bytes(_png_bytes(Image.fromarray(rgba, "RGBA")))
    _prepare_target(root, tmp_path, **{"data.channels": 3, "data.target.test_size": 10, "data.target.val_size": 4,
                                       "data.target.labels_per_class": None})
    alpha = _stored(tmp_path, "alpha.png")
    assert alpha[0, :, :12].mean() > 250 and alpha[1:, :, :12].max() < 5, "opaque red stays red"
    assert alpha[:, :, -12:].max() < 5, "transparent pixels are black"


def test_file_mode_names_what_a_file_holds():
    from components.data import file_mode

    gray_palette = Image.fromarray(np.full((8, 8), 90, np.uint8)).convert("P")
    colour_palette = Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)).convert("P")
    colour_palette.info["transparency"] = 0
    assert [file_mode(i) for i in (gray_palette, colour_palette, Image.new("LA", (4, 4)), Image.new("CMYK", (4, 4)))] == \
        ["L", "RGBA", "LA", "CMYK"]


def test_every_class_is_in_each_split_and_a_split_that_fits_is_proposed():
    from components.config import DatasetParams
    from components.data import propose_split, split_counts, split_shortfalls, stratified_quota

    assert list(stratified_quota(np.full(10, 1000), 2000)) == [200] * 10, "equal classes: proportions, as before"
    assert list(stratified_quota(np.array([500, 3, 60]), 10)) == [7, 1, 2], "a small class is not left out (was 9, 0, 1)"
    configured = DatasetParams(name="parts", format="folder", path="p", val_size=500, test_size=2000, labels_per_class=10)
    counts = {"bolt": 150, "clip": 5, "gear": 90, "hinge": 60, "nut": 120, "spring": 70, "washer": 68}  # 563
    assert split_shortfalls(counts, configured) == ["test_size 2000 + val_size 500 leave none of 563 images to train on"]
    proposed = propose_split(counts, configured)
    assert (proposed.test_size, proposed.val_size, proposed.labels_per_class) == (84, 56, 2)  # clip keeps 2
    shares = split_counts(np.array(list(counts.values())), proposed.test_size, proposed.val_size)
    assert all(shares[split].min() >= 1 for split in shares) and split_shortfalls(counts, proposed) == []
    assert propose_split({**counts, "clip": 3}, configured).labels_per_class == 1
    assert propose_split({**counts, "clip": 2}, configured) is None, "one image each for val, test and training"
    assert split_shortfalls(counts, proposed.model_copy(update={"test_size": 5})) == ["test_size 5 < 7 classes"]


def test_check_raw_data_counts_files_in_milliseconds_and_names_a_split_that_fits():
    """What `graft run` checks before anything starts, on the real 10k-file default target."""
    from components.settings import load_settings
    from components.userdata import check_raw_data

    params = load_settings(PROJECT / "params.yaml")
    check_raw_data(PROJECT, params)  # imports once
    start = time.perf_counter()
    check_raw_data(PROJECT, params)
    assert time.perf_counter() - start < 0.5, "counts files, opens none"
    target = params.data.target.model_copy(update={"labels_per_class": 950})
    unfit = params.model_copy(update={"data": params.data.model_copy(update={"target": target})})
    with pytest.raises(DataError, match=r"data.target: the split does not fit data/raw/animal-mnist \(10 classes, 10000 files\): "
                                        r"bear keeps 750, .* need 950 \(labels_per_class\)\. Set data.target.test_size: 1500, "
                                        r"data.target.val_size: 1000, data.target.labels_per_class: 750"):
        check_raw_data(PROJECT, unfit)
