"""The network (HRNet-W18 + FCN head on timm), its loss, and the metric."""

from modeling.convert import convert_mmseg_state_dict
from modeling.hrnet_fcn import (
    DEFAULT_PRETRAINED,
    HRNetFCNConfig,
    HRNetFCNForSemanticSegmentation,
    load_pretrained_backbone,
    segmentation_loss,
)
from modeling.utils import convert_to_sync_batchnorm, to_channels_last

__all__ = [
    "DEFAULT_PRETRAINED",
    "HRNetFCNConfig",
    "HRNetFCNForSemanticSegmentation",
    "convert_mmseg_state_dict",
    "convert_to_sync_batchnorm",
    "load_pretrained_backbone",
    "segmentation_loss",
    "to_channels_last",
]
