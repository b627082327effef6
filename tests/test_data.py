"""Discovery, label preparation, safe reading, the fast-path cache, get_train_data/get_val_data, prepare script.

Everything runs on a synthetic Cityscapes (data/synthetic.py) of 64x128 images.
"""

import errno
import io
import json
import logging
import os
import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

import data
from data.cityscapes import ImageDataset, discover, from_hf_dataset, read_image, read_label, read_pair
from data.fast import CACHE_DIRNAME, CacheDataset, build_cache, cache_is_current, cache_paths, ensure_cache
from data.labels import ID_TO_TRAIN_ID, IGNORE_INDEX, NUM_CLASSES
from data.prepare import prepare_cityscapes
from data.synthetic import generate_cityscapes
from modeling.benchmarks.data import mmseg_style_sample

CROP, SCALE = (32, 64), (128, 64)  # crop (h, w) and img_scale (long, short) sized for 64x128 images
VALID = set(range(NUM_CLASSES)) | {IGNORE_INDEX}


@pytest.fixture(scope="module")
def raw_root(tmp_path_factory):
    """An unprepared synthetic dataset (no labelTrainIds): 4 train, 2 val, 1 test images."""
    return generate_cityscapes(tmp_path_factory.mktemp("raw") / "cs", num_train=4, num_val=2, num_test=1, height=64,
                               width=128, seed=0)


@pytest.fixture(scope="module")
def root(raw_root, tmp_path_factory):
    """A prepared copy, with the fast-path caches of train and val. Tests must not modify it."""
    root = tmp_path_factory.mktemp("prepared") / "cs"
    shutil.copytree(raw_root, root)
    prepare_cityscapes(root, build_cache=True, progress=False)
    return root


@pytest.fixture
def scratch_root(root, tmp_path):
    """A private copy of the prepared dataset (mtimes kept, so its cache is current) for tests that break it."""
    copy = tmp_path / "cs"
    shutil.copytree(root, copy)
    return copy


# ------------------------------------------------------------------------------------------------- preparation
def test_prepare_writes_train_ids_idempotently(raw_root, tmp_path, load_script):
    root = tmp_path / "cs"
    shutil.copytree(raw_root, root)
    script = load_script("prepare_cityscapes")
    stats = script.main(script.get_args_parser().parse_args(["--data_root", str(root), "--nproc", "2"]))
    assert stats["written"] == 7 and stats["skipped"] == 0 and stats["cache"] == {}
    label_ids = sorted(root.glob("gtFine/*/*/*_gtFine_labelIds.png"))
    assert len(label_ids) == 7
    for path in label_ids:
        train_ids = np.array(Image.open(str(path).replace("_labelIds.png", "_labelTrainIds.png")))
        # rendered from the JSON; must equal the id -> trainId table applied to cityscapesscripts' labelIds
        np.testing.assert_array_equal(train_ids, ID_TO_TRAIN_ID[np.array(Image.open(path))])
        assert set(np.unique(train_ids)) <= VALID and IGNORE_INDEX in train_ids
    assert not list(root.rglob("*.tmp"))

    again = prepare_cityscapes(root, progress=False)
    assert again["written"] == 0 and again["skipped"] == 7
    source = root / "gtFine/train/aachen/aachen_000000_000019_gtFine_polygons.json"
    target = source.with_name("aachen_000000_000019_gtFine_labelTrainIds.png")
    before = np.array(Image.open(target))
    stamp = target.stat().st_mtime_ns + 10**9
    os.utime(source, ns=(stamp, stamp))  # the source changed after the output was written
    assert prepare_cityscapes(root, progress=False)["written"] == 1
    # without the JSON, the labelIds PNG is the source, with the same result
    source.unlink()
    target.unlink()
    assert prepare_cityscapes(root, progress=False)["written"] == 1
    np.testing.assert_array_equal(np.array(Image.open(target)), before)


def test_prepare_script_errors(tmp_path, load_script):
    script = load_script("prepare_cityscapes")
    parse = script.get_args_parser().parse_args
    with pytest.raises(SystemExit, match="error: --data_root .*not a directory"):
        script.main(parse(["--data_root", str(tmp_path / "missing")]))
    with pytest.raises(SystemExit, match="error: .*gtFine: folder not found"):
        script.main(parse(["--data_root", str(tmp_path)]))
    (tmp_path / "gtFine" / "train" / "x").mkdir(parents=True)
    with pytest.raises(SystemExit, match="no .*polygons.json"):
        script.main(parse(["--data_root", str(tmp_path)]))
    with pytest.raises(SystemExit, match="--nproc must be >= 1"):
        script.main(parse(["--data_root", str(tmp_path), "--nproc", "0"]))
    bad = tmp_path / "gtFine" / "train" / "x" / "x_000000_000019_gtFine_polygons.json"
    bad.write_text("{not json")
    with pytest.raises(SystemExit, match="x_000000_000019_gtFine_polygons.json: cannot render polygons"):
        script.main(parse(["--data_root", str(tmp_path)]))


# --------------------------------------------------------------------------------------------------- discovery
def test_discover(root):
    train = discover(root, "train")
    assert isinstance(train, datasets.Dataset) and len(train) == 4
    assert train.column_names == ["image", "label", "city", "stem"]
    assert list(train["image"]) == sorted(train["image"])
    for row in train:
        assert row["image"].endswith(f"leftImg8bit/train/{row['city']}/{row['stem']}_leftImg8bit.png")
        assert row["label"].endswith(f"gtFine/train/{row['city']}/{row['stem']}_gtFine_labelTrainIds.png")
    assert len(discover(root, "val")) == 2 and len(discover(root, "test")) == 1


def test_discover_errors(raw_root, scratch_root):
    with pytest.raises(FileNotFoundError, match="leftImg8bit/nosplit: folder not found"):
        discover(scratch_root, "nosplit")
    with pytest.raises(FileNotFoundError, match="labelTrainIds.png: missing; run `python scripts/prepare_cityscapes"):
        discover(raw_root, "train")  # not prepared yet
    label = next((scratch_root / "gtFine" / "val").glob("*/*_labelTrainIds.png"))
    for path in label.parent.glob(label.name.replace("labelTrainIds.png", "*")):
        path.unlink()
    with pytest.raises(FileNotFoundError, match=f"{label.name}: missing label for image .*_leftImg8bit.png"):
        discover(scratch_root, "val")
    for image in (scratch_root / "leftImg8bit" / "test").glob("*/*.png"):
        image.unlink()
    with pytest.raises(ValueError, match="leftImg8bit/test: empty split"):
        discover(scratch_root, "test")
    shutil.rmtree(scratch_root / "gtFine" / "train")
    with pytest.raises(FileNotFoundError, match="gtFine/train: folder not found"):
        discover(scratch_root, "train")


# ----------------------------------------------------------------------------------------------------- reading
def test_bad_files_raise_errors_naming_them(root, tmp_path):
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    row = discover(root, "train")[0]
    image, label = read_pair(row["image"], row["label"])
    assert image.shape == (64, 128, 3) and image.dtype == np.uint8 and label.shape == (64, 128)

    png = open(row["image"], "rb").read()
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(png[: len(png) // 2])
    with pytest.raises(ValueError, match="truncated.png: cannot decode image .*expected a complete PNG"):
        read_image(str(truncated))
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    with pytest.raises(ValueError, match="corrupt.png: cannot decode image"):
        read_image(str(corrupt))
    with pytest.raises(FileNotFoundError, match="nothing.png: image file not found"):
        read_image(str(tmp_path / "nothing.png"))

    label_ids = row["label"].replace("labelTrainIds", "labelIds")  # labelIds passed as trainIds
    with pytest.raises(ValueError, match=r"labelIds.png: label values \[.*\] outside \{0..18, 255\} \(labelIds"):
        read_label(label_ids)
    color = row["label"].replace("labelTrainIds", "color")
    with pytest.raises(ValueError, match="color.png: label mode RGBA, expected a single-channel"):
        read_label(color)
    small = tmp_path / "small_label.png"
    Image.fromarray(label[:32, :64]).save(small)
    with pytest.raises(ValueError, match="small_label.png: label size 64x32 differs from its image .* expected the"):
        read_pair(row["image"], str(small))

    # through a dataset, in-memory values are named by their row
    bad = np.full((64, 128), 26, np.uint8)
    ds = datasets.Dataset.from_dict({"image": [Image.fromarray(image)], "label": [Image.fromarray(bad)]},
                                    features=datasets.Features({"image": datasets.Image(), "label": datasets.Image()}))
    dataset, _ = data.get_train_data(ds, "reference", crop_size=CROP, img_scale=SCALE)
    with pytest.raises(ValueError, match=r"row 0 \(000000\) label: label values \[26\]"):
        dataset[0]


# ---------------------------------------------------------------------------------------------- the fast cache
def test_cache_holds_the_decoded_files(root):
    source = discover(root, "train")
    assert cache_is_current(root / CACHE_DIRNAME, "train", source)
    index = json.loads(cache_paths(root / CACHE_DIRNAME, "train")["index"].read_text())
    assert (index["count"], index["height"], index["width"]) == (4, 64, 128)
    cached = CacheDataset(root / CACHE_DIRNAME, "train")
    for i, row in enumerate(source):
        image, label = read_pair(row["image"], row["label"])
        item = cached[i]
        assert item["index"] == i and item["image"].dtype == torch.uint8
        np.testing.assert_array_equal(item["image"].numpy(), image)
        np.testing.assert_array_equal(item["label"].numpy(), label)


def test_cache_is_rebuilt_when_sources_change(scratch_root, caplog):
    cache_dir = scratch_root / CACHE_DIRNAME
    image = discover(scratch_root, "train")[2]["image"]
    pixels = np.array(Image.open(image))
    pixels[:8] = 0  # a changed image: new content, new mtime
    Image.fromarray(pixels).save(image)
    assert not cache_is_current(cache_dir, "train", discover(scratch_root, "train"))
    with caplog.at_level(logging.WARNING):
        dataset, _ = data.get_train_data(scratch_root, "fast", crop_size=CROP, img_scale=SCALE)
    assert "building the fast-path cache of train" in caplog.text
    np.testing.assert_array_equal(dataset[2]["image"].numpy(), pixels)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        data.get_train_data(scratch_root, "fast", crop_size=CROP, img_scale=SCALE)
    assert "building" not in caplog.text


@pytest.mark.parametrize("code", [errno.ENOSYS, errno.EOPNOTSUPP])
def test_cache_builds_where_the_filesystem_refuses_flock(root, tmp_path, monkeypatch, caplog, code):
    # Lustre without `flock`, NFS without lockd: the lock call itself fails; the build goes on unlocked, with a warning
    from data import locking

    def refuse(fd, operation):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(locking.fcntl, "flock", refuse)
    cache_dir = tmp_path / "cache"
    with caplog.at_level(logging.WARNING):
        _, built = ensure_cache(discover(root, "train"), cache_dir, "train", progress=False)
    assert built and cache_is_current(cache_dir, "train", discover(root, "train"))
    assert f"warning: cannot lock {cache_dir / '.train.lock'} ({os.strerror(code)}: the filesystem does not " \
           "support flock); several processes may build this cache at once" in caplog.text


def test_every_lock_is_taken_through_the_one_helper():
    # data/locking.py handles the filesystems that refuse flock; a direct fcntl call elsewhere would not
    repo = Path(__file__).resolve().parents[1]
    direct = [str(path.relative_to(repo)) for folder in ("data", "modeling", "scripts") for path in
              (repo / folder).rglob("*.py") if "fcntl." in path.read_text() and path.name != "locking.py"]
    assert direct == []


def test_unreadable_cache_raises_and_prepare_repairs_it(scratch_root):
    paths = cache_paths(scratch_root / CACHE_DIRNAME, "train")
    with open(paths["images"], "r+b") as handle:
        handle.truncate(1000)
    with pytest.raises(ValueError, match="train_images.u8: fast-path cache file has 1000 bytes, expected 98304"):
        data.get_train_data(scratch_root, "fast", crop_size=CROP, img_scale=SCALE)
    stats = prepare_cityscapes(scratch_root, build_cache=True, progress=False)
    assert stats["cache"]["train"]["built"] and not stats["cache"]["val"]["built"]
    data.get_train_data(scratch_root, "fast", crop_size=CROP, img_scale=SCALE)
    paths["index"].write_text("{not json")
    with pytest.raises(ValueError, match="train_index.json: unreadable fast-path cache index"):
        data.get_train_data(scratch_root, "fast", crop_size=CROP, img_scale=SCALE)
    with pytest.raises(ValueError, match="train_index.json: unreadable"):
        data.get_val_data(scratch_root, "train")


def test_cache_needs_one_size_per_split(scratch_root, tmp_path):
    row = discover(scratch_root, "val")[1]
    image, label = read_pair(row["image"], row["label"])
    Image.fromarray(image[:32]).save(row["image"])
    Image.fromarray(label[:32]).save(row["label"])
    with pytest.raises(ValueError, match=f"{row['image']}: size 128x32, expected 128x64 like the split's first"):
        build_cache(discover(scratch_root, "val"), tmp_path / "cache", "val", progress=False)
    assert not list((tmp_path / "cache").glob("val_*"))  # nothing half-written


# ------------------------------------------------------------------------------------- get_train_data / get_val
def test_reference_train_data_is_reproducible_per_sample(root):
    dataset, on_device = data.get_train_data(root, "reference", crop_size=CROP, seed=5, img_scale=SCALE)
    first = dataset[1]
    assert first["pixel_values"].shape == (3, *CROP) and first["pixel_values"].dtype == torch.float32
    assert first["labels"].shape == CROP and set(first["labels"].unique().tolist()) <= VALID
    assert torch.equal(dataset[1]["pixel_values"], first["pixel_values"])
    dataset.set_epoch(1)
    assert not torch.equal(dataset[1]["pixel_values"], first["pixel_values"])
    other_seed, _ = data.get_train_data(root, "reference", crop_size=CROP, seed=6, img_scale=SCALE)
    assert not torch.equal(other_seed[1]["pixel_values"], first["pixel_values"])
    # persistent workers see set_epoch (the epoch lives in shared memory), and workers do not change draws
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=1, persistent_workers=True)
    for epoch in (0, 1):
        dataset.set_epoch(epoch)
        batches = list(loader)
        expected = torch.stack([dataset[i]["pixel_values"] for i in range(4)])
        assert torch.equal(torch.cat([b["pixel_values"] for b in batches]), expected)
    pixel_values, labels = on_device(batches[0], None)
    assert pixel_values.dtype == torch.float32 and labels.dtype == torch.int64 and labels.shape == (2, *CROP)


def test_fast_train_data_through_a_loader(root):
    dataset, on_device = data.get_train_data(root, "fast", crop_size=CROP, img_scale=SCALE)
    assert len(dataset) == 4
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=0)))
    assert batch["image"].shape == (4, 64, 128, 3) and batch["label"].shape == (4, 64, 128)
    pixel_values, labels = on_device(batch, torch.Generator().manual_seed(0))
    assert pixel_values.shape == (4, 3, *CROP) and pixel_values.dtype == torch.float32
    assert labels.shape == (4, *CROP) and labels.dtype == torch.int64
    assert set(labels.unique().tolist()) <= VALID and len(set(labels.unique().tolist()) - {IGNORE_INDEX}) > 1
    again = on_device(batch, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], pixel_values) and torch.equal(again[1], labels)
    assert not torch.equal(on_device(batch, torch.Generator().manual_seed(1))[0], pixel_values)
    with pytest.raises(ValueError, match="expected a torch.Generator"):
        on_device(batch, None)
    with pytest.raises(ValueError, match="pipeline must be 'fast' or 'reference'"):
        data.get_train_data(root, "slow")


def test_val_data_from_cache_equals_png(root):
    cached, on_device = data.get_val_data(root, "val")
    decoded = ImageDataset(discover(root, "val"))
    assert isinstance(cached, CacheDataset) and len(cached) == len(decoded) == 2
    for i in range(2):
        a, b = cached[i], decoded[i]
        assert a["image"].shape == (3, 64, 128) and a["label"].dtype == torch.uint8 and a["index"] == i
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    batch = torch.utils.data.default_collate([cached[0], cached[1]])
    pixel_values, labels = on_device(batch)
    torch.testing.assert_close(pixel_values, data.normalize(batch["image"]))
    assert pixel_values.shape == (2, 3, 64, 128) and labels.dtype == torch.int64
    test_set, _ = data.get_val_data(root, "test")  # not cached: decoded from PNG
    assert isinstance(test_set, ImageDataset) and len(test_set) == 1


def test_user_hf_dataset(root, tmp_path):
    rows = [read_pair(r["image"], r["label"]) for r in discover(root, "train")]
    buffers = []
    for image, _ in rows:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        buffers.append({"bytes": buffer.getvalue(), "path": None})
    features = datasets.Features({"img": datasets.Image(), "seg": datasets.Image()})
    ds = datasets.Dataset.from_dict({"img": buffers, "seg": [Image.fromarray(label) for _, label in rows]},
                                    features=features)
    source = from_hf_dataset(ds, image_column="img", label_column="seg")
    assert source.column_names == ["image", "label", "city", "stem"] and len(source) == 4
    with pytest.raises(ValueError, match="dataset has no column 'image'"):
        from_hf_dataset(ds)
    renamed = ds.rename_columns({"img": "image", "seg": "label"})
    reference, _ = data.get_train_data(renamed, "reference", crop_size=CROP, img_scale=SCALE)
    assert reference[0]["pixel_values"].shape == (3, *CROP)
    with pytest.raises(ValueError, match="needs cache_dir"):
        data.get_train_data(renamed, "fast")
    fast, _ = data.get_train_data(renamed, "fast", crop_size=CROP, img_scale=SCALE, cache_dir=tmp_path / "c")
    np.testing.assert_array_equal(fast[3]["image"].numpy(), rows[3][0])
    val, _ = data.get_val_data(renamed, cache_dir=tmp_path / "none")
    assert torch.equal(val[1]["label"], torch.from_numpy(rows[1][1]))


# --------------------------------------------------------------------------------------------------- benchmark
def test_benchmark_data_mode(load_script, tmp_path, root):
    bench = load_script("benchmark")
    args = bench.get_args_parser().parse_args(
        ["data", "--height", "64", "--width", "128", "--num_images", "2", "--workers", "0", "--batch_size", "2",
         "--crop_size", "32", "64", "--img_scale", "128", "64", "--repeats", "1", "--work_dir", str(tmp_path / "bench"),
         "--out", str(tmp_path / "bench.json")])
    results = bench.main(args)
    for key in ("reference_ms_per_sample", "fast_load_ms_per_sample", "device_aug_ms_per_batch", "loader"):
        assert key in results
    assert results["fast_load_ms_per_sample"] > 0 and results["reference_ms_per_sample"] > 0
    assert json.loads((tmp_path / "bench.json").read_text())["num_images"] == 2
    timed = results["reference_vs_opencv_mmseg_way"]
    # both ms figures are rounded to 0.01 ms, which at this tiny size moves their ratio by a few percent
    assert timed["ratio"] == pytest.approx(timed["reference_cpu_ms"] / timed["opencv_cpu_ms"], rel=0.01, abs=0.05)
    # the baseline computes the same samples as the reference pipeline, the mmseg way (BGR, cv2 normalize)
    dataset, _ = data.get_train_data(root, "reference", crop_size=CROP, img_scale=SCALE)
    for i, row in enumerate(discover(root, "train")):
        pixels, labels = mmseg_style_sample(row["image"], row["label"], (0, 0, i), CROP, SCALE)
        assert torch.equal(dataset[i]["labels"], torch.from_numpy(labels))
        torch.testing.assert_close(dataset[i]["pixel_values"], torch.from_numpy(pixels), atol=1e-5, rtol=0)
