"""Evaluate a model (or prediction PNGs) on a Cityscapes split: evaluate-compatible mIoU and a per-class table.

    accelerate launch scripts/eval.py --checkpoint out/run/final --data_root data/cityscapes    # whole image
    accelerate launch scripts/eval.py --checkpoint fcn_hr18.pth --data_root ... --mode aug     # reference .pth
    python scripts/eval.py --predictions_dir preds/ --data_root ... --pred_label_type labelIds  # no model
    accelerate launch scripts/eval.py --checkpoint ... --split test --format_only --out_dir submission/
    python scripts/eval.py --checkpoint ... --data_root ... --show_dir pictures/ --output_json results.json
    python scripts/eval.py --checkpoint ... --data_root ... --confusion_matrix confusion_matrix.png
    python scripts/eval.py --checkpoint out/ade/final --dataset_name DATASET --split validation  # any HF dataset

--mode whole (default): full-resolution inference; slide: 512x1024 crops every 341x682 pixels; aug: ratios
0.5..1.75 of 2048x1024 plus flips, softmax averaged (docs/recipe.md section 4). Mixed precision follows the launch
config (or --mixed_precision). Prediction PNGs (`<city>_<seq>_<frame>*.png`, anywhere under --predictions_dir,
trainIds or labelIds) are scored against the same labelTrainIds as a model. --metric_backend evaluate also runs
HF evaluate's own `mean_iou` script (from the hub, or --metric_path DIR holding mean_iou.py) on the same
predictions, in one process, storing every map as that script requires.
The official Cityscapes metrics (class/category IoU and iIoU as cityscapesscripts defines them, precision, recall,
the confusion matrix) come from the same pass (`results["cityscapes"]`); --confusion_matrix PNG draws the matrix.
A Hugging Face dataset (--dataset_name and its options, as scripts/train.py takes them; by default the one a
--checkpoint folder was trained on) is scored with the model's classes, without the Cityscapes-only outputs.
"""

import argparse
import fnmatch
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from accelerate import Accelerator
from PIL import Image
from tqdm.auto import tqdm

from data import get_val_data
from data.checks import check_split_files
from data.cityscapes import as_source, instance_ids_path, read_image, read_instance_ids, read_label
from data.hf_dataset import VALIDATION, add_hf_dataset_args, hf_dataset_spec, label_space, load_splits
from data.image_checks import open_image
from data.labels import CITYSCAPES, CLASS_NAMES, ID_TO_TRAIN_ID, IGNORE_INDEX, NUM_CLASSES, TRAIN_ID_TO_ID
from modeling import strict_json
from modeling.cityscapes_metrics import CityscapesMetrics
from modeling.cityscapes_metrics import markdown_table as official_table
from modeling.cli import HelpFormatter, non_negative_int, positive_int, refuse_fp16_on_cpu
from modeling.errors import first_line
from modeling.inference import add_inference_args, evaluate_segmentation, load_model, predict_options
from modeling.metrics import MeanIoU, metrics_to_json
from modeling.visualize import plot_class_iou, plot_confusion_matrix, save_prediction_pictures


# ------------------------------------------------------------------------------------------------------ helpers
def find_predictions(predictions_dir: Path, stems: list[str]) -> list[Path]:
    """The one `<stem>*.png` under predictions_dir for every stem (the official Cityscapes matching rule)."""
    if not predictions_dir.is_dir():
        raise SystemExit(f"error: --predictions_dir {predictions_dir}: folder not found")
    files = sorted(p for p in predictions_dir.rglob("*.png"))
    found = []
    for stem in stems:
        matches = [p for p in files if fnmatch.fnmatch(p.name, f"{stem}*.png")]
        if len(matches) != 1:
            what = "no prediction" if not matches else f"{len(matches)} predictions ({matches[0]}, {matches[1]})"
            raise SystemExit(f"error: --predictions_dir {predictions_dir}: {what} for {stem}; expected one "
                             f"{stem}*.png")
        found.append(matches[0])
    return found


def read_prediction(path: Path, label_type: str, shape: tuple[int, int]) -> np.ndarray:
    """A prediction PNG as trainIds (labelIds are mapped; ids outside the 19 classes become 255)."""
    try:
        with open_image(path, "prediction PNG") as image:  # a decompression bomb is refused before decoding
            pred = np.array(image)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    except OSError as error:
        raise SystemExit(f"error: {path}: unreadable prediction PNG ({error})") from error
    if pred.ndim != 2 or pred.dtype != np.uint8:
        raise SystemExit(f"error: {path}: expected a single-channel 8-bit PNG of {label_type}, got {pred.dtype} "
                         f"{pred.shape}")
    if pred.shape != shape:
        raise SystemExit(f"error: {path}: prediction is {pred.shape[0]}x{pred.shape[1]}, the ground truth "
                         f"{shape[0]}x{shape[1]}")
    return ID_TO_TRAIN_ID[pred] if label_type == "labelIds" else pred


def score_predictions(args, accelerator, source, on_predictions) -> dict:
    """Prediction PNGs against the labelTrainIds of the split, sharded over the processes like the model path."""
    paths = find_predictions(Path(args.predictions_dir), source["stem"])
    metric = MeanIoU(NUM_CLASSES, IGNORE_INDEX, device=accelerator.device)
    indices = range(accelerator.process_index, len(source), accelerator.num_processes)
    for index in tqdm(indices, desc="scoring", disable=not accelerator.is_main_process):
        label = read_label(source[index]["label"])
        pred = read_prediction(paths[index], args.pred_label_type, label.shape)
        preds, labels = torch.from_numpy(pred)[None], torch.from_numpy(label)[None]
        metric.update(preds, labels)
        batch = {"index": torch.tensor([index])}
        instances = instance_ids_path(source[index]["label"])  # for the official iIoU, when the file is there
        if instances is not None:
            batch["instance_ids"] = torch.from_numpy(read_instance_ids(instances))[None]
        on_predictions(preds, labels, batch)
    return metric.compute(accelerator)


def load_evaluate_metric(args):
    import evaluate  # noqa: PLC0415 - only this backend needs it

    name = args.metric_path or "mean_iou"
    try:
        return evaluate.load(name)
    except Exception as error:  # evaluate raises FileNotFoundError, ConnectionError, ... depending on the cause
        raise SystemExit(f"error: --metric_backend evaluate: could not load {name!r} ({type(error).__name__}: "
                         f"{first_line(error)}); evaluate fetches mean_iou from the Hugging Face Hub: "
                         "without network pass --metric_path DIR, a folder holding mean_iou.py") from error


def write_official_outputs(args, official: dict, class_names: list[str]) -> None:
    """The official Cityscapes table on stdout, the confusion-matrix heatmap (--confusion_matrix, --show_dir)."""
    print(f"\nCityscapes benchmark metrics (cityscapesscripts' definitions, {official['num_images']} images)\n")
    print(official_table(official))
    if official["num_images_with_instances"] < official["num_images"]:
        print("iIoU: nan, as not every label has its _gtFine_instanceIds.png beside it")
    paths = [Path(args.confusion_matrix)] if args.confusion_matrix else []
    paths += [Path(args.show_dir) / "confusion_matrix.png"] if args.show_dir else []
    for path in paths:
        plot_confusion_matrix(official["confusion_matrix"], class_names, path,
                              title=f"{args.split}: confusion matrix (% of each ground-truth class)")


def checkpoint_config(args) -> dict:
    """The --checkpoint folder's config.json, {} if there is none (a .pth) or it is unreadable (--checkpoint's own
    check names the problem later)."""
    config = Path(args.checkpoint) / "config.json" if args.checkpoint else None
    try:
        loaded = json.loads(config.read_text()) if config and config.is_file() else {}
    except (OSError, ValueError):
        loaded = {}
    return loaded if isinstance(loaded, dict) else {}


def default_data_root(args, saved) -> str:
    """--data_root when not given: the dataset a checkpoint of scripts/train.py was trained on (its config.json)."""
    config = Path(args.checkpoint) / "config.json" if args.checkpoint else None
    if not isinstance(saved, dict) or not saved.get("data_root"):
        raise SystemExit("error: --data_root is required" + (" (the checkpoint does not name the dataset it was "
                                                             "trained on)" if args.checkpoint else ""))
    if not Path(saved["data_root"]).is_dir():
        raise SystemExit(f"error: --data_root not given and the data root saved in {config}, {saved['data_root']}, "
                         "no longer exists: pass --data_root DIR")
    print(f"--data_root {saved['data_root']} (the {saved.get('dataset', '')} data {args.checkpoint} was trained on)")
    return saved["data_root"]


def hf_dataset(args, checkpoint: dict):
    """The Hugging Face dataset to score (--dataset_name, else the one the checkpoint was trained on), or None for a
    Cityscapes root; the options only Cityscapes has are refused with it."""
    if args.dataset_name and args.data_root:
        raise SystemExit("error: --dataset_name and --data_root: expected one of them")
    spec = None if args.data_root else hf_dataset_spec(args, checkpoint.get("training_data"))
    if spec is not None and (args.predictions_dir or args.format_only or args.confusion_matrix):
        raise SystemExit("error: --predictions_dir, --format_only and --confusion_matrix are for Cityscapes splits "
                         "(--data_root) only; expected --checkpoint with --dataset_name")
    return spec


def load_split(args, spec, checkpoint: dict):
    """(source, label space) of --split: a Cityscapes root's, or a Hugging Face dataset's with the model's classes."""
    if spec is None:
        try:
            return as_source(args.data_root, args.split), CITYSCAPES
        except (FileNotFoundError, ValueError) as error:
            raise SystemExit(f"error: --data_root: {error}") from error
    try:
        splits = load_splits(spec)
        if args.split not in splits:
            raise ValueError(f"--split {args.split}: no such split (splits: {', '.join(splits)})")
        return splits[args.split], label_space(spec, len(checkpoint.get("id2label") or CLASS_NAMES))
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"error: --dataset_name: {error}") from None


def markdown_table(results: dict) -> str:
    rows = ["| class | IoU (%) | Acc (%) |", "|---|---:|---:|"]
    for name, iou, acc in zip(results["class_names"], results["per_category_iou"], results["per_category_accuracy"],
                              strict=True):
        rows.append(f"| {name} | {iou * 100:.2f} | {acc * 100:.2f} |")
    rows.append(f"| **mean** | **{results['mean_iou'] * 100:.2f}** | **{results['mean_accuracy'] * 100:.2f}** |")
    rows.append(f"\noverall accuracy {results['overall_accuracy'] * 100:.2f} %")
    return "\n".join(rows)


# --------------------------------------------------------------------------------------------------------- main
def main(args) -> dict:
    if (args.checkpoint is None) == (args.predictions_dir is None):
        raise SystemExit("error: pass exactly one of --checkpoint and --predictions_dir")
    if args.format_only and (args.out_dir is None or args.checkpoint is None):
        raise SystemExit("error: --format_only needs --checkpoint and --out_dir")
    checkpoint = checkpoint_config(args)
    spec = hf_dataset(args, checkpoint)
    if spec is None:
        args.data_root = args.data_root or default_data_root(args, checkpoint.get("training_data"))
    args.split = args.split or (VALIDATION if spec else "val")
    accelerator = Accelerator(cpu=args.cpu, mixed_precision=args.mixed_precision)
    refuse_fp16_on_cpu(accelerator)
    if args.metric_backend == "evaluate" and accelerator.num_processes > 1:
        raise SystemExit("error: --metric_backend evaluate runs in one process (it stores every map); "
                         "launch without several processes")
    source, space = load_split(args, spec, checkpoint)
    try:
        check_split_files(source, space=space)  # every file a complete PNG (the first two decoded), before the model
        predict_options(args)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    stems = list(source["stem"])
    reference = load_evaluate_metric(args) if args.metric_backend == "evaluate" else None
    # the same pass, on the device (None: not Cityscapes)
    official = CityscapesMetrics(device=accelerator.device) if spec is None else None

    def on_predictions(preds, labels, batch):
        """Per batch, on each process: the official metrics, the submission files, the pictures, evaluate's maps."""
        if official is not None:
            official.update(preds, labels, batch.get("instance_ids"))
        preds, labels = preds.to("cpu", torch.uint8).numpy(), labels.to("cpu", torch.uint8).numpy()
        for i, index in enumerate(batch["index"].tolist()):
            if args.format_only:  # labelIds, named as the test server and cityscapesscripts expect
                Image.fromarray(TRAIN_ID_TO_ID[preds[i]]).save(Path(args.out_dir) / f"{stems[index]}_leftImg8bit.png")
            if args.show_dir:
                image = batch["image"][i].permute(1, 2, 0).cpu().numpy() if "image" in batch else \
                    read_image(source[index]["image"])
                save_prediction_pictures(args.show_dir, stems[index], image, preds[i], labels[i])
        if reference is not None:
            reference.add_batch(predictions=list(preds), references=list(labels))

    if args.format_only:
        Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    class_names = list(CLASS_NAMES)
    if args.predictions_dir is not None:
        results = score_predictions(args, accelerator, source, on_predictions)
    else:
        try:
            model = load_model(args.checkpoint).to(accelerator.device)
        except (FileNotFoundError, ValueError, OSError) as error:
            raise SystemExit(f"error: --checkpoint: {error}") from error
        class_names = [model.config.id2label[i] for i in range(model.config.num_labels)]
        official = official if model.config.num_labels == NUM_CLASSES else None
        dataset, on_device = get_val_data(args.data_root or source, args.split, instance_ids=official is not None,
                                          label_space=space)
        results = evaluate_segmentation(model, dataset, on_device, accelerator, args.batch_size, args.num_workers,
                                        args.mode, predict_options(args), on_predictions)
    if reference is not None:
        streaming = results
        results = reference.compute(num_labels=len(class_names), ignore_index=IGNORE_INDEX, reduce_labels=False)
        accelerator.print(f"evaluate mean_iou {results['mean_iou']:.6f}, streaming {streaming['mean_iou']:.6f}")

    results = {**metrics_to_json(results), "class_names": class_names, "num_images": len(source),
               "split": args.split, "mode": args.mode if args.checkpoint else "predictions",
               "metric_backend": args.metric_backend}
    if official is not None:
        results["cityscapes"] = official.compute(accelerator)  # every process: one all-reduce
    if accelerator.is_main_process:
        if not args.format_only:
            accelerator.print(markdown_table(results))
            if official is not None:
                write_official_outputs(args, results["cityscapes"], class_names)
        if args.show_dir:
            plot_class_iou({args.split: results["per_category_iou"]}, class_names,
                           Path(args.show_dir) / "class_iou.png", title=f"{args.split} per-class IoU")
        if args.output_json:
            Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.output_json).write_text(strict_json.dumps(results, indent=2))
    accelerator.wait_for_everyone()
    return results


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    what = parser.add_argument_group("what to evaluate")
    what.add_argument("--checkpoint", help="save_pretrained folder, or a reference mmseg .pth converted on the fly")
    what.add_argument("--predictions_dir", help="score <city>_<seq>_<frame>*.png prediction files instead")
    what.add_argument("--pred_label_type", choices=["trainIds", "labelIds"], default="trainIds")
    what.add_argument("--data_root", help="Cityscapes-layout folder (labelTrainIds prepared); default: the one "
                      "the --checkpoint folder was trained on (saved by scripts/train.py in its config.json)")
    what.add_argument("--split", default=None, help="default: val (Cityscapes), validation (--dataset_name)")
    add_hf_dataset_args(what, id2label=False)
    infer = parser.add_argument_group("inference")
    add_inference_args(infer)
    infer.add_argument("--batch_size", type=positive_int, default=1, help="per process")
    infer.add_argument("--num_workers", type=non_negative_int, default=2)
    out = parser.add_argument_group("outputs")
    out.add_argument("--output_json", help="write the metric dict, class names and settings here")
    out.add_argument("--format_only", action="store_true", help="write labelIds PNGs for the test server")
    out.add_argument("--out_dir", help="where --format_only writes <city>_<seq>_<frame>_leftImg8bit.png")
    out.add_argument("--show_dir", help="colorized predictions, overlays, ground truth, a per-class IoU chart and "
                     "confusion_matrix.png")
    out.add_argument("--confusion_matrix", metavar="PNG", help="write the row-normalized confusion matrix heatmap here")
    out.add_argument("--metric_backend", choices=["streaming", "evaluate"], default="streaming")
    out.add_argument("--metric_path", help="local evaluate metric (folder with mean_iou.py) for the evaluate backend")
    return parser


if __name__ == "__main__":
    main(get_args_parser().parse_args())
