"""Reference (mmsegmentation fcn_hr18) checkpoints -> HRNetFCNForSemanticSegmentation state dicts.

The reference keys are `backbone.<name>` (mmseg's HRNet, whose 1830 names and shapes are those of timm's
hrnet_w18 features model) and `decode_head.{convs.0.conv, convs.0.bn, conv_seg}.*` (mmseg's FCNHead). Our
modules carry the same names, so the mapping renames nothing: what it does is refuse anything that does not fit.
"""

import torch

from modeling.hrnet_fcn import HRNetFCNConfig, HRNetFCNForSemanticSegmentation
from modeling.weights import check_state_dict

_REFERENCE_PREFIXES = {"backbone.": "backbone.", "decode_head.": "decode_head."}  # reference -> ours


def expected_state_dict(config: HRNetFCNConfig) -> dict[str, torch.Tensor]:
    """The model's state dict as shapes only: built on the meta device, no memory, no initialisation."""
    with torch.device("meta"):
        return HRNetFCNForSemanticSegmentation(config).state_dict()


def convert_mmseg_state_dict(state_dict: dict, config: HRNetFCNConfig | None = None,
                             source: str = "reference state dict") -> dict[str, torch.Tensor]:
    """Map a reference state dict onto our model (`config`, default: 19 classes) and check it completely.

    Raises a ValueError naming `source` and listing every key outside `backbone.`/`decode_head.`, every missing
    key and every shape mismatch. Floating-point tensors are returned as float32 (the reference's fp16 runs may
    save half-precision weights); integer buffers (BN num_batches_tracked) keep their dtype.
    """
    converted = {}
    for key, value in state_dict.items():
        prefix = next((p for p in _REFERENCE_PREFIXES if key.startswith(p)), None)
        new_key = key if prefix is None else _REFERENCE_PREFIXES[prefix] + key.removeprefix(prefix)
        converted[new_key] = value.float() if value.is_floating_point() else value
    check_state_dict(converted, expected_state_dict(config or HRNetFCNConfig()), source)
    return converted
