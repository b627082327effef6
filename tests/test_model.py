"""The network must be the reference network: parameters, fusion, head, loss, checkpoints, pretrained weights.

Reference behaviour is recomputed here independently (a literal re-implementation of mmseg's fusion, losses by
hand) rather than read back from the code under test.
"""

import json
import math
from types import SimpleNamespace

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from data.labels import ID2LABEL
from modeling import (
    HRNetFCNConfig,
    HRNetFCNForSemanticSegmentation,
    SyncBatchNorm,
    apply_sync_batchnorm,
    convert_mmseg_state_dict,
    load_pretrained_backbone,
    pretrained,
    segmentation_loss,
    to_channels_last,
)


def _build(seed: int = 0, **config) -> HRNetFCNForSemanticSegmentation:
    torch.manual_seed(seed)
    return HRNetFCNForSemanticSegmentation(HRNetFCNConfig(**config))


def _randomize_bn_stats(model: nn.Module, seed: int = 1) -> None:
    """Random running statistics, so that state dicts compare every buffer (outputs in eval mode explode)."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
            module.num_batches_tracked.fill_(7)


@pytest.fixture(scope="module")
def model() -> HRNetFCNForSemanticSegmentation:
    """Default model in eval mode, BN statistics from one random batch (not the init's 0/1). Do not modify it."""
    model = _build()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None  # cumulative average: after one batch the running stats are that batch's
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64))
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = 0.1
    return model.eval()


# ------------------------------------------------------------------------------------------------- architecture
def test_parameter_count_and_reference_key_names(model):
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    assert count(model) == 9_640_849
    assert count(model.backbone) == 9_562_260
    assert count(model.decode_head) == 78_589
    keys = model.state_dict().keys()
    assert sum(k.startswith("backbone.") for k in keys) == 1830  # docs/recipe.md section 2
    assert {k for k in keys if k.startswith("decode_head.")} == {
        "decode_head.convs.0.conv.weight", "decode_head.conv_seg.weight", "decode_head.conv_seg.bias",
        *(f"decode_head.convs.0.bn.{name}" for name in
          ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"))}
    # A few names of the reference's HRNet (mmseg), spelled out independently.
    for key in ("backbone.conv1.weight", "backbone.bn2.running_var", "backbone.layer1.0.downsample.0.weight",
                "backbone.transition1.1.0.0.weight", "backbone.stage2.0.fuse_layers.1.0.0.0.weight",
                "backbone.stage4.2.fuse_layers.0.3.1.running_mean", "backbone.stage4.2.branches.3.3.bn2.bias"):
        assert key in keys
    assert model.decode_head.conv_seg.weight.shape == (19, 270, 1, 1)


def test_config_defaults_and_validation():
    config = HRNetFCNConfig()
    assert (config.num_labels, config.ignore_index, config.loss_average, config.fuse_upsample) == (
        19, 255, "all", "bilinear")
    assert config.id2label == ID2LABEL and config.label2id["bicycle"] == 18
    five = HRNetFCNConfig(num_labels=5)
    assert five.num_labels == 5 and five.id2label[4] == "LABEL_4"
    with pytest.raises(ValueError, match="loss_average"):
        HRNetFCNConfig(loss_average="sum")
    with pytest.raises(ValueError, match="fuse_upsample"):
        HRNetFCNConfig(fuse_upsample="bicubic")


def test_initialisation_is_the_reference_one(model):
    fresh = _build(seed=3)
    conv_seg = fresh.decode_head.conv_seg
    assert conv_seg.weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert torch.all(conv_seg.bias == 0)
    # Other convs: kaiming normal, fan_out, ReLU gain (timm's and mmseg's init), not transformers' std 0.02.
    for conv in (fresh.backbone.conv2, fresh.decode_head.convs[0].conv, fresh.backbone.stage3[0].branches[0][0].conv1):
        fan_out = conv.weight.shape[0] * conv.weight[0, 0].numel()
        assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.05)
    assert torch.all(fresh.backbone.bn1.weight == 1) and torch.all(fresh.decode_head.convs[0].bn.running_var == 1)


# ------------------------------------------------------------------------------------------------ input sizes
@pytest.mark.parametrize(("height", "width"), [(64, 128), (100, 140), (65, 97), (500, 700)])
def test_output_shape_for_any_size_from_32(model, height, width):
    with torch.no_grad():
        logits = model(torch.randn(1, 3, height, width)).logits
    conv = lambda n: (n + 2 * 1 - 3) // 2 + 1  # noqa: E731  a 3x3 stride-2 conv with padding 1
    quarter = lambda n: conv(conv(n))  # noqa: E731  the two stem convs
    assert logits.shape == (1, 19, quarter(height), quarter(width))
    assert torch.isfinite(logits).all()


def _conv_gmacs(flop_counter: FlopCounterMode) -> float:
    return sum(n for op, n in flop_counter.get_flop_counts()["Global"].items() if "conv" in str(op)) / 2e9


def test_output_shape_and_macs_at_cityscapes_sizes(model):
    # docs/recipe.md section 2: ~36.9 GMAC (convolutions) at 512x1024, ~147.4 at 1024x2048.
    with torch.no_grad(), FlopCounterMode(display=False) as flops:  # the training crop: one real forward
        assert model(torch.randn(1, 3, 512, 1024)).logits.shape == (1, 19, 128, 256)
    assert _conv_gmacs(flops) == pytest.approx(36.9, abs=0.06)
    # The full evaluation image takes ~10-30 s on a 2-core CPU: run it on the meta device (shapes only, no
    # compute) with labels, so the loss's upsampling to 1024x2048 is covered too.
    with torch.device("meta"), FlopCounterMode(display=False) as flops:
        shapes_only = HRNetFCNForSemanticSegmentation(HRNetFCNConfig()).eval()
        out = shapes_only(torch.empty(1, 3, 1024, 2048), labels=torch.zeros(1, 1024, 2048, dtype=torch.long))
    assert out.logits.shape == (1, 19, 256, 512) and out.loss.shape == ()
    assert _conv_gmacs(flops) == pytest.approx(147.4, abs=0.06)


@pytest.mark.parametrize(("pixel_values", "labels", "message"), [
    (torch.zeros(1, 1, 64, 64), None, "Bx3xHxW"),
    (torch.zeros(3, 64, 64), None, "Bx3xHxW"),
    (torch.zeros(1, 3, 31, 64), None, "at least 32"),
    (torch.zeros(1, 3, 64, 64, dtype=torch.uint8), None, "floats"),
    (torch.zeros(2, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.long), "labels"),
    (torch.zeros(1, 3, 64, 64), torch.zeros(1, 1, 64, 64, dtype=torch.long), "labels"),
    (torch.zeros(1, 3, 64, 64), torch.zeros(1, 64, 64), "labels"),
])
def test_unsupported_inputs_raise_a_clear_error(model, pixel_values, labels, message):
    with pytest.raises(ValueError, match=message):
        model(pixel_values, labels=labels)


# ------------------------------------------------------------------------------------------------------ fusion
def _reference_hr_module(module, x):
    """mmseg's HRModule.forward, literally: Upsample(int(size * 2**(j-i)), bilinear), then resize to branch i."""
    x = [branch(t) for branch, t in zip(module.branches, x, strict=True)]
    if module.num_branches == 1:
        return x
    out = []
    for i in range(len(module.fuse_layers)):
        y = 0
        for j in range(module.num_branches):
            if i == j:
                y = y + x[j]
            elif j > i:
                conv, bn = module.fuse_layers[i][j][0], module.fuse_layers[i][j][1]
                t = bn(conv(x[j]))
                t = F.interpolate(t, size=[int(s * 2 ** (j - i)) for s in t.shape[-2:]], mode="bilinear",
                                  align_corners=False)
                y = y + F.interpolate(t, size=x[i].shape[2:], mode="bilinear", align_corners=False)
            else:
                y = y + module.fuse_layers[i][j](x[j])
        out.append(F.relu(y))
    return out


def _reference_backbone(backbone, pixel_values):
    x = backbone.act1(backbone.bn1(backbone.conv1(pixel_values)))
    x = backbone.act2(backbone.bn2(backbone.conv2(x)))
    branches = [backbone.layer1(x)]
    for transition, stage in [(backbone.transition1, backbone.stage2), (backbone.transition2, backbone.stage3),
                              (backbone.transition3, backbone.stage4)]:
        branches = [branches[i] if isinstance(t, nn.Identity) else t(branches[min(i, len(branches) - 1)])
                    for i, t in enumerate(transition)]
        for module in stage:
            branches = _reference_hr_module(module, branches)
    return branches


@pytest.mark.parametrize(("height", "width"), [(64, 128), (100, 140)])
def test_default_fusion_is_the_reference_bilinear_one(model, height, width):
    # 100x140: branches 25x35, 13x18, 7x9, 4x5, so upsampling by 2**k overshoots and the second resize matters.
    pixel_values = torch.randn(1, 3, height, width)
    captured = []
    hook = model.backbone.register_forward_hook(lambda module, args, output: captured.append(output))
    try:
        with torch.no_grad():
            logits = model(pixel_values).logits
    finally:
        hook.remove()
    (ours,) = captured
    with torch.no_grad():
        expected = _reference_backbone(model.backbone, pixel_values)
        head_input = torch.cat([expected[0], *(F.interpolate(f, size=expected[0].shape[-2:], mode="bilinear",
                                                             align_corners=False) for f in expected[1:])], dim=1)
        head = model.decode_head
        expected_logits = head.conv_seg(F.relu(head.convs[0].bn(head.convs[0].conv(head_input))))
    for got, want in zip(ours, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-5)


def test_nearest_fusion_is_timms_and_differs_from_bilinear(model):
    nearest = _build(fuse_upsample="nearest").eval()
    nearest.load_state_dict(model.state_dict())
    timm_backbone = timm.create_model("hrnet_w18", pretrained=False, features_only=True, feature_location="",
                                      out_indices=(1, 2, 3, 4)).eval()
    timm_backbone.load_state_dict(model.backbone.state_dict())
    pixel_values = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        for ours, theirs in zip(nearest.backbone(pixel_values), timm_backbone(pixel_values), strict=True):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
        bilinear_logits, nearest_logits = model(pixel_values).logits, nearest(pixel_values).logits
    assert (bilinear_logits - nearest_logits).abs().max() > 1e-3
    # timm's own fusion cannot take a size that is not a multiple of 32; ours (nearest too) resizes to fit.
    with torch.no_grad():
        assert nearest(torch.randn(1, 3, 65, 97)).logits.shape == (1, 19, 17, 25)


# -------------------------------------------------------------------------------------------------------- loss
def _hand_cross_entropy(logits, label):
    """-log softmax(logits)[label] for one pixel, from the definition."""
    return -(logits[label] - math.log(sum(math.exp(v) for v in logits)))


def test_loss_by_hand_with_ignored_pixels():
    # 1 image, 3 classes, 2x2 pixels at full resolution (upsampling to the same size is the identity).
    logits = torch.tensor([[[[2.0, 0.0], [1.0, -1.0]], [[0.5, 1.0], [1.0, 0.0]], [[-1.0, 2.0], [0.0, 3.0]]]])
    labels = torch.tensor([[[0, 2], [255, 1]]])
    pixel = lambda r, c: [logits[0, k, r, c].item() for k in range(3)]  # noqa: E731
    losses = [_hand_cross_entropy(pixel(0, 0), 0), _hand_cross_entropy(pixel(0, 1), 2),
              _hand_cross_entropy(pixel(1, 1), 1)]
    assert segmentation_loss(logits, labels, average="all").item() == pytest.approx(sum(losses) / 4, rel=1e-6)
    assert segmentation_loss(logits, labels, average="valid").item() == pytest.approx(sum(losses) / 3, rel=1e-6)
    assert segmentation_loss(logits, labels, average="valid").item() == pytest.approx(
        F.cross_entropy(logits, labels, ignore_index=255).item(), rel=1e-6)
    everything_ignored = torch.full_like(labels, 255)
    assert segmentation_loss(logits, everything_ignored, average="all").item() == 0
    assert segmentation_loss(logits, everything_ignored, average="valid").item() == 0


def test_model_loss_upsamples_logits_to_the_labels(model, monkeypatch):
    pixel_values = torch.randn(2, 3, 64, 96)
    labels = torch.randint(0, 19, (2, 64, 96))
    labels[0, :20] = 255
    with torch.no_grad():
        out = model(pixel_values, labels=labels.to(torch.uint8))  # loaders give uint8 labels
        monkeypatch.setattr(model.config, "loss_average", "valid")
        valid_loss, logits = model(pixel_values, labels=labels, return_dict=False)
    assert torch.equal(logits, out.logits)
    upsampled = F.interpolate(out.logits, size=(64, 96), mode="bilinear", align_corners=False)
    log_p = upsampled.log_softmax(dim=1)
    keep = labels != 255
    per_pixel = -log_p.gather(1, labels.clamp(max=18)[:, None])[:, 0]
    assert out.loss.item() == pytest.approx((per_pixel * keep).sum().item() / labels.numel(), rel=1e-5)
    assert valid_loss.item() == pytest.approx(per_pixel[keep].mean().item(), rel=1e-5)


def test_gradients_reach_every_parameter():
    model = _build(seed=4).train()
    labels = torch.randint(0, 19, (2, 64, 64))
    labels[:, :8] = 255
    model(torch.randn(2, 3, 64, 64), labels=labels).loss.backward()
    no_grad = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []


# --------------------------------------------------------------------------------------- save / from_pretrained
def test_save_pretrained_round_trip_keeps_weights_and_config(tmp_path):
    model = _build(seed=5, loss_average="valid", fuse_upsample="nearest").eval()
    with torch.no_grad():
        _randomize_bn_stats(model)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = HRNetFCNForSemanticSegmentation.from_pretrained(tmp_path).eval()
    assert (loaded.config.loss_average, loaded.config.fuse_upsample) == ("valid", "nearest")
    assert loaded.config.id2label == ID2LABEL
    expected = model.state_dict()
    assert all(torch.equal(tensor, expected[key]) for key, tensor in loaded.state_dict().items())
    pixel_values = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values).logits, model(pixel_values).logits)


def test_from_pretrained_initialises_only_missing_weights(tmp_path):
    model = _build(seed=6)
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    for key in ("decode_head.conv_seg.weight", "decode_head.conv_seg.bias"):
        weights.pop(key)
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded = HRNetFCNForSemanticSegmentation.from_pretrained(tmp_path)
    assert torch.equal(loaded.backbone.conv1.weight, model.backbone.conv1.weight)
    assert torch.equal(loaded.decode_head.convs[0].conv.weight, model.decode_head.convs[0].conv.weight)
    conv_seg = loaded.decode_head.conv_seg  # missing: initialised as the reference does, not left empty
    assert conv_seg.weight.std().item() == pytest.approx(0.01, rel=0.05) and torch.all(conv_seg.bias == 0)


# ---------------------------------------------------------------------------------------------- pretrained
@pytest.fixture(scope="module")
def imagenet_like():
    """A classification-layout hrnet_w18 state dict (what timm's and MSRA's ImageNet weights look like)."""
    torch.manual_seed(7)
    classifier = timm.create_model("hrnet_w18", pretrained=False)
    with torch.no_grad():
        _randomize_bn_stats(classifier, seed=8)
    return classifier.state_dict()


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_load_pretrained_backbone_from_a_classification_file(tmp_path, imagenet_like, suffix):
    path = tmp_path / f"hrnet_w18{suffix}"
    if suffix == ".safetensors":  # timm's hub files; drop the BN counters as some releases do
        save_file({k: v for k, v in imagenet_like.items() if not k.endswith("num_batches_tracked")}, path)
    else:
        torch.save(imagenet_like, path)
    model = _build(seed=9)
    head_before = {k: v.clone() for k, v in model.decode_head.state_dict().items()}
    info = load_pretrained_backbone(model, path)
    assert info["loaded"] == (1830 - 305 if suffix == ".safetensors" else 1830)  # 305 BN counters left out
    assert info["dropped"] and all(k.startswith(("incre_modules.", "downsamp_modules.", "final_layer.",
                                                 "classifier.")) for k in info["dropped"])
    for key, tensor in model.backbone.state_dict().items():
        if not key.endswith("num_batches_tracked") or suffix == ".pth":
            assert torch.equal(tensor, imagenet_like[key]), key
    assert all(torch.equal(v, head_before[k]) for k, v in model.decode_head.state_dict().items())
    model.init_weights()  # what post_init runs: must not overwrite pretrained weights
    assert torch.equal(model.backbone.conv1.weight, imagenet_like["conv1.weight"])


def test_load_pretrained_backbone_from_a_reference_checkpoint(tmp_path, model):
    path = tmp_path / "fcn_hr18.pth"
    torch.save({"meta": {"iter": 80000}, "state_dict": model.state_dict()}, path)
    fresh = _build(seed=10)
    info = load_pretrained_backbone(fresh, path)
    assert sorted(info["dropped"]) == sorted(k for k in model.state_dict() if k.startswith("decode_head."))
    expected = model.backbone.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in fresh.backbone.state_dict().items())
    assert not torch.equal(fresh.decode_head.conv_seg.weight, model.decode_head.conv_seg.weight)


def test_load_pretrained_backbone_errors(tmp_path, imagenet_like, monkeypatch):
    model = _build(seed=11)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_pretrained_backbone(model, tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="hrnet_w18.ms_in1k"):  # unknown tag: lists the real ones
        load_pretrained_backbone(model, "hrnet_w18.no_such_tag")
    wrong = dict(imagenet_like)
    wrong["conv1.weight"] = wrong["conv1.weight"][:32]
    wrong["stem.extra"] = torch.zeros(1)
    del wrong["layer1.0.conv1.weight"]
    torch.save(wrong, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="wrong.pth") as error:
        load_pretrained_backbone(model, tmp_path / "wrong.pth")
    for key in ("conv1.weight", "stem.extra", "layer1.0.conv1.weight"):
        assert key in str(error.value)

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(timm, "create_model", offline)  # the download path, without touching the network
    monkeypatch.setattr(pretrained, "_hub_unreachable", lambda: None)  # as if the hub answered the probe
    with pytest.raises(FileNotFoundError, match="huggingface.co/timm/hrnet_w18.ms_in1k") as error:
        load_pretrained_backbone(model, "hrnet_w18.ms_in1k")
    assert "path" in str(error.value)


# ------------------------------------------------------------------------------------------ reference checkpoints
def test_convert_reference_checkpoint_gives_identical_outputs(tmp_path, model, load_script):
    # The reference layout, written out from our weights: its keys are what mmseg saves (see the key-name test).
    reference = {key: tensor.clone() for key, tensor in model.state_dict().items()}
    src = tmp_path / "fcn_hr18_512x1024_80k_cityscapes.pth"
    torch.save({"meta": {"mmseg_version": "0.11.0", "iter": 80000}, "state_dict": reference,
                "optimizer": {"state": {}, "param_groups": []}}, src)
    script = load_script("convert_mmseg_checkpoint")
    results = script.main(script.get_args_parser().parse_args([str(src), str(tmp_path / "converted")]))
    assert results["tensors"] == 1838 and results["parameters"] == 9_640_849
    converted = HRNetFCNForSemanticSegmentation.from_pretrained(tmp_path / "converted").eval()
    pixel_values = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(converted(pixel_values).logits, model(pixel_values).logits)


def test_convert_fails_loudly_on_any_mismatch(tmp_path, model, load_script):
    script = load_script("convert_mmseg_checkpoint")
    reference = model.state_dict()
    renamed = {("backbone.stage2.0.fuse_layer.0.1.0.weight" if k == "backbone.stage2.0.fuse_layers.0.1.0.weight"
                else k): v for k, v in reference.items()}
    torch.save({"state_dict": renamed}, tmp_path / "renamed.pth")
    with pytest.raises(SystemExit) as error:
        script.main(script.get_args_parser().parse_args([str(tmp_path / "renamed.pth"), str(tmp_path / "a")]))
    message = str(error.value.code)
    assert message.startswith("error:") and "renamed.pth" in message
    assert "backbone.stage2.0.fuse_layers.0.1.0.weight" in message  # missing
    assert "backbone.stage2.0.fuse_layer.0.1.0.weight" in message  # unexpected
    assert not (tmp_path / "a").exists()

    with pytest.raises(ValueError, match="decode_head.conv_seg.weight"):  # 20 classes into a 19-class model
        convert_mmseg_state_dict({**reference, "decode_head.conv_seg.weight": torch.zeros(20, 270, 1, 1)})
    with pytest.raises(ValueError, match="auxiliary_head.conv_seg.weight"):
        convert_mmseg_state_dict({**reference, "auxiliary_head.conv_seg.weight": torch.zeros(1)})
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="weights_only"):
        script.main(script.get_args_parser().parse_args([str(tmp_path / "garbage.pth"), str(tmp_path / "b")]))
    with pytest.raises(SystemExit, match="no such"):
        script.main(script.get_args_parser().parse_args([str(tmp_path / "absent.pth"), str(tmp_path / "c")]))


def test_convert_casts_half_precision_weights_to_float32(model):
    half = {k: (v.half() if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    converted = convert_mmseg_state_dict(half)
    assert converted["backbone.conv1.weight"].dtype == torch.float32
    assert converted["backbone.bn1.num_batches_tracked"].dtype == torch.long


# ------------------------------------------------------------------------------------------------------- utils
def test_sync_batchnorm_choice():
    from modeling.training import batchnorm_kind

    def launch(device, processes):  # faked: building either SyncBatchNorm needs no GPU and no process group
        return SimpleNamespace(device=torch.device(device), num_processes=processes)

    model = _build(seed=12)
    keys = list(model.state_dict())
    for choice, device, processes in [("ours", "cpu", 1), ("ours", "cuda", 1), ("torch", "cuda", 1), ("off", "cpu", 4),
                                      ("off", "cuda", 8)]:  # one process, or off: the model as it is
        assert apply_sync_batchnorm(model, choice, launch(device, processes)) is model
        assert batchnorm_kind(model) == "off"
    with pytest.raises(SystemExit, match="--sync_batchnorm torch: .*CUDA only"):
        apply_sync_batchnorm(model, "torch", launch("cpu", 2))
    for choice, device, kind in [("ours", "cpu", SyncBatchNorm), ("ours", "cuda", SyncBatchNorm),
                                 ("torch", "cuda", nn.SyncBatchNorm)]:
        converted = apply_sync_batchnorm(_build(seed=12), choice, launch(device, 8))
        assert sum(isinstance(m, kind) for m in converted.modules()) == 306 and batchnorm_kind(converted) == choice
        assert not any(type(m) is nn.BatchNorm2d for m in converted.modules())
        assert list(converted.state_dict()) == keys


def test_channels_last_gives_the_same_outputs(model):
    pixel_values = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model(pixel_values).logits
        copy = _build().eval()
        copy.load_state_dict(model.state_dict())
        copy = to_channels_last(copy)
        assert copy.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
        got = copy(pixel_values.contiguous(memory_format=torch.channels_last)).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_benchmark_model_mode_runs(tmp_path, load_script):
    benchmark = load_script("benchmark")
    out = tmp_path / "bench.json"
    args = benchmark.get_args_parser().parse_args(
        ["model", "--height", "64", "--width", "64", "--batch_size", "1", "--warmup", "0", "--reps", "1",
         "--out", str(out)])
    results = benchmark.main(args)
    seconds = results["seconds_per_iter"]
    assert set(seconds) == {"timm_backbone", "ours_nearest_fuse", "ours"} and all(s > 0 for s in seconds.values())
    # one repetition: the median ratio is the ratio of the two times
    assert results["ratio_to_timm_backbone"]["ours"] == pytest.approx(seconds["ours"] / seconds["timm_backbone"])
    assert json.loads(out.read_text())["input"] == [1, 3, 64, 64]
