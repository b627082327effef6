"""HRNet-W18 + FCN head, parameter for parameter the reference fcn_hr18 network (docs/recipe.md sections 2 and 3).

    config = HRNetFCNConfig()                       # 19 Cityscapes classes, reference loss and fuse upsampling
    model = HRNetFCNForSemanticSegmentation(config)
    out = model(pixel_values, labels=labels)        # out.logits at 1/4 of the input size, out.loss
    model.save_pretrained(folder)                   # weights, config and this file: loads without this repository

This file is self-contained on purpose: both classes are registered for transformers' Auto classes, so
`save_pretrained` copies this file into the saved folder and `AutoModelForSemanticSegmentation.from_pretrained(
folder, trust_remote_code=True)` runs it there, where this repository is not importable. It imports torch, timm
and transformers only (pretrained backbones: modeling/pretrained.py).

The backbone is timm's `hrnet_w18` features model (the four raw branches, 18/36/72/144 channels at strides
4/8/16/32); only its fusion is changed: lower-resolution branches are upsampled bilinearly (align_corners=False)
to the target branch's size, as the reference does, where timm upsamples with nearest. Module names equal the
reference checkpoint keys: `backbone.*` (timm's names are the reference's) and `decode_head.*` (mmseg's FCNHead).

Accepted inputs: float `pixel_values` of shape Bx3xHxW with H, W >= 32, any size, not only multiples of 32
(branch sizes are ceil(H/4), ceil(H/8), ... and each fused branch is resized to its target's exact size, as in the
reference). Logits come out at ceil(H/4) x ceil(W/4). `labels`: integer BxH'xW' (any H'xW', the
logits are upsampled to it), values in [0, num_labels) or `ignore_index`; values outside are not checked (that
would cost a device sync per step) and make cross-entropy fail.
"""

import timm
import torch
import torch.nn.functional as F
from timm.models.hrnet import HighResolutionModule
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import SemanticSegmenterOutput

BACKBONE = "hrnet_w18"
OUT_INDICES = (1, 2, 3, 4)  # the four branches; index 0 would be the stride-2 stem
MIN_INPUT_SIZE = 32  # one pixel in the stride-32 branch
IGNORE_INDEX = 255
# The 19 Cityscapes training classes in trainId order. Written out here because a saved folder runs this file
# without data/labels.py (which reads them from cityscapesscripts); tests/test_model.py checks the two agree.
CITYSCAPES_CLASSES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
                      "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
                      "motorcycle", "bicycle")


class HRNetFCNConfig(PretrainedConfig):
    """Configuration of HRNetFCNForSemanticSegmentation. Defaults reproduce the reference.

    num_labels: 19 by default (Cityscapes trainIds, their names in `id2label`).
    ignore_index: label value excluded from the loss (255).
    loss_average: "all" = mean over all label pixels, ignored ones included with loss 0 (the reference);
        "valid" = mean over non-ignored pixels (PyTorch's default; 0 instead of NaN when every pixel is ignored).
    fuse_upsample: "bilinear" (the reference, align_corners=False) or "nearest" (timm's hrnet_w18).
    """

    model_type = "hrnet_fcn"
    ignore_index: int = IGNORE_INDEX
    loss_average: str = "all"
    fuse_upsample: str = "bilinear"

    def __post_init__(self, **kwargs):
        if self.id2label is None:  # default: the 19 Cityscapes classes; another count gets generic names
            num_labels = kwargs.pop("num_labels", len(CITYSCAPES_CLASSES))
            self.id2label = dict(enumerate(CITYSCAPES_CLASSES)) if num_labels == len(CITYSCAPES_CLASSES) else {
                i: f"LABEL_{i}" for i in range(num_labels)}
        super().__post_init__(**kwargs)
        if self.label2id is None:
            self.label2id = {name: i for i, name in self.id2label.items()}
        if self.loss_average not in ("all", "valid"):
            raise ValueError(f"loss_average: expected 'all' or 'valid', got {self.loss_average!r}")
        if self.fuse_upsample not in ("bilinear", "nearest"):
            raise ValueError(f"fuse_upsample: expected 'bilinear' or 'nearest', got {self.fuse_upsample!r}")


# ------------------------------------------------------------------------------------------------------ backbone
class _BilinearUpsample(nn.Module):
    """The reference's fuse-layer upsampling: bilinear, align_corners=False, to size * factor (an integer)."""

    def __init__(self, scale_factor: int):
        super().__init__()
        self.scale_factor = scale_factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # no int(): the product stays symbolic when tracing, so an ONNX export with dynamic H, W keeps it
        size = [s * self.scale_factor for s in x.shape[-2:]]
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)

    def extra_repr(self) -> str:
        return f"scale_factor={self.scale_factor}"


class _SizedFuseHRModule(HighResolutionModule):
    """timm's HRNet module whose fusion resizes every upsampled branch to the target branch's exact size.

    A fuse layer sees one branch only, so the target size is known here, in the sum. As in the reference, branch
    j > i goes through its fuse layer (conv1x1, BN, upsampling by 2**(j-i)) and is then resized to branch i's size.
    That second resize only changes anything when the input is not a multiple of 32 (elsewhere the sizes already
    match and it is skipped: at equal sizes it is the identity); timm's own forward fails on such inputs.
    `fuse_upsample` ("bilinear" or "nearest") is set on each instance by `create_backbone`.
    """

    fuse_upsample: str

    def forward(self, x: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.num_branches == 1:
            return [self.branches[0](x[0])]
        x = [branch(t) for branch, t in zip(self.branches, x, strict=True)]
        fused = []
        for i, fuse_outer in enumerate(self.fuse_layers):
            y = None
            for j, fuse in enumerate(fuse_outer):
                t = fuse(x[j])
                if j > i and t.shape[-2:] != x[i].shape[-2:]:
                    align = {"align_corners": False} if self.fuse_upsample == "bilinear" else {}
                    t = F.interpolate(t, size=x[i].shape[-2:], mode=self.fuse_upsample, **align)
                y = t if y is None else y + t
            fused.append(self.fuse_act(y))
        return fused


def create_backbone(fuse_upsample: str = "bilinear") -> nn.Module:
    """timm's hrnet_w18 features model (4 branches, 9,562,260 parameters) with the reference's fusion."""
    backbone = timm.create_model(BACKBONE, pretrained=False, features_only=True, feature_location="",
                                 out_indices=OUT_INDICES)
    for module in backbone.modules():
        if not isinstance(module, HighResolutionModule):
            continue
        # Swapping the class replaces only `forward`; parameters, names and timm's other code stay as they are.
        module.__class__ = _SizedFuseHRModule
        module.fuse_upsample = fuse_upsample
        if fuse_upsample == "bilinear" and module.num_branches > 1:
            for i, fuse_outer in enumerate(module.fuse_layers):
                for j in range(i + 1, len(fuse_outer)):
                    if not isinstance(fuse_outer[j][2], nn.Upsample):  # guards against a change in timm's layout
                        raise RuntimeError(f"timm {timm.__version__}: unexpected hrnet fuse layer {fuse_outer[j]}")
                    fuse_outer[j][2] = _BilinearUpsample(2 ** (j - i))
    return backbone


# ---------------------------------------------------------------------------------------------------------- head
class ConvBNReLU(nn.Module):
    """mmcv's ConvModule as the reference head uses it: conv without bias, BN, ReLU (keys conv.*, bn.*)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.activate = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.bn(self.conv(x)))


class FCNHead(nn.Module):
    """The reference FCN head: resize_concat of the branches (270 ch), conv1x1+BN+ReLU, conv1x1 to the classes."""

    def __init__(self, in_channels: list[int], num_labels: int):
        super().__init__()
        channels = sum(in_channels)
        self.convs = nn.ModuleList([ConvBNReLU(channels, channels)])
        self.conv_seg = nn.Conv2d(channels, num_labels, kernel_size=1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        size = features[0].shape[-2:]
        resized = [F.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in features[1:]]
        x = torch.cat([features[0], *resized], dim=1)
        for conv in self.convs:
            x = conv(x)
        return self.conv_seg(x)


def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                      average: str = "all") -> torch.Tensor:
    """Cross-entropy of logits upsampled (bilinear, align_corners=False) to the label size, in float32.

    average="all" divides by every label pixel, ignored ones included (the reference); "valid" by the non-ignored
    pixels only (PyTorch's reduction="mean"), 0 when there are none.
    """
    logits = F.interpolate(logits.float(), size=labels.shape[-2:], mode="bilinear", align_corners=False)
    per_pixel = F.cross_entropy(logits, labels.long(), ignore_index=ignore_index, reduction="none")
    if average == "all":
        return per_pixel.mean()
    return per_pixel.sum() / (labels != ignore_index).sum().clamp(min=1)


def _check_inputs(pixel_values: torch.Tensor, labels: torch.Tensor | None) -> None:
    if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
        raise ValueError(f"pixel_values: expected a Bx3xHxW tensor, got shape {tuple(pixel_values.shape)}")
    if not pixel_values.is_floating_point():
        raise ValueError(f"pixel_values: expected normalized floats, got {pixel_values.dtype}")
    if min(pixel_values.shape[-2:]) < MIN_INPUT_SIZE:
        raise ValueError(f"pixel_values: H and W must be at least {MIN_INPUT_SIZE}, got "
                         f"{pixel_values.shape[-2]}x{pixel_values.shape[-1]}")
    if labels is not None and (labels.ndim != 3 or labels.shape[0] != pixel_values.shape[0]
                               or labels.is_floating_point()):
        raise ValueError(f"labels: expected an integer BxHxW tensor with B={pixel_values.shape[0]}, got "
                         f"{labels.dtype} of shape {tuple(labels.shape)}")


# --------------------------------------------------------------------------------------------------------- model
class HRNetFCNForSemanticSegmentation(PreTrainedModel):
    """HRNet-W18 backbone (timm) + FCN head; 9,640,849 parameters for 19 classes."""

    config_class = HRNetFCNConfig
    base_model_prefix = "hrnet_fcn"  # no base-model attribute: checkpoint keys are used as they are
    main_input_name = "pixel_values"
    input_modalities = ("image",)

    def __init__(self, config: HRNetFCNConfig):
        super().__init__(config)
        self.backbone = create_backbone(config.fuse_upsample)
        self.decode_head = FCNHead(self.backbone.feature_info.channels(), config.num_labels)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        # The reference's (and timm's) init. transformers calls this on every module in post_init and on the
        # modules whose weights a checkpoint lacked in from_pretrained; its init functions skip tensors already
        # loaded, so loaded and pretrained weights are never overwritten.
        if module is self.decode_head.conv_seg:
            init.normal_(module.weight, mean=0.0, std=0.01)
            init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):
            init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            init.zeros_(module.running_mean)
            init.ones_(module.running_var)
            init.zeros_(module.num_batches_tracked)

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None,
                return_dict: bool | None = None) -> SemanticSegmenterOutput | tuple:
        _check_inputs(pixel_values, labels)
        logits = self.decode_head(self.backbone(pixel_values))
        loss = None
        if labels is not None:
            loss = segmentation_loss(logits, labels, self.config.ignore_index, self.config.loss_average)
        if not (self.config.return_dict if return_dict is None else return_dict):
            return (logits,) if loss is None else (loss, logits)
        return SemanticSegmenterOutput(loss=loss, logits=logits)


# save_pretrained writes this file beside the weights and an `auto_map` into config.json, so that transformers'
# Auto classes (and the image-segmentation pipeline) load the folder with trust_remote_code=True.
HRNetFCNConfig.register_for_auto_class()
HRNetFCNForSemanticSegmentation.register_for_auto_class("AutoModelForSemanticSegmentation")
