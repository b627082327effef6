"""Benchmarks: each mode measures one thing side by side in one run and prints/writes JSON.

    python scripts/benchmark.py data --out out/bench_data.json        # CPU cost per training sample
    python scripts/benchmark.py model --out out/bench_model.json      # our model vs the bare timm backbone
    python scripts/benchmark.py metric --out out/bench_metric.json    # streaming mIoU vs evaluate's way
    accelerate launch scripts/benchmark.py throughput ...             # the real training step, images/s
    python scripts/benchmark.py loop --mixed_precision bf16           # our loop vs a plain PyTorch loop
    python scripts/benchmark.py inference --out out/bench_inf.json    # prediction images/s and latency
    python scripts/benchmark.py report RUN_DIR... --out_dir D         # the benchmark table and plots

Each mode lives in modeling/benchmarks/<mode>.py. Results go to BENCHMARKS.md with the command, the machine and
the date.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse

from modeling import strict_json
from modeling.benchmarks import data, inference, loop, metric, model, report, throughput
from modeling.cli import HelpFormatter


def main(args) -> dict:
    results = args.run(args)
    if args.out and results is not None:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(strict_json.dumps(results, indent=2))
    return results


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    modes = parser.add_subparsers(dest="mode", required=True)
    for name, module, help_text in [
        ("data", data, "CPU cost per training sample: the reference pipeline from PNGs vs the fast path"),
        ("model", model, "forward+backward time of our model vs the bare timm backbone (CPU)"),
        ("metric", metric, "CPU time per image of the streaming mIoU vs evaluate's mean_iou"),
        ("throughput", throughput, "images/s of the real training step (under accelerate launch)"),
        ("loop", loop, "our training iteration vs a plain PyTorch loop of the same model, as a ratio"),
        ("inference", inference, "images/s and latency per image of whole/slide/aug prediction, synthetic input"),
        ("report", report, "the benchmark table (ours beside the reference) and plots from runs' JSON"),
    ]:
        sub = modes.add_parser(name, help=help_text, description=module.__doc__, formatter_class=HelpFormatter)
        sub.set_defaults(run=module.run)
        sub.add_argument("--out", default=None, help="write the results JSON here")
        module.add_args(sub)
    return parser


if __name__ == "__main__":
    main(get_args_parser().parse_args())
