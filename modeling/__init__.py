"""The network (HRNet-W18 + FCN head on timm), its loss, and the metric.

The names below load their submodule on first use, so that `from modeling.metrics import MeanIoU` (or
modeling.checkpointing, modeling.visualize) does not import timm and transformers (~5 s).
"""

import importlib

_LAZY = {
    "DEFAULT_PRETRAINED": "modeling.pretrained",
    "HRNetFCNConfig": "modeling.hrnet_fcn",
    "HRNetFCNForSemanticSegmentation": "modeling.hrnet_fcn",
    "load_pretrained_backbone": "modeling.pretrained",
    "segmentation_loss": "modeling.hrnet_fcn",
    "convert_mmseg_state_dict": "modeling.convert",
    "apply_sync_batchnorm": "modeling.training",
    "SyncBatchNorm": "modeling.sync_batchnorm",
    "convert_sync_batchnorm": "modeling.sync_batchnorm",
    "revert_sync_batchnorm": "modeling.sync_batchnorm",
    "to_channels_last": "modeling.training",
}
__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'modeling' has no attribute {name!r}")
