"""Inference modes, the shared evaluation loop (1 and 2 processes), scripts/eval.py and scripts/infer.py."""

import json
import multiprocessing
import os
import shutil
import socket
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from PIL import Image
from torch import nn

from modeling.inference import evaluate_segmentation, predict, rescale_size, slide_windows

NUM_LABELS = 5


pytestmark = pytest.mark.usefixtures("one_thread")


class TinySegmenter(nn.Module):
    """Logits at 1/4 resolution like the real model (a 4x4 stride-4 conv), or at full resolution (pointwise)."""

    def __init__(self, pointwise: bool = False, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, NUM_LABELS, 1) if pointwise else nn.Conv2d(3, NUM_LABELS, 4, stride=4)
        self.bn = nn.BatchNorm2d(NUM_LABELS)  # eval mode must be used (and the mode restored afterwards)
        self.sizes = []

    def forward(self, pixel_values):
        self.sizes.append(tuple(pixel_values.shape[-2:]))
        return SimpleNamespace(logits=self.bn(self.conv(pixel_values)))


class TinyDataset(torch.utils.data.Dataset):
    """Items as data.get_val_data gives them; labels hold every class, ignored pixels and an all-ignored image."""

    def __init__(self, n=5, height=24, width=40, seed=0):
        rng = np.random.default_rng(seed)
        self.images = rng.integers(0, 256, (n, 3, height, width), dtype=np.uint8)
        self.labels = rng.integers(0, NUM_LABELS, (n, height, width)).astype(np.uint8)
        self.labels[rng.random((n, height, width)) < 0.2] = 255
        self.labels[1] = 255

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return {"image": torch.from_numpy(self.images[index]), "label": torch.from_numpy(self.labels[index]),
                "index": index}


def on_device(batch, generator=None):
    return (batch["image"].float() - 127.5) / 64, batch["label"].long()


def numpy_miou(preds, labels, num_labels):
    """Independent mIoU: one numpy confusion matrix over every valid pixel."""
    valid = labels != 255
    cm = np.zeros((num_labels, num_labels), np.int64)
    np.add.at(cm, (labels[valid].astype(np.int64), preds[valid]), 1)
    inter = np.diag(cm).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = inter / (cm.sum(0) + cm.sum(1) - inter)
    return iou, np.nanmean(iou), inter.sum() / cm.sum()


def reference_evaluation(model, dataset):
    """The model on each image alone, argmax of logits upsampled to the label size, then numpy_miou."""
    model.eval()
    preds, labels = [], []
    with torch.no_grad():
        for i in range(len(dataset)):
            item = dataset[i]
            pixel_values, label = on_device({k: v[None] for k, v in item.items() if k != "index"})
            logits = F.interpolate(model(pixel_values).logits, size=label.shape[-2:], mode="bilinear",
                                   align_corners=False)
            preds.append(logits.argmax(1)[0].numpy())
            labels.append(label[0].numpy())
    return numpy_miou(np.stack(preds), np.stack(labels), NUM_LABELS)


# --------------------------------------------------------------------------------------------- inference modes
def test_slide_windows_follow_mmseg_placement():
    assert slide_windows(11, 11, (4, 4), (3, 3)) == [(y1, y2, x1, x2) for y1, y2 in [(0, 4), (3, 7), (6, 10), (7, 11)]
                                                     for x1, x2 in [(0, 4), (3, 7), (6, 10), (7, 11)]]
    assert slide_windows(3, 5, (4, 8), (3, 6)) == [(0, 3, 0, 5)]  # smaller than a crop: one smaller crop
    cityscapes = slide_windows(1024, 2048)  # default crop 512x1024, stride 341x682: 3 x 3 crops
    assert sorted({w[0] for w in cityscapes}) == [0, 341, 512] and sorted({w[2] for w in cityscapes}) == [0, 682, 1024]
    assert all(w[1] - w[0] == 512 and w[3] - w[2] == 1024 for w in cityscapes) and len(cityscapes) == 9


def test_rescale_size_reference_rule():
    assert rescale_size(1024, 2048, 0.5) == (512, 1024)
    assert rescale_size(1024, 2048, 0.75) == (768, 1536)
    assert rescale_size(1024, 2048, 1.75) == (1792, 3584)
    assert rescale_size(1000, 1500, 1.0) == (1024, 1536)  # limited by the short edge: factor 1.024
    assert rescale_size(64, 128, 1.25, (64, 128)) == (80, 160)


def test_slide_equals_whole_for_a_pointwise_model():
    model = TinySegmenter(pointwise=True).eval()
    x = torch.randn(2, 3, 37, 53)
    whole = predict(model, x, "whole")
    slide = predict(model, x, "slide", crop_size=(16, 24), stride=(10, 15))
    assert slide.shape == whole.shape == (2, NUM_LABELS, 37, 53)
    torch.testing.assert_close(slide, whole, rtol=1e-5, atol=1e-5)


def test_slide_counts_overlaps():
    # A model answering 1 everywhere: any pixel covered k times sums k and is divided by k.
    class Ones(nn.Module):
        def forward(self, x):
            return SimpleNamespace(logits=x.new_ones(x.shape[0], 2, *x.shape[-2:]))

    out = predict(Ones(), torch.zeros(1, 3, 11, 11), "slide", crop_size=(4, 4), stride=(3, 3))
    torch.testing.assert_close(out, torch.ones_like(out))


def test_whole_upsamples_logits_to_output_size():
    model = TinySegmenter().eval()
    x = torch.randn(1, 3, 32, 48)
    logits = model(x).logits
    expected = F.interpolate(logits, size=(32, 48), mode="bilinear", align_corners=False)
    torch.testing.assert_close(predict(model, x, "whole"), expected)


def test_aug_sizes_and_average_of_flipped_softmax():
    model = TinySegmenter().eval()
    x = torch.randn(1, 3, 32, 64)
    ratios = (1.0, 1.5)
    model.sizes.clear()
    out = predict(model, x, "aug", ratios=ratios, base_size=(32, 64))
    assert model.sizes == [(32, 64), (32, 64), (48, 96), (48, 96)]  # each scale, then its flip

    expected = []
    for size in [(32, 64), (48, 96)]:
        scaled = x if size == (32, 64) else F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        for flip in (False, True):
            logits = model(scaled.flip(-1) if flip else scaled).logits
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
            logits = F.interpolate(logits, size=(32, 64), mode="bilinear", align_corners=False)
            probs = logits.softmax(1)
            expected.append(probs.flip(-1) if flip else probs)
    torch.testing.assert_close(out, torch.stack(expected).mean(0))
    torch.testing.assert_close(out.sum(1), torch.ones(1, 32, 64))
    no_flip = predict(model, x, "aug", ratios=(1.0,), flip=False, base_size=(32, 64))
    torch.testing.assert_close(no_flip, predict(model, x, "whole").softmax(1))


def test_unknown_mode_is_an_error():
    with pytest.raises(ValueError, match="mode"):
        predict(TinySegmenter(), torch.zeros(1, 3, 32, 32), "sliding")


# ------------------------------------------------------------------------------------------- evaluation loop
def test_evaluate_segmentation_matches_numpy_and_restores_mode():
    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(cpu=True)
    model, dataset = TinySegmenter(), TinyDataset()
    model.train()
    seen = []
    results = evaluate_segmentation(model, dataset, on_device, accelerator, batch_size=2, num_workers=0,
                                    num_labels=NUM_LABELS, ignore_index=255,
                                    on_predictions=lambda preds, labels, batch: seen.extend(batch["index"].tolist()))
    assert model.training and sorted(seen) == list(range(len(dataset)))
    iou, miou, acc = reference_evaluation(model, dataset)
    np.testing.assert_allclose(results["per_category_iou"], iou, rtol=1e-12)
    assert results["mean_iou"] == pytest.approx(miou, rel=1e-12)
    assert results["overall_accuracy"] == pytest.approx(acc, rel=1e-12)


def _two_process_worker(rank: int, port: int, out_dir: Path):
    """One of 2 processes, rendezvous through the environment as torchrun sets it up."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      RANK=str(rank), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == 2 and accelerator.process_index == rank
    seen = []
    results = evaluate_segmentation(TinySegmenter(), TinyDataset(), on_device, accelerator, batch_size=2,
                                    num_workers=0, num_labels=NUM_LABELS, ignore_index=255,
                                    on_predictions=lambda preds, labels, batch: seen.extend(batch["index"].tolist()))
    record = {k: np.asarray(v).tolist() for k, v in results.items()}
    record["seen"] = seen
    (out_dir / f"rank{rank}.json").write_text(json.dumps(record))
    accelerator.end_training()


@pytest.mark.slow
def test_two_processes_uneven_shards_give_identical_figures(tmp_path):
    # 5 images, batch 2, 2 processes: rank 0 takes 0, 2, 4 (batches of 2 and 1), rank 1 takes 1, 3.
    AcceleratorState._reset_state(reset_partial_state=True)
    single = evaluate_segmentation(TinySegmenter(), TinyDataset(), on_device, Accelerator(cpu=True), batch_size=2,
                                   num_workers=0, num_labels=NUM_LABELS, ignore_index=255)
    with socket.socket() as sock:  # a free port for the gloo rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # Forking this process after it ran OpenMP code can hang the children; a fork server is a fresh process, and
    # with this module preloaded it pays the (slow) imports once for both workers.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    workers = [context.Process(target=_two_process_worker, args=(rank, port, tmp_path)) for rank in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=300)
        if worker.is_alive():
            worker.kill()
    assert [worker.exitcode for worker in workers] == [0, 0]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["seen"] == [0, 2, 4] and ranks[1]["seen"] == [1, 3]  # no padding, nothing twice
    for record in ranks:
        for key, value in single.items():
            np.testing.assert_array_equal(np.asarray(record[key], dtype=np.float64), value, err_msg=key)


# ------------------------------------------------------------------------- scripts/eval.py, scripts/infer.py
# (Scripts and data are imported here, not at the top: the 2-process workers import this file; imports are slow.)
def reject_constant(constant):
    raise ValueError(f"{constant} in a JSON file: expected strict JSON (null)")


@pytest.fixture(scope="module")
def cityscapes(make_val_set, tmp_path_factory):
    """3 val + 1 test synthetic images of 64x128, labelTrainIds prepared, and a saved model with varied output."""
    return make_val_set(tmp_path_factory.mktemp("eval"), num_train=1, num_val=3, num_test=1, height=64, width=128,
                        seed=3)


def test_eval_checkpoint_matches_direct_evaluation_and_outputs(run_eval, cityscapes, tmp_path, capsys):
    from data import get_val_data
    from data.cityscapes import discover
    from modeling import HRNetFCNForSemanticSegmentation

    root, ckpt = cityscapes
    results = run_eval("--checkpoint", str(ckpt), "--data_root", str(root), "--output_json", str(tmp_path / "r.json"),
                       "--show_dir", str(tmp_path / "show"))
    assert "| **mean** |" in capsys.readouterr().out
    AcceleratorState._reset_state(reset_partial_state=True)
    dataset, on_device = get_val_data(root, "val")
    direct = evaluate_segmentation(HRNetFCNForSemanticSegmentation.from_pretrained(ckpt), dataset, on_device,
                                   Accelerator(cpu=True), num_workers=0)
    assert results["mean_iou"] == direct["mean_iou"] and results["num_images"] == 3
    np.testing.assert_array_equal(results["per_category_iou"], direct["per_category_iou"])
    assert 0 < direct["mean_iou"] < 1  # varied predictions: a meaningful comparison
    saved = json.loads((tmp_path / "r.json").read_text(), parse_constant=reject_constant)  # strict JSON: null for NaN
    assert saved["class_names"][0] == "road" and len(saved["per_category_iou"]) == 19
    assert saved["mean_iou"] == results["mean_iou"]
    show = tmp_path / "show"
    assert (show / "class_iou.png").is_file() and len(list(show.glob("*_overlay.png"))) == 3
    assert len(list(show.glob("*_pred.png"))) == 3 and len(list(show.glob("*_gt.png"))) == 3

    # A reference-style .pth ({"state_dict", "meta"}) of the same weights is converted on the fly.
    state_dict = HRNetFCNForSemanticSegmentation.from_pretrained(ckpt).state_dict()
    torch.save({"state_dict": state_dict, "meta": {"iter": 80000}}, tmp_path / "fcn_hr18.pth")
    from_pth = run_eval("--checkpoint", str(tmp_path / "fcn_hr18.pth"), "--data_root", str(root))
    np.testing.assert_array_equal(from_pth["per_category_iou"], results["per_category_iou"])

    # slide with one crop the size of the image, and aug with one unflipped ratio 1, are whole-image inference.
    for argv in [("--mode", "slide", "--crop_size", "64", "128", "--stride", "32", "64"),
                 ("--mode", "aug", "--ratios", "1.0", "--no_flip", "--base_size", "64", "128")]:
        other = run_eval("--checkpoint", str(ckpt), "--data_root", str(root), *argv)
        assert other["mode"] == argv[1]
        np.testing.assert_array_equal(other["per_category_iou"], results["per_category_iou"])

    # --format_only writes labelIds PNGs that --predictions_dir scores back to the same figures.
    run_eval("--checkpoint", str(ckpt), "--data_root", str(root), "--format_only", "--out_dir", str(tmp_path / "sub"))
    written = sorted(p.name for p in (tmp_path / "sub").iterdir())
    assert written == sorted(f"{stem}_leftImg8bit.png" for stem in discover(root, "val")["stem"])
    scored = run_eval("--predictions_dir", str(tmp_path / "sub"), "--data_root", str(root), "--pred_label_type",
                      "labelIds")
    assert scored["mean_iou"] == results["mean_iou"] and scored["overall_accuracy"] == results["overall_accuracy"]


def test_trained_model_evaluates_to_what_training_reported(run_eval, cityscapes, tmp_path, monkeypatch,
                                                           load_script, capsys):
    from accelerate.state import GradientState

    root, _ = cityscapes
    train_script = load_script("train")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")  # eval.py runs with --cpu: the same device, the same numbers
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    reported = train_script.main(train_script.get_args_parser().parse_args([
        "--data_root", str(root), "--output_dir", str(tmp_path / "run"), "--pretrained_backbone", "none",
        "--crop_size", "64", "128", "--batch_size", "1", "--num_workers", "0", "--pipeline", "reference",
        "--max_iters", "2", "--eval_interval", "2", "--checkpoint_interval", "2"]))
    GradientState._reset_state()
    capsys.readouterr()
    final = run_eval("--checkpoint", str(tmp_path / "run" / "final"))  # the data root saved beside the model
    assert f"--data_root {root.resolve()} (the cityscapes data" in capsys.readouterr().out
    assert final["mean_iou"] == reported["final_miou"]
    # the saved root moved away: an error naming the saved root and the option
    moved = shutil.copytree(tmp_path / "run" / "final", tmp_path / "moved")
    config = json.loads((moved / "config.json").read_text())
    config["training_data"]["data_root"] = str(tmp_path / "gone")
    (moved / "config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit, match=f"saved in {moved / 'config.json'}, {tmp_path / 'gone'}, no longer exists"):
        run_eval("--checkpoint", str(moved))
    np.testing.assert_array_equal(final["per_category_iou"], reported["final_metrics"]["per_category_iou"])
    best = run_eval("--checkpoint", str(tmp_path / "run" / "best"), "--data_root", str(root))
    assert best["mean_iou"] == reported["best_miou"]


def test_predictions_dir_agrees_with_official_cityscapes_evaluation(run_eval, cityscapes, tmp_path, monkeypatch):
    import cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling as official

    root, _ = cityscapes
    # labelIds predictions: the ground truth with a third of the pixels replaced by random ids 0..33 (ignored
    # ids included, which the official script counts as misses), one file per image in a nested folder.
    rng = np.random.default_rng(0)
    gt_files = sorted((root / "gtFine" / "val").glob("*/*_gtFine_labelIds.png"))
    for gt in gt_files:
        pred = np.array(Image.open(gt))
        noise = rng.random(pred.shape) < 0.33
        pred[noise] = rng.integers(0, 34, noise.sum())
        (tmp_path / "preds" / gt.parent.name).mkdir(parents=True, exist_ok=True)
        Image.fromarray(pred).save(tmp_path / "preds" / gt.parent.name / gt.name.replace("gtFine_labelIds", "x"))
    for name, value in dict(predictionPath=str(tmp_path / "preds"), predictionWalk=None, evalInstLevelScore=False,
                            JSONOutput=False, quiet=True).items():
        monkeypatch.setattr(official.args, name, value)
    predictions = [official.getPrediction(official.args, str(gt)) for gt in gt_files]
    expected = official.evaluateImgLists(predictions, [str(gt) for gt in gt_files], official.args)

    ours = run_eval("--predictions_dir", str(tmp_path / "preds"), "--data_root", str(root), "--pred_label_type",
                    "labelIds", "--show_dir", str(tmp_path / "show"))
    assert len(list((tmp_path / "show").glob("*_overlay.png"))) == 3
    official_iou = np.array([expected["classScores"][name] for name in ours["class_names"]])
    np.testing.assert_array_equal(np.isnan(official_iou), np.isnan(ours["per_category_iou"]))
    np.testing.assert_allclose(ours["per_category_iou"], official_iou, rtol=1e-12)
    assert ours["mean_iou"] == pytest.approx(expected["averageScoreClasses"], rel=1e-12)
    assert 0.3 < ours["mean_iou"] < 0.9


def test_eval_errors_are_one_line(run_eval, cityscapes, tmp_path, monkeypatch):
    import evaluate

    root, ckpt = cityscapes
    monkeypatch.setattr(evaluate.config, "HF_EVALUATE_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # evaluate.load("mean_iou") also looks for ./mean_iou/mean_iou.py
    (tmp_path / "preds").mkdir()
    cases = [
        (["--data_root", str(root)], "exactly one of --checkpoint and --predictions_dir"),
        (["--checkpoint", str(tmp_path / "nothing"), "--data_root", str(root)], "checkpoint not found"),
        (["--predictions_dir", str(tmp_path / "preds"), "--data_root", str(root)], "no prediction for"),
        (["--checkpoint", str(ckpt), "--data_root", str(tmp_path)], "--data_root"),
        (["--checkpoint", str(ckpt)], "--data_root is required \\(the checkpoint does not name the dataset"),
        (["--predictions_dir", str(tmp_path / "preds"), "--data_root", str(root), "--metric_backend", "evaluate"],
         "pass --metric_path"),
        (["--predictions_dir", str(tmp_path / "preds"), "--data_root", str(root), "--metric_backend", "evaluate",
          "--metric_path", str(tmp_path / "missing")], "could not load"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit, match=message):
            run_eval(*argv)


def test_infer_writes_masks_and_overlays(cityscapes, tmp_path, load_script):
    from data.labels import PALETTE
    from data.transforms import normalize
    from modeling.inference import load_model

    infer_script = load_script("infer")
    root, ckpt = cityscapes
    AcceleratorState._reset_state(reset_partial_state=True)
    images = root / "leftImg8bit" / "val"
    results = infer_script.main(infer_script.get_args_parser().parse_args(
        [str(images), "--checkpoint", str(ckpt), "--out_dir", str(tmp_path / "out"), "--cpu"]))
    assert results["num_images"] == 3
    first = sorted(images.rglob("*.png"))[0]
    out = tmp_path / "out" / first.parent.name  # the path below the input folder is kept
    assert len(results["files"]) == 9 and all(Path(f).is_file() for f in results["files"])
    pred = np.array(Image.open(out / f"{first.stem}_pred.png"))
    train_ids = np.array(Image.open(out / f"{first.stem}_trainIds.png"))
    assert pred.shape == (64, 128, 3) and train_ids.max() < 19
    np.testing.assert_array_equal(pred, PALETTE[train_ids])  # colorized with the Cityscapes palette
    model = load_model(ckpt).eval()
    pixel_values = normalize(torch.from_numpy(np.array(Image.open(first))).permute(2, 0, 1)[None])
    np.testing.assert_array_equal(train_ids, predict(model, pixel_values).argmax(1)[0].numpy())
    overlay = np.array(Image.open(out / f"{first.stem}_overlay.png"))
    photo = np.array(Image.open(first))
    np.testing.assert_allclose(overlay, (photo.astype(float) + pred) / 2, atol=1)


def test_infer_keeps_equal_names_apart_and_refuses_real_collisions(cityscapes, tmp_path, load_script):
    infer_script = load_script("infer")
    root, ckpt = cityscapes
    first = sorted((root / "leftImg8bit" / "val").rglob("*.png"))[0]
    photos = tmp_path / "photos"
    for folder in ("a", "b"):  # the same file name in two subfolders: two sets of outputs
        (photos / folder).mkdir(parents=True)
        (photos / folder / "x.png").write_bytes(first.read_bytes())

    def infer(*argv):
        AcceleratorState._reset_state(reset_partial_state=True)
        return infer_script.main(infer_script.get_args_parser().parse_args(
            [*argv, "--checkpoint", str(ckpt), "--out_dir", str(tmp_path / "out"), "--cpu"]))

    results = infer(str(photos))
    assert results["num_images"] == 2
    assert {Path(f).relative_to(tmp_path / "out").as_posix() for f in results["files"]} == {
        f"{d}/x_{kind}.png" for d in "ab" for kind in ("pred", "overlay", "trainIds")}
    (photos / "a" / "x.jpg").write_bytes(first.read_bytes())  # a/x.png and a/x.jpg: the same outputs
    with pytest.raises(SystemExit, match=r"photos/a/x.jpg and .*photos/a/x.png would both be written as a/x_\*"):
        infer(str(photos))
    with pytest.raises(SystemExit, match=r"would both be written as x_\*.png"):  # two files given by name
        infer(str(photos / "a" / "x.png"), str(photos / "b" / "x.png"))

