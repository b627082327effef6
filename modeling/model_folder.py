"""The model folders train.py writes (final/, best/): a folder that transformers loads without this repository.

    write_model_folder(model, "out/run/final", iteration=80000, metrics=metrics, recipe=run_config,
                       curves="out/run/training_curves.png")

Beside save_pretrained's weights and config.json (id2label / label2id: the Cityscapes names), the folder holds the
model code (modeling/hrnet_fcn.py, registered for the Auto classes), the image processor (preprocessor_config.json
and modeling/image_processing_hrnet_fcn.py), a model card (README.md: data, recipe, metrics, how to load) and the
training curves picture, so that `pipeline("image-segmentation", model=folder, trust_remote_code=True)` works
anywhere transformers, timm and torch are installed.
"""

import math
import shutil
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from modeling.checkpointing import save_pretrained_atomically
from modeling.image_processing_hrnet_fcn import HRNetFCNImageProcessor
from modeling.training import LR_END, MOMENTUM, POLY_POWER, WEIGHT_DECAY

CURVES = "training_curves.png"
RECIPE = "mmsegmentation's `fcn_hr18_512x1024_80k_cityscapes`"


def write_model_folder(model, folder, *, iteration: int, metrics: dict, recipe: dict, curves=None) -> Path:
    """Weights, config, model code, image processor, model card and curves into `folder`, atomically (call on one
    process). `metrics`: the evaluation of this model (modeling.metrics, as JSON); `recipe`: the run's settings."""

    def add_files(tmp: Path) -> None:
        HRNetFCNImageProcessor().save_pretrained(tmp)
        has_curves = curves is not None and Path(curves).is_file()
        if has_curves:
            shutil.copyfile(curves, tmp / CURVES)
        card = model_card(model.config, folder=folder, iteration=iteration, metrics=metrics, recipe=recipe,
                          has_curves=has_curves)
        card.save(tmp / "README.md")

    return save_pretrained_atomically(model, folder, add_files=add_files)


def model_card(config, *, folder, iteration: int, metrics: dict, recipe: dict, has_curves: bool) -> ModelCard:
    """The model card: the Hub's metadata (huggingface_hub) and the text of `card_text`."""
    dataset, split = _dataset_and_split(config)
    tags = ["semantic-segmentation", "hrnet", "fcn", "accelerate"] + (["cityscapes"] if split == "val" else [])
    data = ModelCardData(
        library_name="transformers", pipeline_tag="image-segmentation", tags=tags, metrics=["mean_iou"],
        model_name=f"hrnet-w18-fcn-{Path(folder).name}", eval_results=[EvalResult(
            task_type="image-segmentation", dataset_type=dataset, dataset_name=f"{dataset} {split}",
            dataset_split=split, metric_type="mean_iou", metric_value=_rounded(metrics["mean_iou"]))])
    text = card_text(config, folder=folder, iteration=iteration, metrics=metrics, recipe=recipe, has_curves=has_curves)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{text}")


def _percent(value) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:.2f}"


def _rounded(value):
    return None if value is None or math.isnan(value) else round(value, 4)


def _dataset_and_split(config) -> tuple[str, str]:
    """(dataset, evaluated split) of config.training_data: a Hugging Face dataset (--dataset_name) is scored on its
    validation split, a Cityscapes-layout root (the real set or the synthetic one) on val."""
    training_data = getattr(config, "training_data", None) or {}
    if training_data.get("dataset") == "hf":
        return training_data["dataset_name"], "validation"
    return training_data.get("dataset", "unknown"), "val"


def _data_section(config) -> str:
    training_data = getattr(config, "training_data", None) or {}
    dataset = training_data.get("dataset", "unknown")
    names = ", ".join(config.id2label[i] for i in range(config.num_labels))
    classes = f"{config.num_labels} classes (in `config.id2label`): {names}; label {config.ignore_index} is ignored."
    if dataset == "hf":
        return f"Trained on the Hugging Face dataset `{training_data['dataset_name']}` (train split). {classes}"
    what = ("a synthetic set in the Cityscapes format (this repository's data/synthetic.py), not the real Cityscapes"
            if dataset == "synthetic" else "Cityscapes fine annotations (train split)")
    return f"Trained on {what}, read from `{training_data.get('data_root', 'unknown')}`. Cityscapes trainIds: {classes}"


def _results_section(config, iteration: int, metrics: dict) -> str:
    rows = [f"| {config.id2label[i]} | {_percent(iou)} | {_percent(acc)} |" for i, (iou, acc) in
            enumerate(zip(metrics["per_category_iou"], metrics["per_category_accuracy"], strict=True))]
    return "\n".join([
        f"The validation split after iteration {iteration}, whole-image inference at the image's own size:",
        "", "| mIoU (%) | mAcc (%) | aAcc (%) |", "|---|---|---|",
        f"| {_percent(metrics['mean_iou'])} | {_percent(metrics['mean_accuracy'])} | "
        f"{_percent(metrics['overall_accuracy'])} |",
        "", "Per class (n/a: the class is absent from the split):", "",
        "| class | IoU (%) | Acc (%) |", "|---|---|---|", *rows])


def _how_to_load(folder) -> str:
    return f'''```python
from transformers import pipeline

path = "{folder}"  # this folder, or the Hub repository it was uploaded to
segmenter = pipeline("image-segmentation", model=path, trust_remote_code=True)
masks = segmenter("street.png")  # one {{"label": class name, "mask": PIL image}} per class present
```

```python
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

processor = AutoImageProcessor.from_pretrained(path, trust_remote_code=True)
model = AutoModelForSemanticSegmentation.from_pretrained(path, trust_remote_code=True).eval()
image = Image.open("street.png").convert("RGB")
with torch.no_grad():
    outputs = model(**processor(images=image, return_tensors="pt"))
train_ids = processor.post_process_semantic_segmentation(outputs, target_sizes=[image.size[::-1]])[0]
```

Needs torch, timm and transformers, not this repository: `trust_remote_code=True` runs the model and processor
code saved in this folder (`hrnet_fcn.py`, `image_processing_hrnet_fcn.py`). The processor keeps the image size
(whole-image inference) and normalizes 0-255 RGB with the recipe's mean and std.'''


def card_text(config, *, folder, iteration: int, metrics: dict, recipe: dict, has_curves: bool) -> str:
    """The card's Markdown body: what the model is, data, recipe, metrics, curves, how to load."""
    settings = "\n".join(f"| `{key}` | {value} |" for key, value in recipe.items())
    curves = f"![training curves: loss, learning rate, val mIoU]({CURVES})" if has_curves else "(not drawn)"
    return f"""# HRNet-W18 + FCN semantic segmentation ({Path(folder).name})

An FCN head on a timm HRNet-W18 backbone (the reference `fcn_hr18` network), trained with Hugging Face Accelerate
following {RECIPE} recipe. This folder holds the model after iteration {iteration}.

## Data

{_data_section(config)}

## Recipe

SGD (momentum {MOMENTUM}, weight decay {WEIGHT_DECAY}) on a cross-entropy loss, the learning rate decayed per
iteration by a poly schedule (power {POLY_POWER}) to {LR_END}; training crops from images rescaled by a random ratio
in [0.5, 2), with random crop (at most 75% of one class), horizontal flip and photometric distortion. This run's
settings:

| setting | value |
|---|---|
{settings}

## Results

{_results_section(config, iteration, metrics)}

## Training curves

{curves}

## How to load

{_how_to_load(folder)}
"""
