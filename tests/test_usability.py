"""What a newcomer meets first: CPU threads chosen from the free cores, a synthetic run without --crop_size, eval
without --data_root (tested in test_eval.py), strict JSON outputs, --help with defaults, and an unreachable
Hugging Face Hub failing in seconds with the alternatives named."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from modeling import cpu_threads, strict_json

REPO = Path(__file__).resolve().parents[1]


def strict_loads(text: str):
    """json.loads that refuses NaN/Infinity, as jq and JavaScript do."""
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


# ------------------------------------------------------------------------------------------------- CPU threads
@pytest.fixture
def machine(monkeypatch):
    """machine(cores, load, torch_threads): fake affinity mask, 1-minute load average and torch's thread count."""
    def set_machine(cores: int, load: float, torch_threads: int | None = None):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
        monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
        if torch_threads is not None:
            monkeypatch.setattr(torch, "get_num_threads", lambda: torch_threads)

    return set_machine


@pytest.mark.parametrize(("cores", "load", "torch_threads", "workers", "processes", "expected"), [
    (8, 0.0, 8, 0, 1, 8),     # a quiet machine: every core
    (8, 3.5, 8, 2, 1, 2),     # 4.5 free cores, 2 of them for the loader workers
    (2, 1.9, 2, 2, 1, 1),     # a busy 2-core laptop: one thread, never zero
    (2, 0.0, 2, 0, 1, 2),
    (16, 0.0, 8, 0, 2, 8),    # two processes share the cores
    (16, 0.0, 16, 0, 4, 4),
    (8, 0.0, 1, 0, 1, 1),     # never more than the process started with (OMP_NUM_THREADS=1 stays 1)
    (4, 9.0, 4, 0, 1, 1),     # more load than cores
])
def test_cpu_threads_from_free_cores(machine, cores, load, torch_threads, workers, processes, expected):
    machine(cores, load, torch_threads)
    threads, reason = cpu_threads.choose_cpu_threads(workers, processes)
    assert threads == expected
    assert reason.startswith(f"{cores} cores, load {load:.1f}, {workers} loader workers")


def test_train_main_sets_threads_crop_and_writes_strict_json(load_script, synthetic_root, tmp_path, machine, capsys):
    from accelerate.state import AcceleratorState, GradientState

    train = load_script("train")
    before = torch.get_num_threads()

    def run(out_dir, *extra):
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        torch.set_num_threads(3)  # as if launched with OMP_NUM_THREADS=3
        try:  # no --crop_size: the synthetic images' size (64x128), not the recipe's 512x1024
            results = train.main(train.get_args_parser().parse_args([
                "--dataset", "synthetic", "--data_root", str(synthetic_root), "--output_dir", str(out_dir),
                "--pretrained_backbone", "none", "--num_workers", "0", "--pipeline", "reference", "--batch_size", "1",
                "--max_iters", "2", "--eval_interval", "1", "--log_interval", "1", *extra]))
            return results, torch.get_num_threads()
        finally:
            torch.set_num_threads(before)
            AcceleratorState._reset_state(reset_partial_state=True)
            GradientState._reset_state()

    machine(cores=4, load=2.0)  # 2 cores free, no busy loader workers (--num_workers 0)
    results, threads = run(tmp_path / "auto")
    assert threads == 2 and "CPU threads: 2 (4 cores, load 2.0, 0 loader workers)" in capsys.readouterr().out
    results_text = (tmp_path / "auto" / "results.json").read_text()
    assert strict_loads(results_text)["iterations"] == 2 == results["iterations"]
    records = [strict_loads(line) for line in (tmp_path / "auto" / "train_log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records if "mean_iou" in r] == [1, 2]  # evaluated every iteration
    manifest = next((tmp_path / "auto" / "checkpoints").glob("iter_*")) / "manifest.json"
    strict_loads(manifest.read_text())
    assert json.loads((tmp_path / "auto" / "final" / "config.json").read_text())["training_data"] == {
        "dataset": "synthetic", "data_root": str(synthetic_root.resolve())}

    _, threads = run(tmp_path / "flag", "--cpu_threads", "1")
    assert threads == 1 and "CPU threads: 1 (--cpu_threads)" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------- strict JSON
def test_strict_json_writes_null_for_nan_and_infinity():
    text = strict_json.dumps({"iou": [0.5, float("nan")], "array": np.array([1.0, np.nan]), "scalar": np.float32(2),
                              "inf": float("-inf"), "nested": ({"x": np.int64(3)},), "none": None}, indent=2)
    assert strict_loads(text) == {"iou": [0.5, None], "array": [1.0, None], "scalar": 2.0, "inf": None,
                                  "nested": [{"x": 3}], "none": None}
    with pytest.raises(ValueError, match="non-standard JSON constant NaN"):
        strict_loads(json.dumps({"iou": float("nan")}))  # what plain json.dumps writes: the check can fail
    with pytest.raises(TypeError):
        strict_json.dumps({"not json": object()})


@pytest.mark.parametrize("absent", [float("nan"), None], ids=["NaN", "null"])
def test_report_reads_nan_and_null_and_writes_strict_json(load_script, tmp_path, absent):
    bench = load_script("benchmark")
    run = tmp_path / "run"
    run.mkdir()
    metrics = {"mean_iou": 0.5, "per_category_iou": [0.5] * 18 + [absent]}
    (run / "results.json").write_text(json.dumps({
        "num_processes": 1, "mixed_precision": "no", "global_batch": 2, "images_per_sec": 7.0, "target_miou": 0.7811,
        "best_miou": 0.5, "final_miou": 0.5, "final_metrics": metrics, "best_metrics": metrics,
        "eval_log": [{"iteration": 10, "wall_s": 1.0, "mean_iou": 0.5}]}))
    results = bench.main(bench.get_args_parser().parse_args(["report", str(run), "--out_dir", str(tmp_path / "r")]))
    assert results["runs"][0]["per_class_iou"][-1] is None
    assert strict_loads((tmp_path / "r" / "report.json").read_text())["runs"][0]["per_class_iou"][-1] is None


# -------------------------------------------------------------------------------------------------------- help
SCRIPTS = ["train", "eval", "infer", "prepare_cityscapes", "make_synthetic_cityscapes", "convert_mmseg_checkpoint",
           "export_onnx", "browse_augmentations"]  # benchmark.py: its modes, below


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_shows_defaults(load_script, name):
    parser = load_script(name).get_args_parser()
    assert "(default: " in parser.format_help()


def test_train_and_benchmark_help(load_script):
    train_help = " ".join(load_script("train").get_args_parser().format_help().split())
    for default in ("optimizer steps (default: 80000)", "(default: hrnet_w18.ms_in1k)", "(default: out/train)"):
        assert default in train_help
    parser = load_script("benchmark").get_args_parser()
    bench_help = " ".join(parser.format_help().split())
    for mode, line in [("data", "CPU cost per training sample"), ("model", "forward+backward time of our model"),
                       ("metric", "CPU time per image of the streaming mIoU"),
                       ("throughput", "images/s of the real training step"), ("report", "the benchmark table")]:
        assert f"{mode} {line}" in bench_help
    modes = next(action for action in parser._actions if action.dest == "mode").choices
    for mode, sub in modes.items():
        assert "(default: " in sub.format_help(), mode


# ---------------------------------------------------------------------------------------------- pretrained hub
def test_unreachable_hub_fails_in_seconds_naming_the_alternatives(tmp_path):
    """The real code path: a hub that refuses connections (port 9 on localhost), an empty cache, no retries."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_ENDPOINT": "http://127.0.0.1:9",
           "HF_HUB_CACHE": str(tmp_path / "empty_cache")}
    env.pop("HF_HUB_OFFLINE", None)
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "train.py"), "--dataset", "synthetic",
                           "--output_dir", str(tmp_path / "run"), "--num_workers", "0", "--max_iters", "1"],
                          env=env, capture_output=True, text=True, timeout=60)  # ~66 s of hub retries before
    assert proc.returncode != 0
    assert "--pretrained_backbone none" in proc.stderr and "is unreachable" in proc.stderr, proc.stderr[-2000:]
    assert "/path/to/model.safetensors" in proc.stderr
    assert "Retrying" not in proc.stderr + proc.stdout  # huggingface_hub's backoff never started


def test_weights_in_the_hf_cache_load_offline(tmp_path, monkeypatch):
    """A timm file already in the Hugging Face cache loads with the hub unreachable, without any request."""
    import huggingface_hub
    import timm
    from safetensors.torch import save_file

    from modeling import HRNetFCNConfig, HRNetFCNForSemanticSegmentation, load_pretrained_backbone, pretrained

    torch.manual_seed(1)
    timm_model = timm.create_model("hrnet_w18", pretrained=False)
    snapshot = tmp_path / "hub" / "models--timm--hrnet_w18.ms_in1k" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in timm_model.state_dict().items()}, snapshot / "model.safetensors")
    (tmp_path / "hub" / "models--timm--hrnet_w18.ms_in1k" / "refs").mkdir()
    (tmp_path / "hub" / "models--timm--hrnet_w18.ms_in1k" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(pretrained, "_hub_unreachable", lambda: pytest.fail("the hub was probed"))

    model = HRNetFCNForSemanticSegmentation(HRNetFCNConfig())
    info = load_pretrained_backbone(model, "hrnet_w18.ms_in1k")
    assert info["loaded"] > 1800
    torch.testing.assert_close(model.backbone.conv1.weight, timm_model.conv1.weight)
