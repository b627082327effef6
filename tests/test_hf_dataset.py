"""Any Hugging Face segmentation dataset (data/hf_dataset.py, --dataset_name): loading (parquet, save_to_disk), the
seeded validation split, id2label, reduce_labels, the fast path's cache from a datasets.Dataset, fine-tuning from a
checkpoint with another class count, and end to end: scripts/train.py, eval.py and infer.py on a 5-class parquet
dataset the test writes.
"""

import io
import json
from argparse import Namespace
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

import data
from data.fast import ensure_cache
from data.hf_dataset import HFDatasetSpec, hf_dataset_spec, load_splits, parse_id2label, read_id2label
from data.labels import CITYSCAPES, IGNORE_INDEX, PALETTE, LabelSpace, colorize
from modeling import HRNetFCNConfig, HRNetFCNForSemanticSegmentation
from modeling.training import model_from_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

NUM_CLASSES = 5  # stored as 1..5 with 0 = background (reduce_labels) and a few 255 pixels
HEIGHT, WIDTH = 64, 96
CLASS_COLORS = np.array([[0, 0, 0], [200, 40, 40], [40, 200, 40], [40, 40, 200], [200, 200, 40], [40, 200, 200]])


def make_rows(count: int, seed: int) -> dict:
    """Images whose colour follows the class (plus noise), labels of vertical bands of the 6 stored values."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for _ in range(count):
        edges = np.sort(rng.choice(np.arange(8, WIDTH - 8), 5, replace=False))
        bands = np.searchsorted(edges, np.arange(WIDTH), side="right")[None].repeat(HEIGHT, 0)
        stored = ((bands + rng.integers(0, 6)) % 6).astype(np.uint8)
        stored[:3, :5] = IGNORE_INDEX
        noise = rng.integers(-30, 30, (HEIGHT, WIDTH, 3))
        image = np.clip(CLASS_COLORS[stored % 6] + noise, 0, 255).astype(np.uint8)
        images.append(Image.fromarray(image))
        labels.append(Image.fromarray(stored))
    return {"image": images, "label": labels}


def write_split(rows: dict, path: Path) -> datasets.Dataset:
    ds = datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image()).cast_column("label", datasets.Image())
    ds.to_parquet(str(path))
    return ds


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path_factory, monkeypatch):
    # load_dataset converts parquet files to Arrow in the datasets cache: keep it out of the user's
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "hf_cache"))


@pytest.fixture(scope="module")
def parquet_dir(tmp_path_factory) -> Path:
    """8 train + 3 validation images of 64x96 as parquet (PNG bytes in datasets.Image columns), id2label.json."""
    folder = tmp_path_factory.mktemp("hf") / "five_classes"
    folder.mkdir()
    write_split(make_rows(8, 0), folder / "train.parquet")
    write_split(make_rows(3, 1), folder / "validation.parquet")
    names = ["red", "green", "blue", "yellow", "cyan"]
    (folder / "id2label.json").write_text(json.dumps({str(i): name for i, name in enumerate(names)}))
    return folder


def spec_of(name, **options) -> HFDatasetSpec:
    return HFDatasetSpec(str(name), **options)


# ------------------------------------------------------------------------------------------------------- units
def test_parquet_folder_splits_columns_and_classes(parquet_dir):
    splits = load_splits(spec_of(parquet_dir))
    assert {len(splits["train"]), len(splits["validation"])} == {8, 3}
    assert splits["train"].column_names == ["image", "label", "city", "stem"]
    assert read_id2label(spec_of(parquet_dir)) == {0: "red", 1: "green", 2: "blue", 3: "yellow", 4: "cyan"}
    one_file = load_splits(spec_of(parquet_dir / "train.parquet", seed=3))  # a file: train, validation split off
    assert (len(one_file["train"]), len(one_file["validation"])) == (6, 2)


def test_seeded_validation_split_of_a_save_to_disk_folder(tmp_path):
    rows = make_rows(10, 2)
    datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image()).cast_column(
        "label", datasets.Image()).rename_columns({"image": "pixel_values", "label": "annotation"}).save_to_disk(
        str(tmp_path / "disk"))
    first = load_splits(spec_of(tmp_path / "disk", train_val_split=0.3, seed=1))
    again = load_splits(spec_of(tmp_path / "disk", train_val_split=0.3, seed=1))
    other = load_splits(spec_of(tmp_path / "disk", train_val_split=0.3, seed=2))
    assert (len(first["train"]), len(first["validation"])) == (7, 3)  # the example's column names were found
    assert first["validation"]["label"] == again["validation"]["label"] != other["validation"]["label"]
    with pytest.raises(ValueError, match="--train_val_split: the dataset has no validation split"):
        load_splits(spec_of(tmp_path / "disk", train_val_split=1.5))
    with pytest.raises(ValueError, match="--image_column photo: the train split has no such column"):
        load_splits(spec_of(tmp_path / "disk", image_column="photo"))
    with pytest.raises(ValueError, match="cannot load it .*expected a datasets hub id"):
        load_splits(spec_of(tmp_path / "missing"))
    with pytest.raises(ValueError, match="no id2label.json .*expected --id2label FILE.json"):
        read_id2label(spec_of(tmp_path / "disk"))


def test_id2label_file_checks(tmp_path):
    path = tmp_path / "classes.json"
    path.write_text('["sky", "sea"]')
    assert parse_id2label(path) == {0: "sky", 1: "sea"}
    path.write_text('{"0": "sky", "2": "sea"}')
    with pytest.raises(ValueError, match="expected the class ids 0..N-1"):
        parse_id2label(path)
    path.write_text("{")
    with pytest.raises(ValueError, match="unreadable"):
        parse_id2label(path)


def test_classes_beyond_cityscapes_get_their_own_colours():
    colors = colorize(np.arange(256, dtype=np.uint8)[None])[0]
    np.testing.assert_array_equal(colors[:19], PALETTE)
    assert len({tuple(c) for c in colors[:IGNORE_INDEX]}) > 250 and tuple(colors[IGNORE_INDEX]) == (0, 0, 0)


def test_reduce_labels_and_the_class_count_check_every_label(parquet_dir):
    source = load_splits(spec_of(parquet_dir))["train"]
    stored = np.array(Image.open(io.BytesIO(source[0]["label"]["bytes"])))
    reduced = data.get_val_data(source, label_space=LabelSpace(NUM_CLASSES, True))[0][0]["label"].numpy()
    expected = np.where(stored == 0, IGNORE_INDEX, np.where(stored == IGNORE_INDEX, IGNORE_INDEX, stored - 1))
    np.testing.assert_array_equal(reduced, expected)
    with pytest.raises(ValueError, match=r"row 0 .*label values \[5\] outside \{0..4, 255\}"):
        data.get_val_data(source, label_space=LabelSpace(NUM_CLASSES))[0][0]  # 5 is class 4 only once reduced


def test_fast_cache_from_a_dataset_is_keyed_by_its_fingerprint_and_label_space(parquet_dir, tmp_path):
    source = load_splits(spec_of(parquet_dir))["train"]
    space = LabelSpace(NUM_CLASSES, True)
    assert ensure_cache(source, tmp_path, "train", space=space, progress=False)[1]  # built
    assert not ensure_cache(load_splits(spec_of(parquet_dir))["train"], tmp_path, "train", space=space,
                            progress=False)[1]  # the same dataset loaded again: current
    assert ensure_cache(source.select(range(7)), tmp_path, "train", space=space, progress=False)[1]  # changed
    assert ensure_cache(source.select(range(7)), tmp_path, "train", space=LabelSpace(6), progress=False)[1]
    train_set, on_device = data.get_train_data(source, "fast", (32, 48), img_scale=(WIDTH, HEIGHT), label_space=space,
                                               cache_dir=tmp_path)
    decoded = data.get_val_data(source, label_space=space)[0]  # the PNGs decoded now, labels reduced
    assert all(torch.equal(train_set[i]["label"], decoded[i]["label"]) for i in (0, 5))
    assert torch.equal(train_set[5]["image"].permute(2, 0, 1), decoded[5]["image"])
    pixel_values, labels = on_device({k: torch.stack([train_set[i][k] for i in range(2)]) for k in ("image", "label")},
                                     torch.Generator().manual_seed(0))
    assert pixel_values.shape == (2, 3, 32, 48) and set(labels.unique().tolist()) <= {*range(5), IGNORE_INDEX}


def test_eval_settings_come_from_the_checkpoint_unless_given(parquet_dir):
    saved = spec_of(parquet_dir, reduce_labels=True, train_val_split=0.2, seed=7).record()
    blank = Namespace(dataset_name=None, image_column=None, label_column=None, id2label=None, reduce_labels=None,
                      train_val_split=None)
    assert hf_dataset_spec(blank, saved) == spec_of(parquet_dir, reduce_labels=True, train_val_split=0.2, seed=7)
    assert hf_dataset_spec(Namespace(**{**vars(blank), "train_val_split": 0.5}), saved).train_val_split == 0.5
    assert hf_dataset_spec(blank, {"dataset": "synthetic", "data_root": "x"}) is None
    other = hf_dataset_spec(Namespace(**{**vars(blank), "dataset_name": "user/other"}), saved)
    assert other == spec_of("user/other")  # another dataset: nothing of the saved settings
    assert CITYSCAPES == LabelSpace(19, False)


def test_init_from_a_19_class_model_reinitialises_only_the_classifier(tmp_path):
    torch.manual_seed(0)
    source = HRNetFCNForSemanticSegmentation(HRNetFCNConfig())
    with torch.no_grad():
        source.decode_head.conv_seg.bias.fill_(1.0)
    source.save_pretrained(tmp_path / "cityscapes")
    id2label = {i: f"class {i}" for i in range(NUM_CLASSES)}
    model, message = model_from_checkpoint(tmp_path / "cityscapes", id2label)
    assert message.endswith("19 classes there, 5 here: the classifier (decode_head.conv_seg) is re-initialised, "
                            "every other weight loaded")
    assert model.config.id2label == id2label and model.decode_head.conv_seg.weight.shape[0] == NUM_CLASSES
    assert torch.equal(model.decode_head.conv_seg.bias, torch.zeros(NUM_CLASSES))  # _init_weights' zeros
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in source.state_dict().items() if "conv_seg" not in k)
    same, message = model_from_checkpoint(tmp_path / "cityscapes")
    assert "every weight loaded (19 classes)" in message
    assert torch.equal(same.decode_head.conv_seg.bias, torch.ones(19))


# --------------------------------------------------------------------------------------------------- end to end
def reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def run_script(load_script, name: str, *argv):
    script = load_script(name)
    reset_accelerate()
    try:
        return script.main(script.get_args_parser().parse_args([str(a) for a in argv]))
    finally:
        reset_accelerate()


TINY = ["--pretrained_backbone", "none", "--num_workers", "0", "--batch_size", "2", "--lr", "0.05"]


def test_train_eval_infer_on_a_parquet_dataset(parquet_dir, tmp_path, load_script, capsys):
    out = tmp_path / "run"
    results = run_script(load_script, "train", "--dataset_name", parquet_dir, "--reduce_labels", "--output_dir", out,
                         "--max_iters", 4, "--eval_interval", 4, "--pipeline", "fast", *TINY)
    final = results["final_metrics"]
    assert len(final["per_category_iou"]) == NUM_CLASSES and 0 <= final["mean_iou"] <= 1
    config = json.loads((out / "final" / "config.json").read_text())
    assert config["id2label"] == {"0": "red", "1": "green", "2": "blue", "3": "yellow", "4": "cyan"}
    assert config["training_data"]["dataset_name"] == str(parquet_dir) and (out / "fastpath_cache").is_dir()
    card = (out / "final" / "README.md").read_text()  # the model card names this dataset, not Cityscapes
    assert f"Hugging Face dataset `{parquet_dir}`" in card and "split: validation" in card
    assert "Cityscapes" not in card.split("## Recipe")[0].split("---", 2)[2] and "- cityscapes" not in card

    # eval.py: the dataset and its settings from the checkpoint, then named explicitly
    saved = run_script(load_script, "eval", "--checkpoint", out / "final", "--cpu", "--num_workers", 0,
                       "--output_json", tmp_path / "eval.json")
    assert saved["split"] == "validation" and saved["num_images"] == 3
    assert saved["class_names"] == ["red", "green", "blue", "yellow", "cyan"] and "cityscapes" not in saved
    assert json.loads((tmp_path / "eval.json").read_text())["mean_iou"] == pytest.approx(final["mean_iou"])
    named = run_script(load_script, "eval", "--checkpoint", out / "final", "--dataset_name", parquet_dir,
                       "--split", "train", "--reduce_labels", "--cpu", "--num_workers", 0)
    assert named["num_images"] == 8 and len(named["per_category_iou"]) == NUM_CLASSES

    # fine-tuning that model on the same classes, and infer.py on a validation image
    tuned = run_script(load_script, "train", "--dataset_name", parquet_dir, "--reduce_labels", "--init_from",
                       out / "final", "--output_dir", tmp_path / "tuned", "--max_iters", 2, "--eval_interval", 2,
                       "--pipeline", "reference", *TINY)
    assert len(tuned["final_metrics"]["per_category_iou"]) == NUM_CLASSES
    assert "every weight loaded (5 classes)" in capsys.readouterr().out
    photo = tmp_path / "photo.png"
    make_rows(1, 5)["image"][0].save(photo)
    run_script(load_script, "infer", photo, "--checkpoint", tmp_path / "tuned" / "final", "--out_dir",
               tmp_path / "pictures", "--cpu")
    assert np.array(Image.open(tmp_path / "pictures" / "photo_trainIds.png")).max() < NUM_CLASSES


def test_bad_dataset_arguments_stop_with_one_line(parquet_dir, tmp_path, load_script):
    with pytest.raises(SystemExit, match=r"error: --dataset_name: row 0 label: label values \[5\] outside"):
        run_script(load_script, "train", "--dataset_name", parquet_dir, "--output_dir", tmp_path / "a", *TINY)
    with pytest.raises(SystemExit, match="error: --dataset_name replaces --data_root"):
        run_script(load_script, "train", "--dataset_name", parquet_dir, "--dataset", "synthetic", *TINY)
    with pytest.raises(SystemExit, match="error: --init_from .*: no config.json"):
        run_script(load_script, "train", "--dataset_name", parquet_dir, "--init_from", tmp_path, *TINY)
    with pytest.raises(SystemExit, match="error: --predictions_dir, --format_only and --confusion_matrix are for "):
        run_script(load_script, "eval", "--predictions_dir", tmp_path, "--dataset_name", parquet_dir)
    with pytest.raises(SystemExit, match="error: --dataset_name: --split test: no such split"):
        run_script(load_script, "eval", "--checkpoint", tmp_path, "--dataset_name", parquet_dir, "--split", "test",
                   "--cpu")
    with pytest.raises(SystemExit, match="error: --dataset_name: --crop_size 128 96 is larger"):
        run_script(load_script, "train", "--dataset_name", parquet_dir, "--reduce_labels", "--crop_size", 128, 96,
                   "--output_dir", tmp_path / "b", *TINY)
