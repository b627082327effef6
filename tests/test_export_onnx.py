"""scripts/export_onnx.py: static and dynamic export of a saved model, checked with onnxruntime; bad inputs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch

from modeling.hrnet_fcn import HRNetFCNConfig, HRNetFCNForSemanticSegmentation

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "export_onnx.py"
SIZE = (64, 128)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def export_onnx(load_script):
    return load_script("export_onnx")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A randomly initialised model saved as training saves final/. Its BN statistics are set from one batch, so
    that eval-mode logits have a trained model's scale (with the init's unit statistics they reach ~1e6)."""
    torch.manual_seed(0)
    model = HRNetFCNForSemanticSegmentation(HRNetFCNConfig())
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # cumulative average: after one batch, the batch's statistics
    with torch.no_grad():
        model.train()(torch.randn(2, 3, *SIZE))
    path = tmp_path_factory.mktemp("run") / "final"
    model.save_pretrained(path)
    return path


def args_for(export_onnx, *argv):
    return export_onnx.get_args_parser().parse_args(list(argv))


def test_static_export_cli(model_dir, tmp_path):
    out = tmp_path / "model.onnx"
    done = subprocess.run([sys.executable, str(SCRIPT), "--checkpoint", str(model_dir), "--out", str(out),
                           "--input_size", *map(str, SIZE)], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    results = json.loads((tmp_path / "model.onnx.json").read_text())
    assert results["passed"] and not results["dynamic"] and len(results["checks"]) == 1
    assert 0 < results["max_abs_diff"] < 1e-3 and 0.1 < results["checks"][0]["max_abs_logit"] < 100
    assert results["argmax_agreement"] == 1.0
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.shape for i in session.get_inputs()] == [[1, 3, *SIZE]]
    (logits,) = session.run(None, {"pixel_values": np.zeros((1, 3, *SIZE), np.float32)})
    assert logits.shape == (1, 19, SIZE[0] // 4, SIZE[1] // 4)


def test_dynamic_export_with_upsample(export_onnx, model_dir, tmp_path):
    out, json_path = tmp_path / "dyn.onnx", tmp_path / "reports" / "dyn.json"
    results = export_onnx.main(args_for(export_onnx, "--checkpoint", str(model_dir), "--out", str(out),
                                        "--input_size", *map(str, SIZE), "--dynamic", "--upsample", "--opset", "18",
                                        "--output_json", str(json_path)))
    assert json.loads(json_path.read_text()) == results
    assert results["passed"] and results["opset"] == 18 and results["max_abs_diff"] < 1e-3
    second = results["checks"][1]
    assert second["input_shape"] == [2, 3, 32, 64]
    assert second["output_shapes"] == {"logits": [2, 19, 8, 16], "labels": [2, 32, 64]}
    # a third size, not checked by the script, with the labels output compared to PyTorch's argmax
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    pixel_values = torch.randn(1, 3, 96, 160, generator=torch.Generator().manual_seed(1))
    logits, labels = session.run(None, {"pixel_values": pixel_values.numpy()})
    model = HRNetFCNForSemanticSegmentation.from_pretrained(model_dir).eval()
    with torch.no_grad():
        expected = model(pixel_values).logits
    upsampled = torch.nn.functional.interpolate(expected, size=(96, 160), mode="bilinear", align_corners=False)
    assert logits.shape == (1, 19, 24, 40) and np.abs(logits - expected.numpy()).max() < 1e-3
    assert labels.shape == (1, 96, 160) and (labels == upsampled.argmax(1).numpy()).mean() > 0.999


def test_tolerance_exceeded(export_onnx, model_dir, tmp_path, monkeypatch):
    run = onnxruntime.InferenceSession.run

    def shifted(self, names, feed):  # an exported model whose logits are off by 0.01
        return [o + 0.01 if i == 0 else o for i, o in enumerate(run(self, names, feed))]

    monkeypatch.setattr(onnxruntime.InferenceSession, "run", shifted)
    args = args_for(export_onnx, "--checkpoint", str(model_dir), "--out", str(tmp_path / "m.onnx"),
                    "--input_size", "32", "64")
    with pytest.raises(SystemExit, match=r"^error: .*m.onnx: onnxruntime logits differ from PyTorch by 0.01"):
        export_onnx.main(args)
    assert json.loads((tmp_path / "m.onnx.json").read_text())["passed"] is False


@pytest.mark.parametrize("what", ["missing", "not_a_model"])
def test_bad_checkpoint(export_onnx, tmp_path, what):
    folder = tmp_path / what
    if what == "not_a_model":
        folder.mkdir()
        (folder / "weights.txt").write_text("nothing")
    expected = rf"^error: --checkpoint: {folder}: (checkpoint not found|no config.json)"
    with pytest.raises(SystemExit, match=expected) as exit:
        export_onnx.main(args_for(export_onnx, "--checkpoint", str(folder), "--out", str(tmp_path / "m.onnx")))
    assert isinstance(exit.value.code, str) and "\n" not in exit.value.code  # printed as one line, exit status 1
    assert not (tmp_path / "m.onnx").exists()


def test_bad_input_size(export_onnx, model_dir, tmp_path):
    with pytest.raises(SystemExit, match=r"--input_size 100 200: with --dynamic, expected multiples of 32"):
        export_onnx.main(args_for(export_onnx, "--checkpoint", str(model_dir), "--out", str(tmp_path / "m.onnx"),
                                  "--input_size", "100", "200", "--dynamic"))

