"""The official Cityscapes metrics (modeling.cityscapes_metrics) against cityscapesscripts on the same files, and
through scripts/eval.py (JSON, Markdown table, confusion-matrix heatmap)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data.labels import CLASS_NAMES, ID_TO_TRAIN_ID
from modeling import strict_json
from modeling.cityscapes_metrics import CATEGORIES, CityscapesMetrics
from modeling.metrics import MeanIoU

# labelIds a prediction may hold: all but caravan (29) and trailer (30), which a trainId prediction cannot express
# (see the module docstring); ignored ids (unlabeled, parking, ...) are included: they are misses for both.
PREDICTABLE_IDS = np.array([i for i in range(34) if i not in (29, 30)])


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cityscapes(make_val_set, tmp_path_factory):
    """5 synthetic val images of 96x192 with labelTrainIds prepared, and a saved random model."""
    return make_val_set(tmp_path_factory.mktemp("cs_metrics"), num_train=1, num_val=5, num_test=0, height=96,
                        width=192, seed=5)


def noisy_predictions(root: Path, out_dir: Path, seed: int = 0) -> list[Path]:
    """labelIds predictions: the ground truth with a quarter of the pixels set to random ids, and every other
    instance of each image relabelled as another class (person <-> rider, car -> truck, ...)."""
    rng = np.random.default_rng(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    for gt in sorted((root / "gtFine" / "val").glob("*/*_gtFine_labelIds.png")):
        pred = np.array(Image.open(gt))
        instances = np.array(Image.open(str(gt).replace("labelIds", "instanceIds"))).astype(np.int64)
        for k, instance in enumerate(np.unique(instances[instances > 1000])):
            if k % 2 == 0:
                pred[instances == instance] = {24: 25, 25: 24, 26: 27, 27: 28, 28: 26}.get(instance // 1000, 24)
        noise = rng.random(pred.shape) < 0.25
        pred[noise] = rng.choice(PREDICTABLE_IDS, noise.sum())
        Image.fromarray(pred).save(out_dir / gt.name.replace("gtFine_labelIds", "pred"))
    return sorted(out_dir.glob("*.png"))


def official_results(root: Path, predictions_dir: Path, monkeypatch) -> dict:
    import cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling as official

    gt_files = sorted(str(p) for p in (root / "gtFine" / "val").glob("*/*_gtFine_labelIds.png"))
    for name, value in dict(predictionPath=str(predictions_dir), predictionWalk=None, evalInstLevelScore=True,
                            JSONOutput=False, quiet=True).items():
        monkeypatch.setattr(official.args, name, value)
    # cityscapesscripts' instance path calls np.in1d, which numpy 2.4 removed: give it np.isin's flat equivalent
    monkeypatch.setattr(np, "in1d", lambda a, b, invert=False: np.isin(a, b, invert=invert).ravel(), raising=False)
    predictions = [official.getPrediction(official.args, gt) for gt in gt_files]
    return official.evaluateImgLists(predictions, gt_files, official.args)


def streamed(root: Path, prediction_files: list[Path], metric: CityscapesMetrics | None = None, images=None):
    """Our metric over the same files (trainIds), one image per update."""
    from data.cityscapes import instance_ids_path, read_instance_ids, read_label

    metric = metric or CityscapesMetrics()
    labels = sorted((root / "gtFine" / "val").glob("*/*_gtFine_labelTrainIds.png"))
    for i in images if images is not None else range(len(labels)):
        pred = torch.from_numpy(ID_TO_TRAIN_ID[np.array(Image.open(prediction_files[i]))])
        label = torch.from_numpy(read_label(labels[i]))
        metric.update(pred, label, torch.from_numpy(read_instance_ids(instance_ids_path(labels[i]))))
    return metric


def assert_scores_equal(ours: dict, official: dict, ours_key: str, official_key: str):
    for name, value in ours[ours_key].items():
        expected = official[official_key][name]
        assert np.isnan(value) == np.isnan(expected), (ours_key, name, value, expected)
        if not np.isnan(value):
            assert value == pytest.approx(expected, rel=1e-9, abs=1e-12), (ours_key, name)
    # the official dicts hold every label id (NaN for the ignored ones): the rest must all be NaN
    assert all(np.isnan(v) for k, v in official[official_key].items() if k not in ours[ours_key])


def test_equals_cityscapesscripts_on_the_same_files(cityscapes, tmp_path, monkeypatch):
    root, _ = cityscapes
    files = noisy_predictions(root, tmp_path / "preds")
    expected = official_results(root, tmp_path / "preds", monkeypatch)
    ours = streamed(root, files).compute()
    for key, official_key in (("class_iou", "classScores"), ("class_iiou", "classInstScores"),
                              ("category_iou", "categoryScores"), ("category_iiou", "categoryInstScores")):
        assert_scores_equal(ours, expected, key, official_key)
    for key, official_key in (("mean_class_iou", "averageScoreClasses"), ("mean_class_iiou", "averageScoreInstClasses"),
                              ("mean_category_iou", "averageScoreCategories"),
                              ("mean_category_iiou", "averageScoreInstCategories")):
        assert ours[key] == pytest.approx(expected[official_key], rel=1e-9), key
    # imperfect predictions, every figure present: the comparison means something
    assert 0.2 < ours["mean_class_iiou"] < ours["mean_class_iou"] < 0.95
    assert list(ours["category_iou"]) == list(CATEGORIES) and len(CATEGORIES) == 7
    assert list(ours["category_iiou"]) == ["human", "vehicle"] and len(ours["class_iiou"]) == 8
    assert not any(np.isnan(v) for key in ("class_iou", "class_iiou", "category_iiou") for v in ours[key].values())
    # the confusion matrix is the official one restricted to the 19 classes (labelId rows/columns -> trainIds)
    official_conf = np.array(expected["confMatrix"])
    ids = [expected["labels"][name] for name in CLASS_NAMES]
    np.testing.assert_array_equal(np.array(ours["confusion_matrix"]), official_conf[np.ix_(ids, ids)])
    assert ours["num_images"] == ours["num_images_with_instances"] == 5


def test_precision_recall_and_mean_iou_from_the_histogram(cityscapes, tmp_path):
    root, _ = cityscapes
    files = noisy_predictions(root, tmp_path / "preds", seed=1)
    metric = streamed(root, files)
    ours = metric.compute()
    conf = np.array(ours["confusion_matrix"])
    outside = np.array(ours["predicted_outside_classes"])
    tp = np.diag(conf)
    np.testing.assert_allclose(list(ours["precision"].values()), tp / conf.sum(0))
    np.testing.assert_allclose(list(ours["recall"].values()), tp / (conf.sum(1) + outside))
    # evaluate's mean_iou dict from the same histogram equals the MeanIoU stream on the same maps
    reference = MeanIoU(19, 255)
    for pred, label in zip(files, sorted((root / "gtFine" / "val").glob("*/*_labelTrainIds.png")), strict=True):
        reference.update(torch.from_numpy(ID_TO_TRAIN_ID[np.array(Image.open(pred))]),
                         torch.from_numpy(np.array(Image.open(label))))
    for key, value in reference.compute().items():
        np.testing.assert_array_equal(metric.mean_iou()[key], value, err_msg=key)


def test_summed_states_of_two_shards_equal_the_whole(cityscapes, tmp_path):
    """What the all-reduce does: the state vectors of two processes' shards, summed, give the whole split's dict."""
    root, _ = cityscapes
    files = noisy_predictions(root, tmp_path / "preds", seed=2)
    whole = streamed(root, files).compute()
    shards = [streamed(root, files, images=range(rank, 5, 2)) for rank in range(2)]
    merged = CityscapesMetrics().load_state(shards[0].state() + shards[1].state()).compute()
    assert_same_results(merged, whole)  # the weighted sums add in another order: equal to rounding
    with pytest.raises(AssertionError):
        assert_same_results(shards[0].compute(), whole)


def assert_same_results(ours: dict, expected: dict):
    assert ours.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, dict):
            assert ours[key].keys() == value.keys(), key
            np.testing.assert_allclose(list(ours[key].values()), list(value.values()), rtol=1e-12, err_msg=key)
        elif isinstance(value, float):
            np.testing.assert_allclose(ours[key], value, rtol=1e-12, err_msg=key)
        else:
            assert ours[key] == value, key


def test_batched_update_equals_one_image_at_a_time_and_needs_instances_for_iiou():
    rng = np.random.default_rng(0)
    preds = torch.from_numpy(rng.integers(0, 19, (3, 20, 30)))
    labels = torch.from_numpy(rng.integers(0, 19, (3, 20, 30)).astype(np.uint8))
    labels[:, :4] = 255
    instances = torch.from_numpy(rng.choice([7, 24001, 24002, 26001, 33005, 29001], (3, 20, 30)).astype(np.int32))
    batched, single = CityscapesMetrics(), CityscapesMetrics()
    batched.update(preds, labels, instances)
    for i in range(3):
        single.update(preds[i], labels[i], instances[i])
    assert_same_results(batched.compute(), single.compute())
    no_instances = CityscapesMetrics()
    no_instances.update(preds, labels)
    results = no_instances.compute()
    assert all(np.isnan(v) for v in results["class_iiou"].values()) and np.isnan(results["mean_category_iiou"])
    assert results["class_iou"] == batched.compute()["class_iou"]
    with pytest.raises(ValueError, match="same shape"):
        no_instances.update(preds, labels[:, :10])


def test_val_data_reads_16_bit_instance_ids_from_pngs_and_from_the_cache(tmp_path):
    from data import get_val_data
    from data.prepare import prepare_cityscapes
    from data.synthetic import generate_cityscapes

    root = generate_cityscapes(tmp_path / "cs", num_train=1, num_val=2, num_test=0, height=64, width=128, seed=1)
    prepare_cityscapes(root, progress=False)
    files = sorted((root / "gtFine" / "val").glob("*/*_gtFine_instanceIds.png"))
    expected = [np.array(Image.open(path)).astype(np.int32) for path in files]
    assert max(ids.max() for ids in expected) > 24000  # instances (labelId * 1000 + n) need the 16 bits
    plain, _ = get_val_data(root, "val")
    assert "instance_ids" not in plain[0]
    for build_cache in (False, True):  # decoded PNGs, then the fast-path cache: both carry the field
        if build_cache:
            prepare_cityscapes(root, build_cache=True, cache_splits=("val",), progress=False)
        dataset, _ = get_val_data(root, "val", instance_ids=True)
        assert type(dataset.dataset).__name__ == ("CacheDataset" if build_cache else "ImageDataset")
        for i, ids in enumerate(expected):
            item = dataset[i]
            assert item["instance_ids"].dtype == torch.int32 and item["label"].shape == item["instance_ids"].shape
            np.testing.assert_array_equal(item["instance_ids"].numpy(), ids)
    files[1].unlink()  # not every label has its instanceIds: no field (the iIoU figures are then NaN)
    assert "instance_ids" not in get_val_data(root, "val", instance_ids=True)[0][0]


# ------------------------------------------------------------------------------------------- through eval.py
def test_eval_reports_the_official_metrics_and_the_confusion_matrix(cityscapes, tmp_path, capsys, monkeypatch,
                                                                     run_eval):
    root, ckpt = cityscapes
    results = run_eval("--checkpoint", str(ckpt), "--data_root", str(root), "--output_json", str(tmp_path / "r.json"),
                       "--confusion_matrix", str(tmp_path / "cm.png"))
    out = capsys.readouterr().out
    assert "| **mean** |" in out and "| category | IoU (%) | iIoU (%) |" in out and "| vehicle |" in out
    saved = json.loads((tmp_path / "r.json").read_text())
    official = saved["cityscapes"]
    assert saved["mean_iou"] == results["mean_iou"] and official == json.loads(strict_json.dumps(results["cityscapes"]))
    conf = np.array(official["confusion_matrix"])
    assert conf.shape == (19, 19) and conf.sum() > 0 and official["num_images_with_instances"] == 5
    # the classes' IoU from the official formulas equal evaluate's per-class IoU (model predictions are trainIds)
    np.testing.assert_allclose(np.array(list(official["class_iou"].values()), dtype=float),
                               np.array(saved["per_category_iou"], dtype=float), equal_nan=True)  # null -> nan
    with Image.open(tmp_path / "cm.png") as image:
        assert image.size == (1000, 900) and image.mode == "RGBA"

    # the predictions written by --format_only, scored by cityscapesscripts: the same official figures
    run_eval("--checkpoint", str(ckpt), "--data_root", str(root), "--format_only", "--out_dir", str(tmp_path / "sub"))
    expected = official_results(root, tmp_path / "sub", monkeypatch)
    for key, official_key in (("class_iou", "classScores"), ("class_iiou", "classInstScores"),
                              ("category_iou", "categoryScores"), ("category_iiou", "categoryInstScores")):
        assert_scores_equal(official, expected, key, official_key)

    # --predictions_dir reads the instanceIds too; --show_dir writes the heatmap beside class_iou.png
    scored = run_eval("--predictions_dir", str(tmp_path / "sub"), "--data_root", str(root), "--pred_label_type",
                      "labelIds", "--show_dir", str(tmp_path / "show"))
    assert json.loads(strict_json.dumps(scored["cityscapes"])) == official
    assert (tmp_path / "show" / "confusion_matrix.png").is_file()
