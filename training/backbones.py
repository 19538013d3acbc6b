"""Backbone adapters: any supported vision model -> spatial feature maps ``[B, D, h, w]``.

One base class does the shared work (spec, dry-run for the feature size); each family overrides
one method, ``features`` (STYLE.md point 4). Weights come from a local checkpoint path or a
torchvision/timm name; nothing is downloaded silently: a missing file is a clear error that names
the path to put it in.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsNotFoundError(FileNotFoundError):
    """Backbone weights were asked for but are not on this machine."""


@dataclass
class BackboneSpec:
    """Which architecture, which layer, and how its input is preprocessed.

    ``arch``: ``resnet18|34|50|101|152`` (torchvision), ``vit_b_16|vit_b_32|vit_l_16`` (torchvision),
    ``timm:<name>`` (any timm ViT), or ``salf_tinycnn`` (the project's small CPU backbone).
    ``weights``: ``None`` (random init), a local checkpoint path (``.safetensors`` or a state-dict
    file), or ``torchvision:<WEIGHTS_ENUM>`` / ``timm:pretrained`` which must already be in the
    local torch hub cache.
    """

    arch: str = "salf_tinycnn"
    layer: str | None = None
    input_size: tuple[int, int] = (224, 224)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    use_cls: bool = False
    weights: str | None = None
    width: int = 32  # salf_tinycnn only: channels of the first stage

    def __post_init__(self) -> None:
        self.input_size = tuple(int(v) for v in self.input_size)  # type: ignore[assignment]
        self.mean = tuple(float(v) for v in self.mean)  # type: ignore[assignment]
        self.std = tuple(float(v) for v in self.std)  # type: ignore[assignment]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "BackboneSpec":
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown backbone keys: {sorted(unknown)}")
        return cls(**d)


class Backbone(nn.Module):
    """Base adapter. Subclasses implement ``features(x) -> [B, D, h, w]`` float32."""

    def __init__(self, spec: BackboneSpec) -> None:
        super().__init__()
        self.spec = spec

    def features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: normalised images ``[B, 3, H, W]`` float32 -> features ``[B, D, h, w]``."""
        return self.features(x)

    @torch.no_grad()
    def feature_shape(self) -> tuple[int, int, int]:
        """``(D, h, w)`` for the spec's input size, from one dry run on zeros."""
        was_training = self.training
        self.eval()
        h, w = self.spec.input_size
        out = self.features(torch.zeros(1, 3, h, w))
        self.train(was_training)
        return tuple(out.shape[1:])  # type: ignore[return-value]


# --------------------------------------------------------------------------- CNN family
class TinyCNN(nn.Module):
    """Four stride-2 stages after a stride-2 stem: total stride 16 (112 px -> 7x7)."""

    def __init__(self, width: int = 32, num_classes: int = 0) -> None:
        super().__init__()

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            )

        w = width
        self.stem = nn.Sequential(nn.Conv2d(3, w, 3, 2, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True))
        self.stage1 = block(w, w, 1)
        self.stage2 = block(w, 2 * w, 2)
        self.stage3 = block(2 * w, 4 * w, 2)
        self.stage4 = block(4 * w, 8 * w, 2)
        self.fc = nn.Linear(8 * w, num_classes) if num_classes else None


class CNNBackbone(Backbone):
    """torchvision ResNets and TinyCNN: run children in order up to ``spec.layer``."""

    _DEFAULT_LAYER = {"salf_tinycnn": "stage4"}

    def __init__(self, spec: BackboneSpec, net: nn.Module) -> None:
        super().__init__(spec)
        layer = spec.layer or self._DEFAULT_LAYER.get(spec.arch, "layer4")
        names = [n for n, _ in net.named_children()]
        if layer not in names:
            raise ValueError(f"backbone {spec.arch!r} has no layer {layer!r}; choose one of {names}")
        keep = names[: names.index(layer) + 1]
        self.body = nn.Sequential(*[getattr(net, n) for n in keep])
        self.layer = layer

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


# --------------------------------------------------------------------------- ViT family
def tokens_to_map(tokens: torch.Tensor, num_prefix: int, use_cls: bool) -> torch.Tensor:
    """``[B, P + N, D]`` tokens -> ``[B, D(*2 with CLS), h, w]``; N must be a square grid."""
    b, t, d = tokens.shape
    patches = tokens[:, num_prefix:]
    n = int(t) - num_prefix
    # math.isqrt on a plain int: the token count is fixed by the input size, and a rounded float of a
    # traced shape is what stopped the TorchScript ONNX exporter on ViTs.
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"{n} patch tokens do not form a square grid")
    fmap = patches.transpose(1, 2).reshape(b, d, side, side)
    if use_cls:
        cls = tokens[:, 0, :, None, None].expand(b, d, side, side)
        fmap = torch.cat([fmap, cls], dim=1)
    return fmap


class TorchvisionViTBackbone(Backbone):
    def __init__(self, spec: BackboneSpec, net: nn.Module) -> None:
        super().__init__(spec)
        self.net = net

    def features(self, x: torch.Tensor) -> torch.Tensor:
        net = self.net
        x = net._process_input(x)
        cls = net.class_token.expand(x.shape[0], -1, -1)
        tokens = net.encoder(torch.cat([cls, x], dim=1))
        return tokens_to_map(tokens, 1, self.spec.use_cls)


class TimmViTBackbone(Backbone):
    def __init__(self, spec: BackboneSpec, net: nn.Module) -> None:
        super().__init__(spec)
        self.net = net

    def features(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.net.forward_features(x)
        return tokens_to_map(tokens, int(getattr(self.net, "num_prefix_tokens", 1)), self.spec.use_cls)


# --------------------------------------------------------------------------- factory
_TV_RESNETS = {"resnet18", "resnet34", "resnet50", "resnet101", "resnet152"}
_TV_VITS = {"vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32"}


def _torchvision_vit(spec: BackboneSpec) -> nn.Module:
    """torchvision ViT; random or local weights use the spec's image size (pretrained ones fix 224)."""
    h, w = spec.input_size
    if h != w:
        raise ValueError(f"torchvision ViTs need a square input, got {spec.input_size}")
    if spec.weights and spec.weights.startswith("torchvision:"):
        net = _torchvision_net(spec.arch, spec.weights)
        if net.image_size != h:
            raise ValueError(f"{spec.weights} was trained at {net.image_size} px; set input_size to "
                             f"[{net.image_size}, {net.image_size}]")
        return net
    import torchvision

    return getattr(torchvision.models, spec.arch)(weights=None, image_size=h)


def _timm_net(spec: BackboneSpec) -> nn.Module:
    """timm model without classifier. ``timm:pretrained`` reads the local Hugging Face cache only:
    the file is located first and handed to timm, so a missing file never reaches the network."""
    import timm

    name = spec.arch.split(":", 1)[1]
    kwargs = {"num_classes": 0, "img_size": spec.input_size}
    if spec.weights != "timm:pretrained":
        return timm.create_model(name, pretrained=False, **kwargs)
    from huggingface_hub import constants, try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(name)
    hub_id = getattr(cfg, "hf_hub_id", None)
    if not hub_id:
        raise WeightsNotFoundError(f"timm has no Hugging Face weights for {name!r}; pass a local checkpoint path")
    for filename in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
        path = try_to_load_from_cache(hub_id, filename)
        if isinstance(path, str):
            return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": path}, **kwargs)
    raise WeightsNotFoundError(
        f"timm weights for {name!r} ({hub_id}) are not in the local Hugging Face cache and this machine cannot "
        f"download them; put model.safetensors under {constants.HF_HUB_CACHE}/models--{hub_id.replace('/', '--')}"
        f" or pass a local checkpoint path as weights")


def _hub_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def _load_state(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise WeightsNotFoundError(f"backbone weights not found: {p} (put the checkpoint file there)")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(p))
    state = torch.load(str(p), map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    # checkpoints saved from nn.DataParallel (e.g. the Places365 ResNets) prefix every key
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _torchvision_net(arch: str, weights: str | None, num_classes: int = 1000) -> nn.Module:
    import torchvision

    builder = getattr(torchvision.models, arch)
    if weights and weights.startswith("torchvision:"):
        enum_name = weights.split(":", 1)[1]
        wenum = torchvision.models.get_weight(f"{_weights_enum_prefix(arch)}.{enum_name}")
        target = _hub_dir() / Path(wenum.url).name
        if not target.is_file():
            raise WeightsNotFoundError(
                f"{weights} is not in the local torch hub cache and this machine cannot download it; "
                f"put the file at {target}")
        return builder(weights=wenum)
    return builder(weights=None)


def _weights_enum_prefix(arch: str) -> str:
    import torchvision

    names = {n.lower(): n for n in dir(torchvision.models) if n.endswith("_Weights")}
    key = f"{arch.replace('_', '')}_weights"
    for low, name in names.items():
        if low.replace("_", "") == key.replace("_", ""):
            return name
    raise ValueError(f"no torchvision weights enum for {arch!r}")


def build_backbone(spec: BackboneSpec) -> Backbone:
    """Build the adapter for ``spec`` and load its weights (never downloads)."""
    arch = spec.arch
    local = spec.weights if spec.weights and not spec.weights.startswith(("torchvision:", "timm:")) else None
    if arch == "salf_tinycnn":
        backbone: Backbone = CNNBackbone(spec, TinyCNN(spec.width))
    elif arch in _TV_RESNETS:
        backbone = CNNBackbone(spec, _torchvision_net(arch, spec.weights))
    elif arch in _TV_VITS:
        backbone = TorchvisionViTBackbone(spec, _torchvision_vit(spec))
    elif arch.startswith("timm:"):
        backbone = TimmViTBackbone(spec, _timm_net(spec))
    else:
        raise ValueError(f"unknown backbone arch {arch!r}")
    if local:
        state = _load_state(local)
        missing, unexpected = backbone.load_state_dict(_match_prefix(backbone, state), strict=False)
        if missing:
            raise ValueError(f"checkpoint {local} lacks {len(missing)} backbone tensors, e.g. {missing[:3]}")
        if unexpected:
            log.info("ignored %d checkpoint tensors not used by the backbone (e.g. %s)", len(unexpected), unexpected[:3])
    return backbone


def _match_prefix(backbone: Backbone, state: dict) -> dict:
    """Accept a checkpoint of the bare network (``conv1.weight``) or of the adapter (``body.0.weight``)."""
    own = backbone.state_dict()
    if set(own) & set(state):
        return state
    if isinstance(backbone, CNNBackbone):
        mapped = {}
        names = [n for n, _ in backbone.body.named_children()]
        # body children are numbered in the order of the original children kept
        original = _original_children(backbone)
        for k, v in state.items():
            head, _, rest = k.partition(".")
            if head in original:
                mapped[f"body.{original.index(head)}.{rest}"] = v
        assert len(names) == len(original)
        return mapped
    return {f"net.{k}": v for k, v in state.items()}


def _original_children(backbone: CNNBackbone) -> list[str]:
    arch = backbone.spec.arch
    if arch == "salf_tinycnn":
        order = ["stem", "stage1", "stage2", "stage3", "stage4"]
    else:
        order = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
    return order[: order.index(backbone.layer) + 1]


__all__ = [
    "Backbone", "BackboneSpec", "CNNBackbone", "TinyCNN", "TimmViTBackbone", "TorchvisionViTBackbone",
    "WeightsNotFoundError", "build_backbone", "tokens_to_map", "IMAGENET_MEAN", "IMAGENET_STD",
]
