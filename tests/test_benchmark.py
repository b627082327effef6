"""scripts/benchmark.py throughput and report.

report: hand-written results.json files whose figures are known, so the speedup arithmetic, Time2train read from the
evaluation log (not from the run's own field), the target override, '-' for missing runs and fields, and the plots
are checked against values computed here. The reference's own speedups (2.98, 3.43) come out of the same code.
throughput: counting collectives is opt-in; the counter on a one-process gloo group with DDP (units), then two real
`accelerate launch` runs on the CPU, started together to share the start-up cost: random input (collectives counted),
and synthetic Cityscapes through the fast path (not counted: null); their JSON is checked and fed to `report`.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "benchmark.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def bench(load_script):
    return load_script("benchmark")


def report(bench, out_dir, *runs, target=None) -> dict:
    argv = ["report", *map(str, runs), "--out_dir", str(out_dir)]
    return bench.main(bench.get_args_parser().parse_args(argv + (["--target_miou", str(target)] if target
                                                                         else [])))


def write_results(folder: Path, **fields) -> Path:
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(fields))
    return folder


def metrics(miou: float) -> dict:
    per_class = [miou] * 18 + [float("nan")]  # a class absent from the split
    return {"mean_iou": miou, "per_category_iou": per_class}


def table_line(markdown: str, start: str) -> list[str]:
    """The cells of the first Markdown table line starting with `start` (e.g. '| 8 | fp32 |')."""
    line = next(line for line in markdown.splitlines() if line.startswith(start))
    return [cell.strip() for cell in line.strip("|").split("|")]


@pytest.fixture
def runs(tmp_path):
    """1 and 8 GPUs fp32 (trained), 8 GPUs fp16 without its 1-GPU partner; figures chosen to be checkable."""
    fp32_1 = write_results(tmp_path / "fp32_1gpu", num_processes=1, mixed_precision="no", global_batch=2,
                           images_per_sec=7.5, target_miou=0.7811, time_to_train_s=None, best_miou=0.5,
                           final_miou=0.5, eval_log=[{"iteration": 1000, "wall_s": 300.0, "mean_iou": 0.5}],
                           environment={"device": "GPU A"})
    fp32_8 = write_results(tmp_path / "fp32_8gpu", num_processes=8, mixed_precision="no", global_batch=16,
                           images_per_sec=30.0, target_miou=0.7811, best_miou=0.8, final_miou=0.79,
                           best_metrics=metrics(0.8), final_metrics=metrics(0.79),
                           eval_log=[{"iteration": 1000, "wall_s": 100.0, "mean_iou": 0.70},
                                     {"iteration": 2000, "wall_s": 250.5, "mean_iou": 0.7811},
                                     {"iteration": 3000, "wall_s": 400.0, "mean_iou": 0.80},
                                     {"iteration": 4000, "wall_s": 550.0, "mean_iou": 0.79}],
                           environment={"device": "GPU A"})
    # its own time_to_train_s disagrees with its log on purpose: the report must read the log
    fp16_8 = write_results(tmp_path / "fp16_8gpu", num_processes=8, mixed_precision="fp16", global_batch=16,
                           images_per_sec=40.0, target_miou=0.7811, time_to_train_s=999.0, best_miou=0.79,
                           final_miou=0.79, final_metrics=metrics(0.79),
                           eval_log=[{"iteration": 1000, "wall_s": 120.0, "mean_iou": 0.6},
                                     {"iteration": 2000, "wall_s": 300.0, "mean_iou": 0.79}])
    return fp32_1, fp32_8, fp16_8


def test_report_table_speedup_time2train_and_plots(bench, runs, tmp_path):
    out = tmp_path / "report"
    results = report(bench, out, *runs)
    rows = {row["run"]: row for row in results["runs"]}
    assert rows["fp32_8gpu"]["speedup"] == pytest.approx(30.0 / 7.5)
    assert rows["fp32_8gpu"]["scaling_pct"] == pytest.approx(100 * 30.0 / 7.5 / 8)
    assert rows["fp32_1gpu"]["speedup"] == pytest.approx(1.0)
    assert rows["fp16_8gpu"]["speedup"] is None  # no 1-GPU fp16 run
    assert rows["fp32_8gpu"]["time_to_train_s"] == 250.5  # first eval >= 0.7811 (equal counts)
    assert rows["fp32_8gpu"]["miou_pct"] == pytest.approx(78.11)
    assert rows["fp16_8gpu"]["time_to_train_s"] == 300.0  # from the log, not the run's 999
    assert rows["fp32_1gpu"]["time_to_train_s"] is None  # never reached
    assert rows["fp32_8gpu"]["best_miou_pct"] == pytest.approx(80.0)
    assert rows["fp32_8gpu"]["setting"] == rows["fp32_1gpu"]["setting"] == "batch 2/process"

    # the reference's published speedups come out of the same arithmetic
    reference = {(r["gpu_count"], r["precision"]): r for r in results["reference"]}
    assert round(reference[8, "fp32"]["speedup"], 2) == 2.98
    assert round(reference[8, "fp16"]["speedup"], 2) == 3.43

    markdown = (out / "report.md").read_text()
    assert table_line(markdown, "| 8 | fp32 |") == ["8", "fp32", "fp32_8gpu", "250.50", "30.00", "78.11", "4.00",
                                                  "57574.09", "20.88", "78.11", "2.98"]
    assert table_line(markdown, "| 8 | fp16 |")[2:7] == ["fp16_8gpu", "300.00", "40.00", "79.00", "-"]
    # the 1-GPU fp16 run is missing: every one of our cells is '-', the reference's are there
    assert table_line(markdown, "| 1 | fp16 |") == ["1", "fp16", "-", "-", "-", "-", "-", "-", "5.20", "-", "1.00"]
    assert json.loads((out / "report.json").read_text())["seed_table"] == json.loads(json.dumps(
        results["seed_table"]))
    assert [t["gpu_count"] for t in results["seed_table"]] == [1, 8, 1, 8]
    for name in ("miou_vs_time.png", "images_per_sec.png", "per_class_iou.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
        assert f"]({name})" in markdown


def test_report_target_override_and_missing_fields(bench, runs, tmp_path):
    sparse = write_results(tmp_path / "sparse", num_processes=2)  # a run that recorded almost nothing
    results = report(bench, tmp_path / "report", runs[1], sparse, target=0.75)
    rows = {row["run"]: row for row in results["runs"]}
    assert rows["fp32_8gpu"]["time_to_train_s"] == 250.5  # 0.70 < 0.75 <= 0.7811
    assert rows["fp32_8gpu"]["target_miou_pct"] == pytest.approx(75.0)
    assert rows["sparse"]["speedup"] is None and rows["sparse"]["images_per_sec"] is None
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert table_line(markdown, "| sparse |") == ["sparse", "train", "2"] + ["-"] * 9 + ["75.00"] + ["-"] * 3
    assert table_line(markdown, "| 2 | - |")[2:] == ["sparse"] + ["-"] * 8  # an extra configuration row
    report(bench, tmp_path / "report2", runs[1], target=0.81)  # never reached -> '-'
    assert table_line((tmp_path / "report2" / "report.md").read_text(), "| 8 | fp32 |")[3:7] == ["-", "30.00", "-",
                                                                                                "-"]


def test_report_throughput_section_on_gpu_like_runs(bench, runs, tmp_path):
    # hand-written throughput JSONs as a GPU run writes them (host syncs counted, collectives on 8 processes)
    def throughput(name, processes, **fields):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({
            "mode": "throughput", "num_processes": processes, "mixed_precision": "bf16", "device": "NVIDIA H100",
            "input": "fast", "batch_size": 2, "global_batch": 2 * processes, "crop_size": [512, 1024],
            "channels_last": True, "compile": False, "sync_batchnorm": "torch" if processes > 1 else "off",
            **fields}))
        return path

    one = throughput("h100_b2", 1, images_per_sec=20.0, s_per_iter=0.1, data_wait_pct=1.25, peak_memory_gib=3.5,
                     host_syncs_per_step={"data": 0, "step": 0}, collectives_per_step=0)
    eight = throughput("h100x8_b2", 8, images_per_sec=144.0, s_per_iter=0.111, data_wait_pct=2.5,
                       peak_memory_gib=3.75, host_syncs_per_step={"data": 0, "step": 306}, collectives_per_step=616)
    results = report(bench, tmp_path / "report", one, eight, runs[0])
    rows = {row["run"]: row for row in results["runs"]}
    assert rows["h100x8_b2"]["speedup"] == pytest.approx(7.2)
    assert rows["h100x8_b2"]["scaling_pct"] == pytest.approx(90.0)
    assert rows["fp32_1gpu"]["throughput"] is None
    section = (tmp_path / "report" / "report.md").read_text().split("## Throughput runs")[1]
    assert table_line(section, "| h100x8_b2 |") == [
        "h100x8_b2", "NVIDIA H100", "8", "bf16", "2", "True", "False", "fast", "SyncBN (torch)", "144.00", "0.11",
        "2.50", "3.75", "0, 306", "616"]
    assert table_line(section, "| h100_b2 |")[8:] == ["BN", "20.00", "0.10", "1.25", "3.50", "0, 0", "0"]
    assert "fp32_1gpu" not in section  # train.py runs are not throughput measurements
    report(bench, tmp_path / "report2", runs[0])
    assert "No throughput JSON" in (tmp_path / "report2" / "report.md").read_text()


def test_report_bad_input(bench, tmp_path):
    with pytest.raises(SystemExit, match="fraction"):
        report(bench, tmp_path / "r", tmp_path, target=78.11)
    with pytest.raises(SystemExit, match="missing_run"):
        report(bench, tmp_path / "r", tmp_path / "missing_run")
    (tmp_path / "other.json").write_text(json.dumps({"loss": 1.0}))
    with pytest.raises(SystemExit, match="other.json"):
        report(bench, tmp_path / "r", tmp_path / "other.json")


def test_collective_counter_sees_ddp_buckets_and_buffer_broadcast():
    """One-process gloo group: DDP still all-reduces each gradient bucket and broadcasts buffers every forward."""
    import torch.distributed as dist

    from modeling.benchmarks import throughput

    original = dist.all_reduce
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 300), torch.nn.BatchNorm1d(300), torch.nn.Linear(300, 4))
        # a 0.001 MB cap puts each parameter tensor (>= 4 x 300 floats) in its own bucket after the first step
        ddp = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=0.001)
        throughput.count_gradient_buckets(ddp)
        with throughput.CollectiveCounter() as counter:
            ddp(torch.randn(8, 4)).sum().backward()  # first step: DDP rebuilds its buckets afterwards
            before = counter.counts.copy()
            for _ in range(2):
                ddp(torch.randn(8, 4)).sum().backward()
            per_step = {k: v / 2 for k, v in (counter.counts - before).items()}
        # gradients stay right through the rerouted hook: d(sum of 8 x 4 outputs)/d(last bias) = 8 per output
        model.zero_grad()
        ddp(torch.randn(8, 4)).sum().backward()
        assert torch.equal(model[2].bias.grad, torch.full((4,), 8.0))
    finally:
        dist.destroy_process_group()
    assert dist.all_reduce is original  # the counter restored torch.distributed
    assert per_step["_broadcast_coalesced"] == 1  # BN buffers, once per forward
    assert 2 <= per_step["all_reduce"] <= 6  # 6 parameter tensors, some possibly sharing a bucket
    # by kind, with the bytes each rank sends, in the 3 counted steps: the 300-channel BN's buffers (2 x 300 floats
    # + one int64 count) and every gradient (4 x 300 + 300, 2 x 300, 300 x 4 + 4 floats) once per step
    assert counter.calls["buffer_broadcast"] == 3 and counter.bytes["buffer_broadcast"] == 3 * (600 * 4 + 8)
    assert counter.bytes["gradient_buckets"] == 3 * 4 * (1200 + 300 + 600 + 1200 + 4)
    assert counter.calls["gradient_buckets"] == counter.counts["all_reduce"] and not counter.calls["other"]


def test_collective_kinds_and_bytes_come_from_the_caller():
    from modeling.benchmarks.throughput import collective_kind, payload_bytes

    assert collective_kind("all_gather_single", "/repo/modeling/sync_batchnorm.py") == "batchnorm_forward"
    assert collective_kind("all_reduce", "/site-packages/torch/nn/modules/_functions.py") == "batchnorm_backward"
    assert collective_kind("all_reduce", "/repo/modeling/reliability.py") == "other"
    x = torch.zeros(37, dtype=torch.float32)
    assert payload_bytes("all_gather_single", (torch.zeros(74), x), {}) == 148  # what this rank sends
    assert payload_bytes("all_reduce", (x,), {}) == payload_bytes("all_reduce", (), {"tensor": x}) == 148
    assert payload_bytes("_broadcast_coalesced", (None, [x, torch.zeros(2, dtype=torch.long)], 1, 0), {}) == 164


def test_counting_collectives_is_opt_in(bench):
    # counting reroutes DDP's C++ gradient all-reduce through a Python hook: the default must time the real path
    parse = bench.get_args_parser().parse_args
    assert parse(["throughput", "--synthetic_input"]).count_collectives is False
    assert parse(["throughput", "--synthetic_input", "--count_collectives"]).count_collectives is True
    with pytest.raises(SystemExit):
        parse(["throughput", "--synthetic_input", "--no_count_collectives"])  # the old opt-out is gone


# ------------------------------------------------------------------------------------- through the real launcher
TINY = ["--crop_size", "64", "128", "--batch_size", "1", "--warmup", "1", "--iters", "2"]


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """Two `accelerate launch` runs started together: random input (channels_last, collectives counted), and the
    fast data path (the default: not counted)."""
    from data.prepare import prepare_cityscapes
    from data.synthetic import generate_cityscapes

    tmp = tmp_path_factory.mktemp("throughput")
    root = generate_cityscapes(tmp / "cs", num_train=2, num_val=1, num_test=0, height=128, width=256)
    prepare_cityscapes(root)  # labelTrainIds; the fast path builds its cache itself
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_cpu_threads_per_process", "1",
              "--config_file", str(REPO / "accelerate_configs" / "cpu.yaml"), str(SCRIPT), "throughput", *TINY]
    # counting collectives is opt-in: the synthetic run counts them, the fast one runs DDP untouched (null)
    commands = {"synthetic": [*launch, "--synthetic_input", "--channels_last", "--count_collectives"],
                "fast": [*launch, "--data_root", str(root), "--num_workers", "0"]}
    processes = {name: subprocess.Popen([*command, "--out", str(tmp / f"{name}.json")], cwd=tmp,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for name, command in commands.items()}
    for name, process in processes.items():
        output = process.communicate(timeout=600)[0]
        assert process.returncode == 0, f"{name}:\n{output[-3000:]}"
    return {name: json.loads((tmp / f"{name}.json").read_text()) for name in commands} | {"dir": tmp}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["synthetic", "fast"])
def test_throughput_json(launched, name):
    result = launched[name]
    assert result["mode"] == "throughput" and result["input"] == name
    assert result["num_processes"] == 1 and result["mixed_precision"] == "no"
    assert result["global_batch"] == result["batch_size"] * result["num_processes"] == 1
    assert result["crop_size"] == [64, 128] and result["iters"] == 2 and result["warmup"] == 1
    assert result["channels_last"] is (name == "synthetic") and result["compile"] is False
    assert result["images_per_sec"] > 0 and result["s_per_iter"] > 0
    assert result["images_per_sec"] == pytest.approx(result["global_batch"] / result["s_per_iter"])
    assert 0 <= result["data_wait_s"] < result["s_per_iter"]
    assert result["data_wait_pct"] == pytest.approx(100 * result["data_wait_s"] / result["s_per_iter"])
    if name == "synthetic":  # --count_collectives; one process: none
        assert result["collectives_per_step"] == 0 and result["collectives_by_name"] == {}
    else:  # not asked for: null, and the report reads it
        assert result["collectives_per_step"] is result["collectives_by_name"] is None
        assert result["collectives_by_kind"] is result["collective_bytes_per_step"] is None
    assert result["host_syncs_per_step"] is None  # CUDA only
    assert result["peak_memory_gib"] > 0 and result["sync_batchnorm"] == "off"
    assert 0 < result["loss_mean"] < 10  # cross-entropy of 19 classes from random weights: about ln 19 = 2.9
    assert result["first_iteration_s"] > 0 and result["compiled"] is None  # compile figures: --compile only
    assert result["device"].startswith("CPU") and result["environment"]["torch"] == torch.__version__


@pytest.mark.slow
def test_report_over_throughput_runs(bench, launched, runs, tmp_path):
    files = [launched["dir"] / "synthetic.json", launched["dir"] / "fast.json"]
    results = report(bench, tmp_path / "report", *files, runs[1])
    rows = {row["run"]: row for row in results["runs"]}
    assert rows["synthetic"]["source"] == rows["fast"]["source"] == "throughput"
    assert rows["synthetic"]["batchnorm"] == "BN"  # one process: never SyncBN
    assert rows["synthetic"]["images_per_sec"] == launched["synthetic"]["images_per_sec"]
    assert rows["synthetic"]["setting"] == "batch 1/process, crop 64x128, synthetic input, channels_last"
    assert rows["fast"]["speedup"] == pytest.approx(1.0)  # a 1-process run is its own baseline
    assert rows["fp32_8gpu"]["speedup"] is None  # a train run is never compared with a throughput run
    seed = {(t["gpu_count"], t["precision"]): t for t in results["seed_table"]}
    assert seed[1, "fp32"]["run"] == "synthetic" and seed[8, "fp32"]["run"] == "fp32_8gpu"
    assert (tmp_path / "report" / "images_per_sec.png").read_bytes()[:8] == PNG_MAGIC
    section = (tmp_path / "report" / "report.md").read_text().split("## Throughput runs")[1]
    fast = launched["fast"]
    assert table_line(section, "| fast |") == [
        "fast", fast["device"], "1", "fp32", "1", "False", "False", "fast", "BN", f"{fast['images_per_sec']:.2f}",
        f"{fast['s_per_iter']:.2f}", f"{fast['data_wait_pct']:.2f}", f"{fast['peak_memory_gib']:.2f}", "-", "-"]
    assert table_line(section, "| synthetic |")[-1] == "0"


# ------------------------------------------------------------------------------------------------------ inference
@pytest.fixture(scope="module")
def inference_json(bench, tmp_path_factory):
    """benchmark.py inference on the CPU at 64x128: whole and slide (two 64x64 crops), batch 1 and 2."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    out = tmp_path_factory.mktemp("inference") / "inference.json"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = bench.main(bench.get_args_parser().parse_args([
            "inference", "--cpu", "--mixed_precision", "no", "--input_size", "64", "128", "--modes", "whole", "slide",
            "--batch_size", "2", "--warmup", "1", "--iters", "2", "--crop_size", "64", "64", "--stride", "64", "64",
            "--out", str(out)]))
    finally:
        torch.set_num_threads(threads)
    return out, results


def test_inference_rows(inference_json):
    out, results = inference_json
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    assert results["mode"] == "inference" and results["device"].startswith("CPU") and results["input_size"] == [64, 128]
    assert results["predict_options"]["crop_size"] == [64, 64] and results["iters"] == 2
    rows = results["rows"]
    assert [(r["mode"], r["batch_size"]) for r in rows] == [("whole", 1), ("whole", 2), ("slide", 1), ("slide", 2)]
    for row in rows:
        assert row["precision"] == "fp32" and row["channels_last"] is False and row["compile"] is False
        assert row["images_per_sec"] > 0 and row["peak_memory_gib"] > 0
        assert 0 < row["ms_per_image_p50"] <= row["ms_per_image_p90"]
        # two timed calls: images/s and the mean time per image are the same measurement
        assert row["images_per_sec"] == pytest.approx(1000.0 / row["ms_per_image_mean"])


def test_report_lists_the_inference_rows(bench, inference_json, runs, tmp_path):
    out, results = inference_json
    report_results = report(bench, tmp_path / "report", out, runs[0])
    assert [r["run"] for r in report_results["runs"]] == ["fp32_1gpu"]  # not a training run
    assert len(report_results["inference_runs"]) == 4
    section = (tmp_path / "report" / "report.md").read_text().split("## Inference runs")[1]
    slide = results["rows"][3]
    assert table_line(section, "| inference | CPU") == [
        "inference", results["device"], "whole", "64", "128", "1", "fp32", "False", "False",
        f"{results['rows'][0]['images_per_sec']:.2f}", *(f"{results['rows'][0][k]:.2f}" for k in (
            "ms_per_image_mean", "ms_per_image_p50", "ms_per_image_p90", "peak_memory_gib"))]
    assert f"| slide | 64 | 128 | 2 | fp32 | False | False | {slide['images_per_sec']:.2f} |" in section


def test_inference_refuses_fp16_on_the_cpu_and_a_stride_beyond_the_crop(bench):
    from accelerate.state import AcceleratorState

    for argv, expected in ((["--mixed_precision", "fp16"], "fp16, which runs on GPUs only"),
                           (["--crop_size", "32", "32", "--stride", "64", "32"], "--stride 64 32 is larger")):
        AcceleratorState._reset_state(reset_partial_state=True)
        with pytest.raises(SystemExit, match=expected):
            bench.main(bench.get_args_parser().parse_args(["inference", "--cpu", *argv]))


# ------------------------------------------------------------------------------------------------------------ loop
def test_loop_mode_times_both_loops_and_profiles_them(bench, tmp_path):
    # our iteration vs the plain PyTorch loop on the CPU at a tiny crop: the JSON's ratio is the median of the
    # per-repetition ratios of its own block times, and the profile says where a step's time goes
    out = tmp_path / "loop.json"
    argv = ["loop", "--cpu", "--mixed_precision", "no", "--batch_size", "1", "--crop_size", "64", "128",
            "--warmup", "1", "--iters", "1", "--reps", "3", "--profile", "--out", str(out)]
    result = bench.main(bench.get_args_parser().parse_args(argv))
    assert json.loads(out.read_text())["ratio_ours_to_plain"] == result["ratio_ours_to_plain"]
    blocks = result["block_seconds"]
    assert len(blocks["plain"]) == len(blocks["ours"]) == 3
    ratios = sorted(p / o for p, o in zip(blocks["plain"], blocks["ours"], strict=True))
    assert result["ratio_ours_to_plain"] == pytest.approx(ratios[1])
    for name in ("plain", "ours"):
        assert result["images_per_sec"][name] == pytest.approx(3 / sum(blocks[name]))
        profile = result["profile_per_step"][name]
        assert profile["kernels"] == 0 and profile["device_busy_ms"] == 0  # no device kernels on the CPU
        assert 0 < profile["host_op_ms"] and 0 < profile["wall_ms"]
        assert any("conv" in key for key, _, _ in profile["top_host"])


def test_host_sync_sites_name_the_lines(monkeypatch):
    # torch attributes each "synchronizing CUDA operation" warning to the Python line that made the call
    import warnings

    from modeling.benchmarks.throughput import host_sync_sites

    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda mode: None)

    def work():
        for _ in range(2):
            warnings.warn("called a synchronizing CUDA operation", UserWarning, stacklevel=1)  # first site, twice
        warnings.warn("called a synchronizing CUDA operation", UserWarning, stacklevel=1)  # second site
        warnings.warn("something else", UserWarning, stacklevel=1)

    sites = host_sync_sites(work)
    line = work.__code__.co_firstlineno
    assert sites == {f"{__file__}:{line + 2}": 2, f"{__file__}:{line + 3}": 1}
