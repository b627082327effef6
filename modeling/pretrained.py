"""Pretrained backbone weights for HRNetFCNForSemanticSegmentation: timm tags (through the Hugging Face cache) or local
files, checked key by key.

    load_pretrained_backbone(model, "hrnet_w18.ms_in1k")      # or a local .safetensors / .pth / .pt file

Kept apart from modeling/hrnet_fcn.py, which `save_pretrained` copies into every saved model folder: that file
must import nothing but torch, timm and transformers, so that the folder loads without this repository.
"""

from pathlib import Path

import huggingface_hub
import timm

from modeling.errors import first_line
from modeling.hrnet_fcn import BACKBONE, HRNetFCNForSemanticSegmentation
from modeling.weights import WEIGHT_FILE_SUFFIXES, check_state_dict, is_weights_file, read_weights_file

DEFAULT_PRETRAINED = "hrnet_w18.ms_in1k"  # the MSRA ImageNet weights the reference started from
# Keys of timm's (and MSRA's) classification checkpoints that the features model does not have.
_CLASSIFICATION_PREFIXES = ("incre_modules.", "downsamp_modules.", "final_layer.", "classifier.")


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
