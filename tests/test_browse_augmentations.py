"""scripts/browse_augmentations.py: the grid PNG and the drawn parameters of both pipelines, on a synthetic set."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.cityscapes import discover, read_pair
from data.labels import IGNORE_INDEX
from data.transforms import CROP_TRIES, RATIO_RANGE, rescale_size, resize_label

CROP = (64, 128)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def browse(load_script):
    return load_script("browse_augmentations")


def parse(browse, *argv):
    return browse.get_args_parser().parse_args(list(argv))


@pytest.fixture(scope="module")
def browsed(browse, tmp_path_factory):
    """One run on a synthetic set the script generates (64x128 images, 64x128 crops), both pipelines."""
    out = tmp_path_factory.mktemp("browse") / "pictures" / "aug.png"
    args = parse(browse, "--dataset", "synthetic", "--num_samples", "3", "--crop_size", *map(str, CROP),
                 "--seed", "1", "--out", str(out))
    return browse.main(args), args


def test_grid_png_and_json(browse, browsed):
    results, args = browsed
    path = Path(results["png"])
    assert path == Path(args.out) and json.loads(path.with_suffix(".json").read_text()) == results
    tile_height = (browse.TILE_INCHES - browse.MARGIN_INCHES) * CROP[0] / CROP[1]
    expected = (round((2 * browse.TILE_INCHES + browse.MARGIN_INCHES) * browse.DPI),
                round((browse.TITLE_INCHES + 3 * (tile_height + browse.CAPTION_INCHES)) * browse.DPI))
    with Image.open(path) as image:
        image.load()
        assert image.format == "PNG" and image.size == expected and results["png_size"] == list(expected)
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.std() > 20  # pictures, not a blank canvas
    assert (Path(results["data_root"]) / "gtFine" / "train").is_dir()  # generated beside the PNG
    assert results["pipelines"] == ["reference", "fast"] and len(results["indices"]) == 3
    assert [s["pipeline"] for s in results["samples"]] == ["reference"] * 3 + ["fast"] * 3


def test_recorded_params_are_within_the_recipe(browsed):
    results, _ = browsed
    img_scale = tuple(results["img_scale"])
    assert img_scale == (128, 64)  # the synthetic set rescales relative to its own size, as training does
    for sample in results["samples"]:
        assert RATIO_RANGE[0] <= sample["ratio"] < RATIO_RANGE[1]
        height, width = sample["rescaled_size"]
        assert (height, width) == rescale_size(64, 128, sample["ratio"], img_scale)
        y, x = sample["crop_offset"]
        assert 0 <= y <= max(height - CROP[0], 0) and 0 <= x <= max(width - CROP[1], 0)
        assert 0 <= sample["crop_candidate"] <= CROP_TRIES and isinstance(sample["flip"], bool)
        photometric = sample["photometric"]
        assert photometric["brightness"] is None or -32 <= photometric["brightness"] <= 32
        assert photometric["hue"] is None or -18 <= photometric["hue"] < 18


@pytest.mark.parametrize("pipeline", ["reference", "fast"])
def test_shown_label_is_the_recorded_crop(browse, browsed, pipeline):
    """The reported ratio, crop and flip are the ones applied: they rebuild the shown label from the source."""
    results, args = browsed
    root, indices = Path(results["data_root"]), results["indices"]
    builder = {"reference": browse.reference_samples, "fast": browse.fast_samples}[pipeline]
    samples = builder(root, args, indices, tuple(results["img_scale"]))
    source = discover(root, "train")
    for sample in samples:
        label = read_pair(source[sample["index"]]["image"], source[sample["index"]]["label"])[1]
        y, x = sample["crop_offset"]
        crop = resize_label(label, tuple(sample["rescaled_size"]))[y:y + CROP[0], x:x + CROP[1]]
        crop = crop[:, ::-1] if sample["flip"] else crop
        expected = np.full(CROP, IGNORE_INDEX, np.int64)
        expected[:crop.shape[0], :crop.shape[1]] = crop
        np.testing.assert_array_equal(sample["label"], expected)
        assert sample["image"].shape == (*CROP, 3) and sample["image"].dtype == np.uint8
    assert [{k: v for k, v in s.items() if k not in ("image", "label")} for s in samples] == [
        s for s in results["samples"] if s["pipeline"] == pipeline]


def test_bad_data_root(browse, tmp_path):
    with pytest.raises(SystemExit, match=rf"^error: --data_root: {tmp_path / 'nope'}: folder not found") as exit:
        browse.main(parse(browse, "--data_root", str(tmp_path / "nope"), "--out", str(tmp_path / "a.png")))
    assert "\n" not in exit.value.code and not (tmp_path / "a.png").exists()
