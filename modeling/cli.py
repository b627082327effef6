"""Small command-line helpers shared by the scripts: argparse `type=` checks and the fp16-on-CPU refusal.

    parser.add_argument("--batch_size", type=positive_int, default=1)
    parser.add_argument("--ratios", type=positive_float, nargs="+")

A bad value stops argparse with a one-line usage error naming the option, e.g.
`error: argument --stride: expected a positive integer, got 0`, before any work starts.
"""

import argparse
import math


def _number(text: str, kind, what: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1."""
    value = _number(text, int, "a positive integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """An integer >= 0."""
    value = _number(text, int, "an integer >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def finite_float(text: str) -> float:
    """A finite float (no nan, inf)."""
    return _number(text, float, "a finite number")


def positive_float(text: str) -> float:
    """A finite float > 0 (nan and inf are refused)."""
    value = _number(text, float, "a finite positive number")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a finite positive number, got {value:g}")
    return value


def seed_int(text: str) -> int:
    """A random seed: an integer in [0, 2**32) (numpy's and the DataLoader's range)."""
    value = _number(text, int, "an integer in [0, 2**32)")
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**32), got {value}")
    return value


def refuse_fp16_on_cpu(accelerator) -> None:
    """Accelerate has no fp16 autocast on the CPU and silently runs fp32: refuse rather than mislabel the run."""
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise SystemExit("error: the Accelerate config asks for mixed_precision fp16, which runs on GPUs only (on "
                         "the CPU Accelerate would silently run in fp32): use 'no' or 'bf16' (--mixed_precision, or "
                         "accelerate_configs/cpu.yaml)")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help with the docstring as written and every option's default ("(default: 80000)"); None/False and
    store_true options show none, and an option without a help text still shows its default."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)

    def _format_action(self, action):
        if action.help is None and action.option_strings and self._get_help_string(action) is not None:
            action = argparse.Action(action.option_strings, action.dest, nargs=action.nargs, default=action.default,
                                     metavar=action.metavar, help="(default: %(default)s)",
                                     choices=action.choices)
        return super()._format_action(action)
