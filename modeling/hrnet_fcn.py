"""HRNet-W18 + FCN head, parameter for parameter the reference fcn_hr18 network (docs/recipe.md sections 2 and 3).

    config = HRNetFCNConfig()                       # 19 Cityscapes classes, reference loss and fuse upsampling
    model = HRNetFCNForSemanticSegmentation(config)
    load_pretrained_backbone(model, "hrnet_w18.ms_in1k")      # or a local .safetensors / .pth / .pt file
    out = model(pixel_values, labels=labels)        # out.logits at 1/4 of the input size, out.loss

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

from pathlib import Path

import huggingface_hub
import timm
import torch
import torch.nn.functional as F
from timm.models.hrnet import HighResolutionModule
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import SemanticSegmenterOutput

from data.labels import ID2LABEL, IGNORE_INDEX, NUM_CLASSES
from modeling.errors import first_line
from modeling.weights import WEIGHT_FILE_SUFFIXES, check_state_dict, is_weights_file, read_weights_file

BACKBONE = "hrnet_w18"
OUT_INDICES = (1, 2, 3, 4)  # the four branches; index 0 would be the stride-2 stem
DEFAULT_PRETRAINED = "hrnet_w18.ms_in1k"  # the MSRA ImageNet weights the reference started from
MIN_INPUT_SIZE = 32  # one pixel in the stride-32 branch
# Keys of timm's (and MSRA's) classification checkpoints that the features model does not have.
_CLASSIFICATION_PREFIXES = ("incre_modules.", "downsamp_modules.", "final_layer.", "classifier.")


class HRNetFCNConfig(PretrainedConfig):
    """Configuration of HRNetFCNForSemanticSegmentation. Defaults reproduce the reference.

    num_labels: 19 by default (Cityscapes trainIds, names from cityscapesscripts in `id2label`).
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
            num_labels = kwargs.pop("num_labels", NUM_CLASSES)
            self.id2label = dict(ID2LABEL) if num_labels == NUM_CLASSES else {i: f"LABEL_{i}" for i in
                                                                             range(num_labels)}
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


# ---------------------------------------------------------------------------------------------------- pretrained
def _backbone_state_dict(state_dict: dict) -> tuple[dict, list[str]]:
    """Keep the backbone's keys, named as timm's features model; return them and the keys left out on purpose."""
    if any(k.startswith("backbone.") for k in state_dict):  # a reference checkpoint or one of our own models
        dropped = [k for k in state_dict if k.startswith(("decode_head.", "auxiliary_head."))]
        kept = {k.removeprefix("backbone."): v for k, v in state_dict.items() if k not in dropped}
    else:  # timm's or MSRA's classification layout
        dropped = [k for k in state_dict if k.startswith(_CLASSIFICATION_PREFIXES)]
        kept = {k: v for k, v in state_dict.items() if k not in dropped}
    return kept, dropped


def _check_timm_tag(tag: str) -> None:
    if tag not in timm.list_pretrained():
        raise ValueError(f"--pretrained_backbone {tag!r}: neither a weights file ({', '.join(WEIGHT_FILE_SUFFIXES)}), "
                         f"nor a timm pretrained tag such as {', '.join(timm.list_pretrained(BACKBONE + '.*'))}, "
                         "nor 'none'")


def check_pretrained_source(source: str) -> None:
    """'none', an existing local weights file, or a known timm pretrained tag; nothing is downloaded."""
    if source == "none":
        return
    if is_weights_file(source):
        if not Path(source).is_file():
            raise FileNotFoundError(f"--pretrained_backbone {source}: no such weights file")
        return
    _check_timm_tag(source)


HUB_PROBE_TIMEOUT = 5.0  # seconds: huggingface_hub itself retries an unreachable hub for about a minute


def _cached_hub_file(hub_id: str) -> str | None:
    """The tag's weights file if it is already in the Hugging Face cache (no network needed), else None."""
    for name in ("model.safetensors", "pytorch_model.bin"):  # timm's order
        path = huggingface_hub.try_to_load_from_cache(hub_id, name)
        if isinstance(path, str):
            return path
    return None


def _hub_unreachable() -> str | None:
    """Why the Hugging Face Hub cannot be reached (offline mode, DNS, no route, timeout), or None if it answers."""
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    try:  # one request, no retries: any HTTP answer means the hub is reachable
        huggingface_hub.get_session().head(huggingface_hub.constants.ENDPOINT, timeout=HUB_PROBE_TIMEOUT)
    except Exception as err:  # httpx/requests connection errors, timeouts, proxies refusing, ...
        return f"{type(err).__name__}: {first_line(err)}"
    return None


def _timm_state_dict(tag: str) -> dict:
    """timm's pretrained weights for `tag`: from the Hugging Face cache if there, else downloaded; fails in seconds
    when the hub is unreachable, naming the alternatives."""
    _check_timm_tag(tag)
    hub_id = timm.models.get_pretrained_cfg(tag).hf_hub_id or tag
    cached = _cached_hub_file(hub_id)
    if cached is not None:  # read directly: no request to the hub, so it works offline
        return read_weights_file(cached)
    alternatives = (f"Train from random initialisation with --pretrained_backbone none, or download "
                    f"model.safetensors from https://huggingface.co/{hub_id} elsewhere and pass its path "
                    "(--pretrained_backbone /path/to/model.safetensors)")
    why = _hub_unreachable()
    if why is not None:
        raise FileNotFoundError(f"pretrained backbone {tag!r}: not in the Hugging Face cache and the hub "
                                f"({huggingface_hub.constants.ENDPOINT}) is unreachable ({why}). {alternatives}")
    try:
        return timm.create_model(tag, pretrained=True).state_dict()
    except Exception as err:  # huggingface_hub's errors, proxies, timeouts, ...
        raise FileNotFoundError(f"pretrained backbone {tag!r}: could not fetch timm's weights ({type(err).__name__}: "
                                f"{first_line(err)}). {alternatives}") from err


def load_pretrained_backbone(model: HRNetFCNForSemanticSegmentation, source: str | Path = DEFAULT_PRETRAINED) -> dict:
    """Load ImageNet (or other) weights into `model.backbone`; the head keeps its initialisation.

    `source`: a timm pretrained tag ("hrnet_w18.ms_in1k", the reference's MSRA weights; "hrnet_w18.ms_aug_in1k"; ...;
    downloaded through timm and the Hugging Face cache) or a local .safetensors / .pth / .pt file holding a
    timm/MSRA classification state dict (its classification-head keys are left out), a reference checkpoint or a
    saved HRNetFCN model (`backbone.` keys; `decode_head.` keys are left out). Every other key must match the
    backbone exactly (names and shapes) or a ValueError lists the differences. BN `num_batches_tracked` counters
    may be absent (unused with a fixed momentum), as torch's own loading allows.
    Returns {"source": str, "loaded": number of tensors, "dropped": keys left out}.
    """
    if is_weights_file(source):
        state_dict, where = read_weights_file(source), str(source)
    else:
        state_dict, where = _timm_state_dict(str(source)), f"timm weights {source}"
    state_dict, dropped = _backbone_state_dict(state_dict)
    check_state_dict(state_dict, model.backbone.state_dict(), where, allow_missing=("num_batches_tracked",))
    model.backbone.load_state_dict(state_dict, strict=True)
    return {"source": str(source), "loaded": len(state_dict), "dropped": dropped}
