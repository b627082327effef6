"""Strict JSON for every file the project writes: NaN and infinities become null.

Python's json writes NaN (a class absent from the split, an undefined iIoU) as the bare word `NaN`, which jq,
JavaScript and most dashboards reject. So values are converted first (numpy arrays and scalars to plain Python,
non-finite floats to None) and json.dumps runs with allow_nan=False, so nothing non-standard can slip through.
Readers get None where a value is undefined; the project's readers also accept files written with NaN.

    path.write_text(dumps(results, indent=2))
"""

import json
import math

import numpy as np


def json_safe(obj):
    """obj with numpy values as plain Python, tuples as lists and NaN/inf floats as None (recursively)."""
    if isinstance(obj, dict):
        return {key: json_safe(value) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(value) for value in obj]
    if isinstance(obj, np.ndarray | np.generic):
        return json_safe(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def dumps(obj, indent: int | None = None) -> str:
    """json.dumps of json_safe(obj): strict JSON (null for NaN/inf), or ValueError for anything else non-JSON."""
    return json.dumps(json_safe(obj), indent=indent, allow_nan=False)
