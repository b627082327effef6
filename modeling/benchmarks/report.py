"""benchmark.py report: the seed table (ours beside the reference), all runs, throughput runs, inference runs and
the plots, from train.py's results.json files and throughput and inference JSONs."""

import argparse
import json
import math
from pathlib import Path

from data.labels import CLASS_NAMES
from modeling import strict_json
from modeling.cli import finite_float
from modeling.visualize import plot_class_iou, plot_images_per_sec, plot_miou_vs_time

# The reference's published figures: the AI-Rank benchmark, result_v0.1, HRNet_W18 PyTorch sample (mmsegmentation
# v0.11.0 on V100-SXM2-32GB, batch 2 per GPU, crop 512x1024). Time2train: wall seconds to the mIoU shown; the
# 1-GPU runs were measured for speed only.
REFERENCE_SOURCE = "AI-Rank result_v0.1, HRNet_W18 PyTorch sample: mmsegmentation v0.11.0 on V100-SXM2-32GB"
REFERENCE_RUNS = (
    {"gpu_count": 1, "precision": "fp32", "s_per_iter": 0.283, "images_per_sec": 7.00, "time_to_train_s": None,
     "miou_pct": None},
    {"gpu_count": 8, "precision": "fp32", "s_per_iter": 0.747, "images_per_sec": 20.88, "time_to_train_s": 57574.09,
     "miou_pct": 78.11},
    {"gpu_count": 1, "precision": "fp16", "s_per_iter": 0.380, "images_per_sec": 5.20, "time_to_train_s": None,
     "miou_pct": None},
    {"gpu_count": 8, "precision": "fp16", "s_per_iter": 0.883, "images_per_sec": 17.82, "time_to_train_s": 70489.24,
     "miou_pct": 78.46},
)
REFERENCE_SETTING = "batch 2/process, crop 512x1024"
# Time2train's target: the reference's 8-GPU fp32 mIoU, as a fraction (train.py's --target_miou scale)
REFERENCE_TARGET_MIOU = REFERENCE_RUNS[1]["miou_pct"] / 100
SEED_CONFIGS = ((1, "fp32"), (8, "fp32"), (1, "fp16"), (8, "fp16"))  # the seed table's rows, always shown
PRECISION_NAMES = {"no": "fp32"}  # Accelerate's mixed_precision value -> the table's name
# the JSONs' sync_batchnorm ("ours"/"torch"/"off"; older JSONs: a bool) -> the table's BN column
BATCHNORM_NAMES = {"ours": "SyncBN (ours)", "torch": "SyncBN (torch)", "off": "BN", True: "SyncBN", False: "BN"}
# what `report` shows of a throughput JSON, beside the fields every run has
THROUGHPUT_FIELDS = ("batch_size", "channels_last", "compile", "input", "s_per_iter", "data_wait_pct",
                     "peak_memory_gib", "host_syncs_per_step", "collectives_per_step")

def load_run(path) -> dict:
    """{"name", "path", "data"} of RUN_DIR/results.json, a results.json, or a throughput or inference JSON."""
    path = Path(path)
    file = path / "results.json" if path.is_dir() else path
    if not file.is_file():
        raise SystemExit(f"error: {path}: expected a run directory holding results.json, or a results.json or "
                         "throughput JSON file")
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as error:
        raise SystemExit(f"error: {file}: not readable as JSON ({error})") from None
    if not isinstance(data, dict) or not {"num_processes", "images_per_sec", "eval_log", "rows"} & data.keys():
        raise SystemExit(f"error: {file}: neither scripts/train.py's results.json nor a throughput or inference "
                         "JSON (none of num_processes, images_per_sec, eval_log, rows)")
    name = file.parent.name if file.name == "results.json" else file.stem
    return {"name": name, "path": str(file), "data": data}


def time_to_train(eval_log, target: float) -> tuple:
    """(wall_s, mean_iou) of the first evaluation in the log with mean_iou >= target (fractions), else (None, None)."""
    for entry in eval_log or []:
        miou = entry.get("mean_iou")
        if miou is not None and miou >= target:  # NaN never passes
            return entry.get("wall_s"), miou
    return None, None


def percent(value):
    return None if value is None else 100.0 * value


def run_row(run: dict, target_miou) -> dict:
    """One table row from a run's JSON; anything missing is None ('-' in the table)."""
    data = run["data"]
    processes, global_batch = data.get("num_processes"), data.get("global_batch")
    per_process = global_batch // processes if global_batch and processes else None
    row = {"run": run["name"], "path": run["path"], "gpu_count": processes,
           "precision": PRECISION_NAMES.get(data.get("mixed_precision"), data.get("mixed_precision")),
           "global_batch": global_batch, "images_per_sec": data.get("images_per_sec"),
           "device": (data.get("environment") or {}).get("device", data.get("device"))}
    if data.get("mode") == "throughput":
        crop = data.get("crop_size") or ["?", "?"]
        extras = [flag for flag in ("channels_last", "compile") if data.get(flag)]
        setting = f"batch {data.get('batch_size')}/process, crop {crop[0]}x{crop[1]}, {data.get('input')} input"
        return {**row, "source": "throughput", "setting": ", ".join([setting, *extras]),
                "batchnorm": BATCHNORM_NAMES.get(data.get("sync_batchnorm")), "target_miou_pct": None,
                "time_to_train_s": None, "miou_pct": None, "best_miou_pct": None, "final_miou_pct": None,
                "per_class_iou": None, "throughput": {key: data.get(key) for key in THROUGHPUT_FIELDS}}
    target = target_miou if target_miou is not None else data.get("target_miou") or REFERENCE_TARGET_MIOU
    wall_s, miou = time_to_train(data.get("eval_log"), target)
    if "eval_log" not in data and target == data.get("target_miou"):  # no log: trust the run's own figure
        wall_s = data.get("time_to_train_s")
    metrics = data.get("best_metrics") or data.get("final_metrics") or {}
    # train.py writes sync_batchnorm; before it did, SyncBN (torch's) ran iff CUDA and > 1 process
    device_type = (data.get("environment") or {}).get("device_type")
    batchnorm = BATCHNORM_NAMES.get(data.get("sync_batchnorm"))
    if batchnorm is None and device_type is not None and processes is not None:
        batchnorm = "SyncBN (torch)" if device_type == "cuda" and processes > 1 else "BN"
    return {**row, "source": "train", "setting": f"batch {per_process}/process" if per_process else None,
            "throughput": None,
            "batchnorm": batchnorm,
            "target_miou_pct": percent(target), "time_to_train_s": wall_s, "miou_pct": percent(miou),
            "best_miou_pct": percent(data.get("best_miou")), "final_miou_pct": percent(data.get("final_miou")),
            "per_class_iou": strict_json.json_safe(metrics.get("per_category_iou"))}  # NaN: null


def add_speedups(rows: list) -> None:
    """speedup = images/s over that of the first 1-GPU row of the same source, precision and setting.

    A 1-GPU row is its own baseline (1.00), also when the same configuration was measured twice.
    """
    for row in rows:
        base = row if row["gpu_count"] == 1 else next(
            (r for r in rows if r["gpu_count"] == 1 and r["source"] == row["source"]
             and r["precision"] == row["precision"] and r["setting"] == row["setting"]), None)
        measured = base is not None and row["images_per_sec"] and base["images_per_sec"]
        row["speedup"] = row["images_per_sec"] / base["images_per_sec"] if measured else None
        row["scaling_pct"] = 100.0 * row["speedup"] / row["gpu_count"] if row["speedup"] else None


def reference_rows() -> list:
    rows = [{"run": "reference", "source": "reference", "setting": REFERENCE_SETTING, "device": "V100-SXM2-32GB",
             **ref} for ref in REFERENCE_RUNS]
    add_speedups(rows)
    return rows


def seed_table(rows: list, reference: list) -> list:
    """The seed's rows (1/8 GPU x fp32/fp16, then any other configuration measured), ours beside the reference.

    Ours is the first train.py run of that configuration, else the first throughput JSON; None when not measured.
    """
    others = {(r["gpu_count"], r["precision"]) for r in rows} - set(SEED_CONFIGS)
    table = []
    for gpus, precision in [*SEED_CONFIGS, *sorted(others, key=lambda c: (c[0] or 0, str(c[1])))]:
        candidates = [r for r in rows if (r["gpu_count"], r["precision"]) == (gpus, precision)]
        ours = next((r for r in candidates if r["source"] == "train"), candidates[0] if candidates else None)
        ref = next((r for r in reference if (r["gpu_count"], r["precision"]) == (gpus, precision)), None)
        fields = ("time_to_train_s", "images_per_sec", "miou_pct", "speedup")
        table.append({"gpu_count": gpus, "precision": precision, "run": ours and ours["run"],
                      **{k: ours and ours[k] for k in fields}, "reference": ref and {k: ref[k] for k in fields}})
    return table


def fmt(value, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown_table(header: list, lines: list) -> str:
    rows = [header, ["---"] * len(header), *[[fmt(v) for v in line] for line in lines]]
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def format_host_syncs(value) -> str | None:
    return None if not value else f"{value.get('data', '?')}, {value.get('step', '?')}"


def throughput_markdown(rows: list) -> str:
    """The throughput runs' figures, one line each: the columns of BENCHMARKS.md's GPU table."""
    measured = [r for r in rows if r["throughput"]]
    if not measured:
        return "No throughput JSON among the inputs."
    return markdown_table(
        ["run", "device", "GPU count", "precision", "batch/process", "channels_last", "compile", "input", "BN",
         "images/s", "s/iter", "data wait (%)", "peak memory (GiB)", "host syncs / step (data, step)",
         "collectives / step"],
        [[r["run"], r["device"], r["gpu_count"], r["precision"], t["batch_size"], t["channels_last"], t["compile"],
          t["input"], r["batchnorm"], r["images_per_sec"], t["s_per_iter"], t["data_wait_pct"],
          t["peak_memory_gib"], format_host_syncs(t["host_syncs_per_step"]), t["collectives_per_step"]]
         for r in measured for t in [r["throughput"]]])


def inference_markdown(runs: list) -> str:
    """The rows of the inference runs (benchmark.py inference JSONs), one line per configuration."""
    lines = [[run["name"], data["device"], row["mode"], data["input_size"][0], data["input_size"][1],
              row["batch_size"], row["precision"], row["channels_last"], row["compile"], row["images_per_sec"],
              row["ms_per_image_mean"], row["ms_per_image_p50"], row["ms_per_image_p90"], row["peak_memory_gib"]]
             for run in runs for data in [run["data"]] for row in data["rows"]]
    if not lines:
        return "No inference JSON among the inputs."
    return markdown_table(["run", "device", "mode", "H", "W", "batch", "precision", "channels_last", "compile",
                           "images/s", "ms/image mean", "ms/image p50", "ms/image p90", "peak memory (GiB)"], lines)


def report_markdown(table: list, rows: list, plots: dict, inference: list) -> str:
    fields = ("time_to_train_s", "images_per_sec", "miou_pct", "speedup")
    seed = markdown_table(
        ["GPU count", "precision", "run", "Time2train (s)", "images/s", "mIoU (%)", "speedup",
         "ref. Time2train (s)", "ref. images/s", "ref. mIoU (%)", "ref. speedup"],
        [[t["gpu_count"], t["precision"], t["run"], *(t[k] for k in fields),
          *((t["reference"] or {}).get(k) for k in fields)] for t in table])
    runs = markdown_table(
        ["run", "source", "GPU count", "precision", "setting", "BN", "global batch", "Time2train (s)", "images/s",
         "mIoU at Time2train (%)", "best mIoU (%)", "final mIoU (%)", "target (%)", "speedup", "scaling (%)",
         "device"],
        [[r["run"], r["source"], r["gpu_count"], r["precision"], r["setting"], r["batchnorm"], r["global_batch"],
          r["time_to_train_s"], r["images_per_sec"], r["miou_pct"], r["best_miou_pct"], r["final_miou_pct"],
          r["target_miou_pct"], r["speedup"], r["scaling_pct"], r["device"]] for r in rows])
    figures = "\n".join(f"![{name}]({Path(path).name})" for name, path in plots.items())
    return f"""# Benchmark report

## Seed table (ours beside the reference)

{seed}

Reference: {REFERENCE_SOURCE}, {REFERENCE_SETTING}. Time2train: wall
seconds until the first evaluation at or above the target mIoU (evaluations included). mIoU: that evaluation's.
Speedup: images/s over the 1-GPU run of the same precision, source and setting. '-': not measured or not reached.

## All runs

{runs}

## Throughput runs

{throughput_markdown(rows)}

s/iter and data wait: the slowest process's; data wait: host time spent getting the batches, as a share of the step
time; peak memory: CUDA max allocated on a GPU, the process's max resident set on the CPU; host syncs: counted once
after the clock with CUDA's sync debug mode (none on the CPU); collectives: torch.distributed calls per step.

## Inference runs

{inference_markdown(inference)}

ms/image: the time of one synchronised predict call (argmax included) divided by its batch size.

## Plots

{figures}
"""


def plot_report(runs: list, rows: list, reference: list, out_dir: Path) -> dict:
    """The report's figures that have data: {title: path}."""
    plots = {}
    logged = [(run, row) for run, row in zip(runs, rows, strict=True) if run["data"].get("eval_log")]
    if logged:
        curves = {f"{row['run']} ({row['gpu_count']}x {row['precision']})":
                  ([e.get("wall_s") for e in run["data"]["eval_log"]],
                   [percent(e.get("mean_iou")) for e in run["data"]["eval_log"]]) for run, row in logged}
        plots["mIoU vs wall time"] = plot_miou_vs_time(curves, [row["target_miou_pct"] for _, row in logged],
                                                       out_dir / "miou_vs_time.png")
    bars = [(f"{r['run']}\n{r['gpu_count']}x {r['precision']}", r["images_per_sec"], "tab:blue") for r in rows]
    bars += [(f"reference\n{r['gpu_count']}x {r['precision']}", r["images_per_sec"], "grey") for r in reference]
    plots["images/s per configuration"] = plot_images_per_sec([b for b in bars if b[1] is not None],
                                                              out_dir / "images_per_sec.png")
    measured = {r["run"]: r["per_class_iou"] for r in rows if r["per_class_iou"] is not None}
    if measured:
        plots["per-class IoU"] = plot_class_iou({run: [math.nan if v is None else v for v in ious]
                                                 for run, ious in measured.items()}, CLASS_NAMES,
                                                out_dir / "per_class_iou.png",
                                                title="Per-class IoU (best evaluation, else final)")
    return {name: str(path) for name, path in plots.items()}


def run(args) -> dict:
    """The seed table (Markdown + JSON) and plots from train.py results.json files and throughput JSONs; the rows
    of inference JSONs in their own table."""
    if args.target_miou is not None and not 0.0 <= args.target_miou <= 1.0:
        raise SystemExit(f"error: --target_miou is a fraction in [0, 1] like train.py's (78.11% -> 0.7811), "
                         f"got {args.target_miou}")
    loaded = [load_run(path) for path in args.runs]
    inference = [run for run in loaded if run["data"].get("mode") == "inference"]
    runs = [run for run in loaded if run["data"].get("mode") != "inference"]
    rows = [run_row(run, args.target_miou) for run in runs]
    add_speedups(rows)
    reference = reference_rows()
    table = seed_table(rows, reference)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = plot_report(runs, rows, reference, out_dir)
    (out_dir / "report.md").write_text(report_markdown(table, rows, plots, inference))
    results = {"mode": "report", "target_miou": args.target_miou, "seed_table": table, "runs": rows,
               "inference_runs": [{"run": run["name"], "path": run["path"], **row} for run in inference
                                  for row in run["data"]["rows"]],
               "reference": reference, "markdown": str(out_dir / "report.md"), "plots": plots}
    (out_dir / "report.json").write_text(strict_json.dumps(results, indent=2))
    print((out_dir / "report.md").read_text())
    return results


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN",
                        help="train.py output directories (holding results.json), or results, throughput or "
                        "inference JSON files")
    parser.add_argument("--out_dir", default="out/benchmark_report", help="report.md, report.json and the plots")
    parser.add_argument("--target_miou", type=finite_float, default=None,
                        help="Time2train's mIoU as a fraction (default: each run's own --target_miou, else 0.7811)")
