"""MeanIoU against an independent per-image numpy computation of evaluate's `mean_iou` semantics."""

import warnings

import numpy as np
import pytest
import torch

from modeling.metrics import MeanIoU

KEYS = ["mean_iou", "mean_accuracy", "overall_accuracy", "per_category_iou", "per_category_accuracy"]


def reference_mean_iou(preds, labels, num_labels, ignore_index, nan_to_num=None, label_map=None,
                       reduce_labels=False):
    """evaluate's recipe, image by image: remap labels, mask, three np.histogram calls, float64 sums."""
    totals = np.zeros((3, num_labels), dtype=np.float64)  # intersect, pred, label
    for pred, label in zip(preds, labels, strict=True):
        pred, label = np.array(pred), np.array(label)
        if label_map is not None:
            remapped = label.copy()
            for old, new in label_map.items():
                remapped[label == old] = new
            label = remapped
        if reduce_labels:
            label[label == 0] = 255
            label = label - 1
            label[label == 254] = 255
        keep = label != ignore_index
        pred, label = pred[keep], label[keep]
        bins = dict(bins=num_labels, range=(0, num_labels - 1))
        totals[0] += np.histogram(pred[pred == label], **bins)[0]
        totals[1] += np.histogram(pred, **bins)[0]
        totals[2] += np.histogram(label, **bins)[0]
    inter, area_pred, area_label = totals
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        iou = inter / (area_pred + area_label - inter)
        acc = inter / area_label
        out = {"mean_iou": np.nanmean(iou), "mean_accuracy": np.nanmean(acc),
               "overall_accuracy": inter.sum() / area_label.sum(), "per_category_iou": iou,
               "per_category_accuracy": acc}
    if nan_to_num is not None:
        out = {k: np.nan_to_num(v, nan=nan_to_num) for k, v in out.items()}
    return out


def assert_same(ours: dict, ref: dict):
    assert list(ours) == KEYS
    for key in KEYS:
        a, b = ours[key], ref[key]
        assert type(a) is type(b), key
        assert np.asarray(a).dtype == np.float64 and np.shape(a) == np.shape(b), key
        np.testing.assert_array_equal(a, b, err_msg=key)  # bit-identical, NaN in the same places


def streaming(preds, labels, batch=2, **kwargs):
    metric = MeanIoU(**kwargs)
    for i in range(0, len(preds), batch):
        metric.update(torch.as_tensor(np.stack(preds[i:i + batch])), torch.as_tensor(np.stack(labels[i:i + batch])))
    return metric


def random_maps(rng, n=5, shape=(16, 24), num_labels=19, label_high=None, pred_low=0, pred_high=None,
                label_dtype=np.uint8, ignore_frac=0.2):
    label_high = num_labels if label_high is None else label_high
    preds = [rng.integers(pred_low, pred_high or num_labels, shape).astype(np.int64) for _ in range(n)]
    labels = []
    for _ in range(n):
        label = rng.integers(0, label_high, shape)
        label[rng.random(shape) < ignore_frac] = 255
        labels.append(label.astype(label_dtype))
    return preds, labels


def test_docstring_example_of_evaluate():
    # The worked example from evaluate's mean_iou documentation, with its published output.
    preds = [np.array([[1, 2], [3, 4], [5, 255]]), np.array([[2, 7], [9, 2], [3, 6]]),
             np.array([[2, 2, 3], [8, 2, 4], [3, 255, 2]])]
    labels = [np.array([[0, 3], [5, 4], [6, 255]]), np.array([[1, 7], [9, 2], [3, 6]]),
              np.array([[1, 2, 2], [8, 2, 1], [3, 255, 1]])]
    metric = MeanIoU(num_labels=10, ignore_index=255)
    for pred, label in zip(preds, labels, strict=True):
        metric.update(torch.as_tensor(pred), torch.as_tensor(label))
    out = metric.compute()
    assert out["mean_iou"] == pytest.approx(0.47750000000000004, abs=0)
    assert out["mean_accuracy"] == pytest.approx(0.5916666666666666, abs=1e-15)
    assert out["overall_accuracy"] == pytest.approx(0.5263157894736842, abs=1e-15)
    np.testing.assert_allclose(out["per_category_iou"], [0, 0, 0.375, 0.4, 0.5, 0, 0.5, 1, 1, 1])
    assert_same(out, reference_mean_iou(preds, labels, 10, 255))


@pytest.mark.parametrize("label_dtype, pred_dtype", [(np.uint8, np.int64), (np.int64, np.uint8), (np.int32, np.int16)])
def test_random_matches_reference(label_dtype, pred_dtype):
    rng = np.random.default_rng(0)
    preds, labels = random_maps(rng, label_dtype=label_dtype, label_high=22, pred_high=21)
    preds = [pred.astype(pred_dtype) for pred in preds]
    preds[0][0, :3] = [255, 0, 18]  # 255 is no class: out of every histogram
    assert_same(streaming(preds, labels).compute(), reference_mean_iou(preds, labels, 19, 255))


def test_out_of_range_values_and_absent_classes():
    # Labels 19..30 are neither classes nor ignored: their pixels count in the prediction histogram only;
    # predictions -3..-1 and >= 19 fall out of every histogram; classes 15..18 never occur (NaN IoU/acc).
    rng = np.random.default_rng(3)
    preds, labels = random_maps(rng, label_high=31, pred_low=-3, pred_high=15, label_dtype=np.int64)
    for label in labels:
        label[(label >= 15) & (label < 19)] = 20
    preds[0][0, :5] = [19, 20, 255, 1000, -7]
    labels[1][0, :3] = [-5, 1000, 254]
    ours = streaming(preds, labels, batch=3).compute()
    ref = reference_mean_iou(preds, labels, 19, 255)
    assert np.isnan(ours["per_category_iou"][15:]).all() and np.isnan(ours["per_category_accuracy"][15:]).all()
    assert_same(ours, ref)


def test_class_only_predicted_has_zero_iou_and_nan_accuracy():
    label = np.zeros((4, 4), np.uint8)
    pred = np.zeros((4, 4), np.int64)
    pred[0] = 2
    out = streaming([pred], [label], num_labels=3).compute()
    assert out["per_category_iou"][2] == 0 and np.isnan(out["per_category_accuracy"][2])
    assert np.isnan(out["per_category_iou"][1])
    assert_same(out, reference_mean_iou([pred], [label], 3, 255))


def test_all_ignored_images():
    rng = np.random.default_rng(4)
    preds, labels = random_maps(rng, n=3)
    labels[1][:] = 255  # one image contributes nothing
    assert_same(streaming(preds, labels).compute(), reference_mean_iou(preds, labels, 19, 255))

    everything_ignored = [np.full((16, 24), 255, np.uint8)] * 2
    out = streaming(preds[:2], everything_ignored).compute()
    assert np.isnan(out["mean_iou"]) and np.isnan(out["overall_accuracy"])
    assert_same(out, reference_mean_iou(preds[:2], everything_ignored, 19, 255))
    out = streaming(preds[:2], everything_ignored, batch=1).compute(nan_to_num=0)
    assert_same(out, reference_mean_iou(preds[:2], everything_ignored, 19, 255, nan_to_num=0))
    assert out["mean_iou"] == 0


@pytest.mark.parametrize("nan_to_num", [0, -1, 0.5])
def test_nan_to_num(nan_to_num):
    rng = np.random.default_rng(5)
    preds, labels = random_maps(rng, label_high=10, pred_high=12)
    out = streaming(preds, labels).compute(nan_to_num=nan_to_num)
    assert not np.isnan(out["per_category_iou"]).any()
    assert_same(out, reference_mean_iou(preds, labels, 19, 255, nan_to_num=nan_to_num))


@pytest.mark.parametrize("label_dtype", [np.uint8, np.int64])
def test_reduce_labels(label_dtype):
    # ADE-style: 0 is background -> ignored, 1..150 -> 0..149, 255 stays ignored; 151 -> 150 is out of range.
    rng = np.random.default_rng(6)
    preds, labels = random_maps(rng, num_labels=150, label_high=152, label_dtype=label_dtype)
    for label in labels:
        label[0, :4] = [0, 254, 255, 1]
    kwargs = dict(num_labels=150, ignore_index=255, reduce_labels=True)
    assert_same(streaming(preds, labels, **kwargs).compute(), reference_mean_iou(preds, labels, **kwargs))


def test_reduce_labels_with_other_ignore_index():
    rng = np.random.default_rng(7)
    preds, labels = random_maps(rng, num_labels=5, label_high=8, label_dtype=np.int64)
    labels[0][0, :4] = [0, 3, 4, 256]  # 3 -> 2 = ignore, 256 -> 255: not ignored here, out of range
    kwargs = dict(num_labels=5, ignore_index=2, reduce_labels=True)
    assert_same(streaming(preds, labels, **kwargs).compute(), reference_mean_iou(preds, labels, **kwargs))


def test_label_map_then_reduce_labels():
    # Mappings read the original labels (1 -> 2 and 2 -> 1 swap), then reduce_labels shifts.
    rng = np.random.default_rng(8)
    preds, labels = random_maps(rng, num_labels=6, label_high=9)
    label_map = {1: 2, 2: 1, 7: 255, 8: 0, 255: 3}
    for kwargs in [dict(label_map=label_map), dict(label_map=label_map, reduce_labels=True)]:
        ours = streaming(preds, labels, num_labels=6, ignore_index=255, **kwargs).compute()
        assert_same(ours, reference_mean_iou(preds, labels, 6, 255, **kwargs))


def test_ignore_index_none_counts_every_pixel():
    rng = np.random.default_rng(9)
    preds, labels = random_maps(rng, num_labels=4, label_high=6)
    ours = streaming(preds, labels, num_labels=4, ignore_index=None).compute()
    assert_same(ours, reference_mean_iou(preds, labels, 4, None))


def test_index_add_path_matches_bincount_path(monkeypatch):
    # The sync-free path used on accelerators (index_add_), run on the CPU tensors, gives the same histogram.
    rng = np.random.default_rng(10)
    preds, labels = random_maps(rng, label_high=25, pred_low=-2, pred_high=22)
    forced = MeanIoU()
    monkeypatch.setattr(forced, "_add_bincount", forced._add_index_add)
    for pred, label in zip(preds, labels, strict=True):
        forced.update(torch.as_tensor(pred), torch.as_tensor(label))
    np.testing.assert_array_equal(forced.joint_histogram(), streaming(preds, labels).joint_histogram())
    assert_same(forced.compute(), reference_mean_iou(preds, labels, 19, 255))


def test_shapes_and_dtypes_are_checked():
    metric = MeanIoU()
    with pytest.raises(ValueError, match="same shape"):
        metric.update(torch.zeros(2, 4, 4, dtype=torch.long), torch.zeros(2, 4, 5, dtype=torch.uint8))
    with pytest.raises(ValueError, match="integer"):
        metric.update(torch.zeros(2, 4, 4), torch.zeros(2, 4, 4, dtype=torch.uint8))


def test_compute_without_updates_and_reset():
    metric = MeanIoU(num_labels=3)
    assert np.isnan(metric.compute()["mean_iou"])
    metric.update(torch.tensor([[0, 1]]), torch.tensor([[0, 1]]))
    assert metric.compute()["mean_iou"] == 1.0
    assert metric.compute()["mean_iou"] == 1.0  # compute does not consume the state
    metric.reset()
    assert np.isnan(metric.compute()["mean_iou"])


def test_benchmark_metric_mode_runs_and_agrees(load_script):
    benchmark = load_script("benchmark")
    threads = torch.get_num_threads()
    try:
        report = benchmark.main(benchmark.get_args_parser().parse_args(
            ["metric", "--num_images", "2", "--height", "32", "--width", "64", "--repeats", "1"]))
    finally:
        torch.set_num_threads(threads)  # the benchmark pins its own thread count
    assert report["identical_results"] and report["streaming_cpu_ms_per_image"] > 0
    assert {"speedup_cpu_vs_evaluate_histograms", "speedup_cpu_vs_evaluate_add_batch"} <= set(report)


def test_metrics_to_json_gives_plain_lists_and_floats():
    import json

    from modeling.metrics import MeanIoU, metrics_to_json

    metric = MeanIoU(num_labels=3)
    metric.update(torch.tensor([[0, 1, 2, 2]]), torch.tensor([[0, 1, 1, 255]]))
    metrics = metric.compute()
    plain = metrics_to_json(metrics)
    np.testing.assert_equal(json.loads(json.dumps(plain)), plain)  # class 2 has no label pixels: NaN survives
    assert type(plain["mean_iou"]) is float and plain["mean_iou"] == float(metrics["mean_iou"])
    assert type(plain["per_category_accuracy"]) is list
    np.testing.assert_equal(plain["per_category_accuracy"], metrics["per_category_accuracy"])
