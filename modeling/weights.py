"""Weight files (safetensors, or torch.save read with weights_only=True) and strict checks that they fit a model.

Kept apart from modeling/hrnet_fcn.py so that checking a checkpoint does not import timm and transformers.
"""

from pathlib import Path

import torch
from safetensors.torch import load_file

from modeling.errors import first_line

WEIGHT_FILE_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
_MAX_LISTED = 8  # offending keys an error message lists before it says "and N more"


def is_weights_file(source) -> bool:
    """The one rule that tells a weights file from a timm tag: a weights suffix, or an existing path."""
    return Path(source).suffix in WEIGHT_FILE_SUFFIXES or Path(source).exists()


def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    return shown + (f" and {len(keys) - _MAX_LISTED} more" if len(keys) > _MAX_LISTED else "")


def check_state_dict(state_dict: dict, expected: dict, source: str, allow_missing: tuple[str, ...] = ()) -> None:
    """Raise one ValueError naming `source` and every missing / unexpected key and shape mismatch.

    `expected` maps key -> tensor (or shape). Missing keys ending with a suffix in `allow_missing` are accepted.
    """
    missing = [k for k in expected if k not in state_dict and not k.endswith(allow_missing)]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [f"{k} {tuple(state_dict[k].shape)} vs expected {tuple(expected[k].shape)}"
                  for k in state_dict if k in expected and tuple(state_dict[k].shape) != tuple(expected[k].shape)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys ({_listed(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys ({_listed(unexpected)})")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches ({_listed(mismatched)})")
    if problems:
        raise ValueError(f"{source}: state dict does not fit the model: " + "; ".join(problems))


def read_weights_file(path) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors file or a torch.save file (read with weights_only=True).

    Training checkpoints are unwrapped: {"state_dict": ...} (mmcv/mmseg, whose "meta" and "optimizer" entries are
    not weights) or {"model": ...}. Raises FileNotFoundError / ValueError naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weights file (expected a .safetensors, .pth or .pt file)")
    if path.suffix == ".safetensors":
        return load_file(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle errors, disallowed globals, truncated files: all mean "unreadable"
        raise ValueError(f"{path}: cannot be read with torch.load(weights_only=True): {first_line(err)} (if you trust "
                         "the file, re-save only its state dict of tensors)") from err
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a state dict of tensors (or a dict with a 'state_dict' entry)")
    return obj
