"""Backbone adapters: feature shapes for CNNs and ViTs, grid resize, CLS concat, offline weights errors."""
import pytest
import torch

from training.backbones import (BackboneSpec, TinyCNN, WeightsNotFoundError, build_backbone, tokens_to_map)
from training.model import ConceptBottleneck, resize_to_grid

pytestmark = pytest.mark.timeout(120)


def test_tinycnn_stride_16_and_grid_resize():
    bb = build_backbone(BackboneSpec(arch="salf_tinycnn", input_size=(112, 112), width=8)).eval()
    feats = bb(torch.randn(2, 3, 112, 112))
    assert feats.shape == (2, 64, 7, 7) and bb.feature_shape() == (64, 7, 7)
    assert resize_to_grid(feats, (7, 7)) is feats  # already on the grid: no interpolation
    assert resize_to_grid(feats, (5, 9)).shape == (2, 64, 5, 9)


def test_resnet_named_layer_and_resize():
    bb = build_backbone(BackboneSpec(arch="resnet18", input_size=(64, 64), layer="layer3")).eval()
    feats = bb(torch.randn(1, 3, 64, 64))
    assert feats.shape == (1, 256, 4, 4)
    maps = ConceptBottleneck(256, 5, (7, 7))(feats)
    assert maps.shape == (1, 5, 7, 7)
    with pytest.raises(ValueError, match="no layer 'layer9'"):
        build_backbone(BackboneSpec(arch="resnet18", layer="layer9"))


def test_bilinear_resize_matches_interpolate_and_keeps_constants():
    x = torch.randn(2, 3, 4, 4)
    want = torch.nn.functional.interpolate(x, size=(7, 7), mode="bilinear", align_corners=False)
    assert torch.equal(resize_to_grid(x, (7, 7)), want)
    const = torch.full((1, 2, 3, 3), 2.5)
    assert torch.allclose(resize_to_grid(const, (7, 7)), torch.full((1, 2, 7, 7), 2.5))


def test_timm_vit_patch_tokens_and_cls_concat():
    spec = BackboneSpec(arch="timm:vit_tiny_patch16_224", input_size=(64, 64))
    torch.manual_seed(0)
    plain = build_backbone(spec).eval()
    feats = plain(torch.randn(2, 3, 64, 64))
    assert feats.shape == (2, 192, 4, 4)
    torch.manual_seed(0)
    with_cls = build_backbone(BackboneSpec(arch="timm:vit_tiny_patch16_224", input_size=(64, 64), use_cls=True))
    x = torch.randn(2, 3, 64, 64)
    both = with_cls.eval()(x)
    assert both.shape == (2, 384, 4, 4)
    # the second half is the CLS token, the same at every position
    assert torch.allclose(both[:, 192:], both[:, 192:, :1, :1].expand(-1, -1, 4, 4))
    assert resize_to_grid(both, (7, 7)).shape == (2, 384, 7, 7)


def test_torchvision_vit_small_image():
    bb = build_backbone(BackboneSpec(arch="vit_b_16", input_size=(32, 32), use_cls=True)).eval()
    with torch.no_grad():
        feats = bb(torch.randn(1, 3, 32, 32))
    assert feats.shape == (1, 1536, 2, 2)


def test_tokens_to_map_layout():
    # token k (after the prefix) goes to row k // side, column k % side
    tokens = torch.arange(1 + 9, dtype=torch.float32).view(1, 10, 1).expand(1, 10, 2).contiguous()
    fmap = tokens_to_map(tokens, 1, use_cls=True)
    assert fmap.shape == (1, 4, 3, 3)
    assert fmap[0, 0, 1, 2] == 1 + 5 and torch.all(fmap[0, 2:] == 0)
    with pytest.raises(ValueError, match="square grid"):
        tokens_to_map(torch.zeros(1, 1 + 8, 2), 1, False)


def test_missing_local_weights_name_the_path(tmp_path):
    target = tmp_path / "weights" / "rn50.pth"
    with pytest.raises(WeightsNotFoundError, match=str(target)):
        build_backbone(BackboneSpec(arch="resnet18", weights=str(target)))


def test_missing_torchvision_weights_name_the_hub_path():
    with pytest.raises(WeightsNotFoundError, match=r"hub/checkpoints/resnet18-.*\.pth"):
        build_backbone(BackboneSpec(arch="resnet18", weights="torchvision:IMAGENET1K_V1"))


def test_missing_timm_weights_fail_fast_without_network(monkeypatch, tmp_path):
    import time

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    start = time.monotonic()
    with pytest.raises(WeightsNotFoundError, match="local Hugging Face cache"):
        build_backbone(BackboneSpec(arch="timm:vit_tiny_patch16_224", input_size=(64, 64), weights="timm:pretrained"))
    assert time.monotonic() - start < 10  # no retries against an unreachable hub


@pytest.mark.parametrize("form", ["adapter", "bare"])
def test_local_checkpoint_round_trip(tmp_path, form):
    from safetensors.torch import save_file

    spec = BackboneSpec(arch="salf_tinycnn", input_size=(64, 64), width=8)
    torch.manual_seed(1)
    src = build_backbone(spec).eval()
    if form == "adapter":
        state = src.state_dict()
    else:  # a checkpoint of the bare network, classifier included, as a user would bring
        net = TinyCNN(8, num_classes=3)
        net.load_state_dict({k.replace("body.0.", "stem.").replace("body.1.", "stage1.")
                             .replace("body.2.", "stage2.").replace("body.3.", "stage3.")
                             .replace("body.4.", "stage4."): v for k, v in src.state_dict().items()}, strict=False)
        state = net.state_dict()
    path = tmp_path / "bb.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    loaded = build_backbone(BackboneSpec(arch="salf_tinycnn", input_size=(64, 64), width=8, weights=str(path)))
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(loaded.eval()(x), src(x))


def test_unknown_arch_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown backbone arch 'alexnet9'"):
        build_backbone(BackboneSpec(arch="alexnet9"))
