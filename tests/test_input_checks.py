"""Bad inputs to prepare_cityscapes.py, infer.py and eval.py: one-line `error:` messages naming the file or the
argument, a non-zero exit, nothing written, no traceback (issue 15's data- and inference-side cases).

Everything runs on a synthetic Cityscapes of 64x128 images and a randomly initialized model.
"""

import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState
from PIL import Image, ImageFile

from data.image_checks import read_photo
from data.prepare import prepare_cityscapes
from data.synthetic import generate_cityscapes

REPO_ROOT = Path(__file__).resolve().parents[1]
STEM = "aachen_000000_000019"  # the first train image of the synthetic dataset
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def error_of(call) -> str:
    """The SystemExit message of call(): one line starting with 'error:'."""
    with pytest.raises(SystemExit) as info:
        call()
    message = str(info.value.code)
    assert message.startswith("error: ") and "\n" not in message and len(message) < 400, message
    return message


def bomb_png(path: Path, width: int = 100_000, height: int = 100_000) -> Path:
    """A tiny PNG whose IHDR declares width x height 8-bit gray pixels (no real pixel data behind it)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) +
                     chunk(b"IEND", b""))
    return path


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def raw_root(tmp_path_factory):
    return generate_cityscapes(tmp_path_factory.mktemp("raw") / "cs", num_train=2, num_val=2, num_test=0, height=64,
                               width=128, seed=0)


@pytest.fixture
def raw_copy(raw_root, tmp_path):
    copy = tmp_path / "cs"
    shutil.copytree(raw_root, copy)
    return copy


@pytest.fixture(scope="module")
def prepared(raw_root, tmp_path_factory):
    """A prepared copy and a saved random model whose maps are varied (tests must not modify them)."""
    from modeling import HRNetFCNConfig, HRNetFCNForSemanticSegmentation

    base = tmp_path_factory.mktemp("prepared")
    root = base / "cs"
    shutil.copytree(raw_root, root)
    prepare_cityscapes(root, progress=False)
    torch.manual_seed(0)
    model = HRNetFCNForSemanticSegmentation(HRNetFCNConfig())
    with torch.no_grad():
        model.decode_head.conv_seg.weight.normal_(0, 1.0)
    model.save_pretrained(base / "ckpt")
    return root, base / "ckpt"


# ------------------------------------------------------------------------------------- scripts/prepare_cityscapes.py
@pytest.fixture
def run_prepare(load_script):
    """run_prepare(root, *argv) -> scripts/prepare_cityscapes.py's results, in this process."""
    script = load_script("prepare_cityscapes")
    return lambda root, *argv: script.main(script.get_args_parser().parse_args(["--data_root", str(root), *argv]))


def polygons_json(root: Path) -> Path:
    return root / "gtFine" / "train" / "aachen" / f"{STEM}_gtFine_polygons.json"


def train_ids_of(root: Path) -> Path:
    return root / "gtFine" / "train" / "aachen" / f"{STEM}_gtFine_labelTrainIds.png"


def edit_json(path: Path, edit) -> None:
    annotation = json.loads(path.read_text())
    edit(annotation)
    path.write_text(json.dumps(annotation))  # NaN / Infinity are written as the JSON extensions Python reads back


def test_prepare_refuses_a_json_whose_size_is_not_its_images(raw_copy, run_prepare):
    path = polygons_json(raw_copy)
    edit_json(path, lambda a: a.update(imgWidth=1_000_000, imgHeight=1_000_000))
    message = error_of(lambda: run_prepare(raw_copy))
    assert f"{path}: cannot render polygons (it declares imgWidth x imgHeight 1000000x1000000, its leftImg8bit " \
           "image is 128x64)" in message
    assert not train_ids_of(raw_copy).exists() and not list(raw_copy.rglob("*.tmp"))
    # without its image, the size is bounded by the decompression-bomb limit
    (raw_copy / "leftImg8bit" / "train" / "aachen" / f"{STEM}_leftImg8bit.png").unlink()
    assert "1000000x1000000, beyond 89 M pixels" in error_of(lambda: run_prepare(raw_copy))
    edit_json(path, lambda a: a.update(imgWidth="128"))
    assert "imgWidth/imgHeight 128/1000000: expected positive integers" in error_of(lambda: run_prepare(raw_copy))


def test_prepare_cuts_a_non_utf8_json_to_one_line(raw_copy, run_prepare):
    path = polygons_json(raw_copy)
    path.write_bytes(b"\xff\xfe" + bytes(range(256)) * 16)  # 4 kB of binary
    message = error_of(lambda: run_prepare(raw_copy))
    assert message == (f"error: {path}: cannot render polygons (not UTF-8 text: byte 0xff at offset 0); expected a "
                       "Cityscapes gtFine_polygons.json")
    assert not train_ids_of(raw_copy).exists()


@pytest.mark.parametrize("point, shown", [([1e300, 5], "[1e+300, 5]"), ([float("nan"), 5], "[nan, 5]"),
                                          ([5, float("inf")], "[5, inf]"), ([-1281, 5], "[-1281, 5]"),
                                          (["a", 5], "['a', 5]"), ([5], "[5]")])
def test_prepare_refuses_absurd_polygon_points(raw_copy, point, shown, run_prepare):
    path = polygons_json(raw_copy)
    edit_json(path, lambda a: a["objects"][1]["polygon"].append(point))
    message = error_of(lambda: run_prepare(raw_copy))
    label = json.loads(path.read_text())["objects"][1]["label"]
    assert f"{path}: cannot render polygons (object 1 ({label}): point {shown} is not a finite [x, y] within 10x " \
           "the 128x64 image)" in message
    assert not train_ids_of(raw_copy).exists()


def test_prepare_names_an_unknown_label(raw_copy, capsys, run_prepare):
    path = polygons_json(raw_copy)
    edit_json(path, lambda a: a["objects"][0].update(label="spaceship"))
    assert f"{path}: cannot render polygons (object 0: unknown label 'spaceship')" in \
        error_of(lambda: run_prepare(raw_copy))
    assert "ERROR" not in capsys.readouterr().out  # cityscapesscripts' own print + sys.exit never ran


def test_prepare_says_a_directory_stands_where_a_label_goes(raw_copy, run_prepare):
    train_ids_of(raw_copy).mkdir()
    message = error_of(lambda: run_prepare(raw_copy))
    assert message == (f"error: {train_ids_of(raw_copy)}: a directory (or other non-file) where the labelTrainIds PNG "
                       "file should be; remove or rename it, then rerun prepare")


def test_prepare_refuses_a_labelids_bomb_and_a_size_mismatch(raw_copy, monkeypatch, run_prepare):
    polygons_json(raw_copy).unlink()  # the labelIds PNG becomes the source
    label_ids = polygons_json(raw_copy).with_name(f"{STEM}_gtFine_labelIds.png")
    bomb_png(label_ids)
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("decoded a decompression bomb"))
    message = error_of(lambda: run_prepare(raw_copy))
    assert f"{label_ids}: cannot read labelIds (the labelIds PNG declares 100000x100000 pixels (10000 M), beyond the " \
           "89 M-pixel limit (a decompression bomb?); refusing to decode it)" in message
    monkeypatch.undo()
    Image.new("L", (64, 32)).save(label_ids)
    assert f"{label_ids}: cannot read labelIds (size 64x32, its leftImg8bit image is 128x64)" in \
        error_of(lambda: run_prepare(raw_copy))
    assert not train_ids_of(raw_copy).exists()


def test_prepare_checks_the_values_of_every_label_it_writes(raw_copy, monkeypatch, run_prepare):
    import data.prepare

    monkeypatch.setattr(data.prepare, "train_id_image", lambda source: Image.new("L", (128, 64), 200))
    message = error_of(lambda: run_prepare(raw_copy))
    assert "_gtFine_labelTrainIds.png (from " in message and "label values [200] outside {0..18, 255}" in message
    assert not list(raw_copy.rglob("*_labelTrainIds.png"))


def test_prepare_cli_gives_one_line_and_no_traceback(raw_copy):
    edit_json(polygons_json(raw_copy), lambda a: a.update(imgHeight=1_000_000))
    run = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "prepare_cityscapes.py"), "--data_root",
                          str(raw_copy)], capture_output=True, text=True, env=ONE_THREAD)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith(f"error: {polygons_json(raw_copy)}: cannot render")


# ------------------------------------------------------------------------------------------------- scripts/infer.py
@pytest.fixture
def run_infer(load_script):
    """run_infer(ckpt, out_dir, *argv) -> scripts/infer.py's results on the CPU, in this process."""
    script = load_script("infer")

    def run(ckpt: Path, out_dir: Path, *argv) -> dict:
        AcceleratorState._reset_state(reset_partial_state=True)
        return script.main(script.get_args_parser().parse_args([*argv, "--checkpoint", str(ckpt), "--out_dir",
                                                                str(out_dir), "--cpu"]))

    return run


def test_infer_reads_16_bit_gray_and_other_modes_as_their_8_bit_rgb(prepared, tmp_path, run_infer):
    root, ckpt = prepared
    photo = Image.open(next((root / "leftImg8bit" / "val").rglob("*.png")))
    gray = np.array(photo.convert("L"))
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(gray).save(photos / "gray8.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(photos / "gray16.png")  # 16-bit: v8 * 257, PIL mode I;16
    assert Image.open(photos / "gray16.png").mode == "I;16"
    assert (np.array(Image.open(photos / "gray16.png").convert("RGB")) == 255).mean() > 0.9  # PIL's convert clips
    Image.fromarray(gray).convert("RGB").save(photos / "gray_rgb.png")
    Image.fromarray(gray).convert("LA").save(photos / "gray_la.png")
    photo.save(photos / "rgb.png")
    photo.convert("RGBA").save(photos / "rgba.png")
    photo.quantize(256).save(photos / "palette.png")
    np.testing.assert_array_equal(read_photo(photos / "gray16.png"), read_photo(photos / "gray_rgb.png"))
    results = run_infer(ckpt, tmp_path / "out", str(photos))
    assert results["num_images"] == 7

    def train_ids(name):
        return np.array(Image.open(tmp_path / "out" / f"{name}_trainIds.png"))

    assert len(np.unique(train_ids("gray8"))) > 1  # the maps are varied: equal maps mean equal inputs
    for name in ("gray16", "gray_rgb", "gray_la"):
        np.testing.assert_array_equal(train_ids(name), train_ids("gray8"), err_msg=name)
    np.testing.assert_array_equal(train_ids("rgba"), train_ids("rgb"))
    palette_rgb = np.array(Image.open(photos / "palette.png").convert("RGB"))
    np.testing.assert_array_equal(read_photo(photos / "palette.png"), palette_rgb)


def test_infer_refuses_a_float_image(prepared, tmp_path):
    root, ckpt = prepared
    path = tmp_path / "float.tif"
    Image.fromarray(np.zeros((8, 8), np.float32)).save(path)
    with pytest.raises(ValueError, match=r"float.tif: image mode F .* expected an 8/16-bit grayscale"):
        read_photo(path)


def test_infer_refuses_a_decompression_bomb_before_any_work(prepared, tmp_path, monkeypatch, run_infer):
    root, ckpt = prepared
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(next((root / "leftImg8bit" / "val").rglob("*.png")), photos / "a.png")
    bomb = bomb_png(photos / "b.png")
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("decoded an image"))
    message = error_of(lambda: run_infer(ckpt, tmp_path / "out", str(photos)))
    assert message == (f"error: {bomb}: the image declares 100000x100000 pixels (10000 M), beyond the 89 M-pixel "
                       "limit (a decompression bomb?); refusing to decode it")
    assert not (tmp_path / "out").exists()  # a.png was not written either: the headers are checked first


def test_infer_cli_bomb_one_line_no_traceback(prepared, tmp_path):
    root, ckpt = prepared
    bomb = bomb_png(tmp_path / "bomb.png", 70_000, 70_000)
    run = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "infer.py"), str(bomb), "--checkpoint",
                          str(ckpt), "--out_dir", str(tmp_path / "out"), "--cpu"], capture_output=True, text=True,
                         env=ONE_THREAD)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1] == (f"error: {bomb}: the image declares 70000x70000 pixels (4900 M), "
                                                   "beyond the 89 M-pixel limit (a decompression bomb?); refusing to "
                                                   "decode it")
    assert not (tmp_path / "out").exists()


def test_infer_refuses_fp16_on_the_cpu_and_a_stride_beyond_the_crop(prepared, tmp_path, run_infer):
    root, ckpt = prepared
    image = str(next((root / "leftImg8bit" / "val").rglob("*.png")))
    message = error_of(lambda: run_infer(ckpt, tmp_path / "out", image, "--mixed_precision", "fp16"))
    assert message.startswith("error: the Accelerate config asks for mixed_precision fp16, which runs on GPUs only")
    message = error_of(lambda: run_infer(ckpt, tmp_path / "out", image, "--mode", "slide", "--crop_size", "32", "64",
                                         "--stride", "40", "64"))
    assert message.startswith("error: --stride 40 64 is larger than --crop_size 32 64")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("script, argv, expected", [
    ("infer", ["--stride", "0", "0"], "argument --stride: expected a positive integer, got 0"),
    ("infer", ["--crop_size", "-4", "8"], "argument --crop_size: expected a positive integer, got -4"),
    ("eval", ["--batch_size", "0"], "argument --batch_size: expected a positive integer, got 0"),
    ("eval", ["--num_workers", "-1"], "argument --num_workers: expected an integer >= 0, got -1"),
    ("eval", ["--stride", "0", "0"], "argument --stride: expected a positive integer, got 0"),
    ("eval", ["--ratios", "0"], "argument --ratios: expected a finite positive number, got 0"),
    ("eval", ["--ratios", "nan"], "argument --ratios: expected a finite positive number, got nan"),
    ("eval", ["--base_size", "0", "0"], "argument --base_size: expected a positive integer, got 0"),
    ("eval", ["--crop_size", "0", "0"], "argument --crop_size: expected a positive integer, got 0"),
    ("eval", ["--batch_size", "two"], "argument --batch_size: expected a positive integer, got 'two'"),
])
def test_numeric_arguments_are_checked_by_the_parser(script, argv, expected, capsys, load_script):
    required = ["x.png", "--checkpoint", "c", "--out_dir", "o"] if script == "infer" else ["--data_root", "d"]
    with pytest.raises(SystemExit) as info:
        load_script(script).get_args_parser().parse_args([*required, *argv])
    assert info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(f"error: {expected}")



@pytest.mark.parametrize("script, argv, expected", [
    ("export_onnx", ["--checkpoint", "c", "--out", "m.onnx", "--seed", "-1"],
     "argument --seed: expected an integer in [0, 2**32), got -1"),
    ("export_onnx", ["--checkpoint", "c", "--out", "m.onnx", "--atol", "nan"], "argument --atol: expected a finite"),
    ("browse_augmentations", ["--crop_size", "0", "64"], "argument --crop_size: expected a positive integer, got 0"),
    ("benchmark", ["throughput", "--iters", "0"], "argument --iters: expected a positive integer, got 0"),
    ("benchmark", ["data", "--workers", "-1"], "argument --workers: expected an integer >= 0, got -1"),
    ("benchmark", ["model", "--height", "0"], "argument --height: expected a positive integer, got 0"),
    ("benchmark", ["metric", "--num_labels", "0"], "argument --num_labels: expected a positive integer, got 0"),
])
def test_tool_and_benchmark_arguments_are_checked_by_the_parser(script, argv, expected, capsys, load_script):
    with pytest.raises(SystemExit) as info:
        load_script(script).get_args_parser().parse_args(argv)
    assert info.value.code == 2
    assert f"error: {expected}" in capsys.readouterr().err.strip().splitlines()[-1]


# -------------------------------------------------------------------------------------------------- scripts/eval.py
@pytest.fixture
def eval_script(load_script):
    return load_script("eval")


def test_eval_checks_every_val_file_before_any_model_work(prepared, tmp_path, monkeypatch, run_eval, eval_script):
    root, ckpt = prepared
    copy = tmp_path / "cs"
    shutil.copytree(root, copy)
    last = sorted((copy / "gtFine" / "val").rglob("*_labelTrainIds.png"))[-1]
    last.write_bytes(last.read_bytes()[:-20])  # truncated
    monkeypatch.setattr(eval_script, "load_model", lambda *a: pytest.fail("model work before the checks"))
    message = error_of(lambda: run_eval("--checkpoint", str(ckpt), "--data_root", str(copy), "--output_json",
                                        str(tmp_path / "r.json")))
    assert message.startswith(f"error: {last}: truncated PNG")
    assert not (tmp_path / "r.json").exists()


def test_eval_refuses_fp16_on_the_cpu(prepared, run_eval):
    root, ckpt = prepared
    message = error_of(lambda: run_eval("--checkpoint", str(ckpt), "--data_root", str(root), "--mixed_precision",
                                        "fp16"))
    assert message.startswith("error: the Accelerate config asks for mixed_precision fp16, which runs on GPUs only")


def test_eval_refuses_a_decompression_bomb_prediction(prepared, tmp_path, monkeypatch, run_eval):
    root, _ = prepared
    preds = tmp_path / "preds"
    preds.mkdir()
    labels = sorted((root / "gtFine" / "val").rglob("*_labelTrainIds.png"))
    for label in labels:
        shutil.copy(label, preds / label.name.replace("_gtFine_labelTrainIds", "_pred"))
    assert run_eval("--predictions_dir", str(preds), "--data_root", str(root))["mean_iou"] == 1.0
    bomb = bomb_png(preds / labels[-1].name.replace("_gtFine_labelTrainIds", "_pred"))
    message = error_of(lambda: run_eval("--predictions_dir", str(preds), "--data_root", str(root), "--output_json",
                                        str(tmp_path / "r.json")))
    assert message == (f"error: {bomb}: the prediction PNG declares 100000x100000 pixels (10000 M), beyond the 89 "
                       "M-pixel limit (a decompression bomb?); refusing to decode it")
    assert not (tmp_path / "r.json").exists()
