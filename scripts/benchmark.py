"""Benchmarks: each mode measures one thing side by side in one run and prints/writes JSON.

    python scripts/benchmark.py data --out out/bench_data.json        # CPU cost per training sample
    python scripts/benchmark.py model --out out/bench_model.json      # our model vs the bare timm backbone
    python scripts/benchmark.py metric --out out/bench_metric.json    # streaming mIoU vs evaluate's way
    accelerate launch scripts/benchmark.py throughput ...             # the real training step, images/s
    python scripts/benchmark.py report RUN_DIR... --out_dir D         # the benchmark table and plots

Results go to BENCHMARKS.md with the command, the machine and the date.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


# ----------------------------------------------------------------------------------------------- data (issue 4)
def bench_data(args) -> dict:
    raise SystemExit("error: the data benchmark is not written yet")


def add_data_args(parser: argparse.ArgumentParser) -> None:
    pass


# ---------------------------------------------------------------------------------------------- model (issue 3)
def bench_model(args) -> dict:
    raise SystemExit("error: the model benchmark is not written yet")


def add_model_args(parser: argparse.ArgumentParser) -> None:
    pass


# --------------------------------------------------------------------------------------------- metric (issue 6)
def bench_metric(args) -> dict:
    raise SystemExit("error: the metric benchmark is not written yet")


def add_metric_args(parser: argparse.ArgumentParser) -> None:
    pass


# ------------------------------------------------------------------------------------- throughput, report (7)
def bench_throughput(args) -> dict:
    raise SystemExit("error: the throughput benchmark is not written yet")


def add_throughput_args(parser: argparse.ArgumentParser) -> None:
    pass


def bench_report(args) -> dict:
    raise SystemExit("error: the report is not written yet")


def add_report_args(parser: argparse.ArgumentParser) -> None:
    pass


# --------------------------------------------------------------------------------------------------------- main
def main(args) -> dict:
    results = args.run(args)
    if args.out and results is not None:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))
    return results


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    modes = parser.add_subparsers(dest="mode", required=True)
    for name, run, add_args in [
        ("data", bench_data, add_data_args),
        ("model", bench_model, add_model_args),
        ("metric", bench_metric, add_metric_args),
        ("throughput", bench_throughput, add_throughput_args),
        ("report", bench_report, add_report_args),
    ]:
        sub = modes.add_parser(name)
        sub.set_defaults(run=run)
        sub.add_argument("--out", default=None, help="write the results JSON here")
        add_args(sub)
    return parser


if __name__ == "__main__":
    main(get_args_parser().parse_args())
