"""Model helpers for training scripts: SyncBN conversion, channels_last, strict state-dict checks."""

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

# How many offending keys an error message lists before it says "and N more".
_MAX_LISTED = 8


def convert_to_sync_batchnorm(model: nn.Module, accelerator) -> nn.Module:
    """BatchNorm -> SyncBatchNorm when training on several CUDA processes (RECIPE.md section 5), else unchanged.

    Call it before `accelerator.prepare` (DDP must wrap the converted modules). SyncBatchNorm exists on CUDA only,
    and with one process it would only add overhead, so every other case is a no-op. The state dict keys stay the
    same, so checkpoints load either way.
    """
    if accelerator.device.type == "cuda" and accelerator.num_processes > 1:
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def to_channels_last(model: nn.Module) -> nn.Module:
    """Store conv weights NHWC (faster convolutions with cuDNN under AMP); feed inputs the same way."""
    return model.to(memory_format=torch.channels_last)


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type's name when the message is empty), for one-line errors."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def batch_to_device(batch: dict, device: torch.device) -> dict:
    """A loader batch with its tensors on `device` (asynchronous from pinned memory), other values as they are."""
    return {key: value.to(device, non_blocking=True) if torch.is_tensor(value) else value
            for key, value in batch.items()}


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
