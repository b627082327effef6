"""The model folders scripts/train.py writes (final/, best/) load without this repository.

A tiny training run writes them; the model card holds the run's figures; and a fresh interpreter, in another
directory, with the repository not importable, loads final/ through transformers' Auto classes and the
image-segmentation pipeline (trust_remote_code=True), whose predictions equal scripts/infer.py's.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from data.labels import CLASS_NAMES

pytestmark = pytest.mark.usefixtures("one_thread")

# Tiny settings as tests/test_train.py's: 64x128 crops of the synthetic 64x128 images, no workers, 2 iterations,
# an evaluation after each (best/ is written at least once). The recipe's lr: its 2 iterations predict several
# classes on a val image (a larger one, 0.1, predicts a single class there).
RUN = ["--pretrained_backbone", "none", "--crop_size", "64", "128", "--num_workers", "0", "--pipeline", "reference",
       "--max_iters", "2", "--eval_interval", "1", "--log_interval", "1"]


def reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def run(load_script, synthetic_root, tmp_path_factory):
    """(output folder, results) of a 2-iteration training run on the synthetic set."""
    train = load_script("train")
    out = tmp_path_factory.mktemp("run") / "out"
    reset_accelerate()
    args = train.get_args_parser().parse_args(["--dataset", "synthetic", "--data_root", str(synthetic_root),
                                               "--output_dir", str(out), *RUN])
    try:
        results = train.main(args)
    finally:
        reset_accelerate()
    return out, results


def test_processor_normalizes_bit_for_bit_as_the_training_pipeline():
    from data.transforms import normalize
    from modeling.image_processing_hrnet_fcn import HRNetFCNImageProcessor

    image = np.stack([np.arange(256, dtype=np.uint8).reshape(16, 16)] * 3, axis=-1)  # every 8-bit value
    image[..., 1] = 255 - image[..., 1]
    expected = normalize(torch.from_numpy(image).permute(2, 0, 1)[None])
    actual = HRNetFCNImageProcessor()(images=[Image.fromarray(image)], return_tensors="pt")["pixel_values"]
    assert actual.dtype == torch.float32 and torch.equal(actual, expected)


@pytest.mark.parametrize("kind", ["final", "best"])
def test_folder_holds_code_processor_model_card_and_curves(run, kind):
    out, results = run
    folder = out / kind
    assert {"config.json", "model.safetensors", "hrnet_fcn.py", "preprocessor_config.json",
            "image_processing_hrnet_fcn.py", "README.md", "training_curves.png"} <= {p.name for p in folder.iterdir()}
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "hrnet_fcn.HRNetFCNConfig",
                                  "AutoModelForSemanticSegmentation": "hrnet_fcn.HRNetFCNForSemanticSegmentation"}
    assert config["id2label"] == {str(i): name for i, name in enumerate(CLASS_NAMES)}
    assert config["label2id"]["bicycle"] == 18
    processor = json.loads((folder / "preprocessor_config.json").read_text())
    assert processor["auto_map"] == {"AutoImageProcessor": "image_processing_hrnet_fcn.HRNetFCNImageProcessor"}
    assert (processor["do_resize"], processor["do_rescale"], processor["image_mean"], processor["image_std"]) == (
        False, False, [123.675, 116.28, 103.53], [58.395, 57.12, 57.375])
    metrics = results["final_metrics"] if kind == "final" else results["best_metrics"]
    iteration = 2 if kind == "final" else max(results["eval_log"], key=lambda e: e["mean_iou"])["iteration"]
    card = (folder / "README.md").read_text()
    assert card.startswith("---\n") and "pipeline_tag: image-segmentation" in card
    assert f"after iteration {iteration}" in card and f"{100 * metrics['mean_iou']:.2f}" in card
    for name, iou in zip(CLASS_NAMES, metrics["per_category_iou"], strict=True):
        assert f"| {name} | {'n/a' if np.isnan(iou) else f'{100 * iou:.2f}'} |" in card
    assert "| `max_iters` | 2 |" in card and "synthetic set" in card and "(training_curves.png)" in card
    assert 'pipeline("image-segmentation", model=path, trust_remote_code=True)' in card


# Run by a fresh interpreter (python -I: no PYTHONPATH, no script folder, no current folder on sys.path).
LOAD_ELSEWHERE = """
import importlib.util, sys
import numpy as np, torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation, pipeline

folder, image_path, out = sys.argv[1:]
assert importlib.util.find_spec("modeling") is None and importlib.util.find_spec("data") is None, sys.path
image = Image.open(image_path)
processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
model = AutoModelForSemanticSegmentation.from_pretrained(folder, trust_remote_code=True).eval()
with torch.no_grad():
    outputs = model(**processor(images=image, return_tensors="pt"))
auto = processor.post_process_semantic_segmentation(outputs, target_sizes=[image.size[::-1]])[0]
segments = pipeline("image-segmentation", model=folder, trust_remote_code=True)(image_path)
np.savez(out, auto=auto.numpy(), masks=np.stack([np.asarray(s["mask"]) for s in segments]),
         labels=np.array([s["label"] for s in segments]), model=type(model).__module__)
"""


def test_folder_loads_without_the_repository_and_predicts_as_infer(run, load_script, synthetic_root, tmp_path):
    folder = run[0] / "final"
    image = sorted((synthetic_root / "leftImg8bit" / "val").glob("*/*.png"))[0]
    infer = load_script("infer")
    reset_accelerate()
    infer.main(infer.get_args_parser().parse_args([str(image), "--checkpoint", str(folder), "--out_dir",
                                                   str(tmp_path / "infer"), "--cpu"]))
    expected = np.asarray(Image.open(tmp_path / "infer" / f"{image.stem}_trainIds.png"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-I", "-c", LOAD_ELSEWHERE, str(folder), str(image), "out.npz"],
                            cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = np.load(elsewhere / "out.npz")
    assert str(loaded["model"]).startswith("transformers_modules.")  # the code saved in the folder, not ours
    np.testing.assert_array_equal(loaded["auto"], expected)
    present = np.unique(expected)
    assert len(present) > 1  # several masks to tell apart (6 classes when written)
    assert list(loaded["labels"]) == [CLASS_NAMES[i] for i in present]
    np.testing.assert_array_equal(loaded["masks"], np.stack([(expected == i) * 255 for i in present]))
