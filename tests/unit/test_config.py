"""Training presets: every shipped preset loads; typos are errors; round trip through to_dict."""
import json

import pytest

from training.config import available_presets, config_from_dict, load_config

PAPER_PRESETS = ["imagenet-rn50", "cub-rn50", "places365-rn50"]


def test_every_preset_loads_and_round_trips():
    names = available_presets()
    assert {"tiny-cpu", "imagenet-vitb16-cls", *PAPER_PRESETS} <= set(names)
    for name in names:
        cfg = load_config(name)
        assert config_from_dict(cfg.to_dict()) == cfg, name


@pytest.mark.parametrize("name", PAPER_PRESETS)
def test_paper_settings(name):
    cfg = load_config(name)
    assert cfg.backbone.arch == "resnet50" and cfg.backbone.layer == "layer4"
    assert cfg.backbone.input_size == (224, 224) and cfg.grid == (7, 7) and cfg.radius == 32
    assert cfg.similarity.source == "clip" and cfg.clip.model == "ViT-B-16"


def test_vit_preset_uses_cls():
    cfg = load_config("imagenet-vitb16-cls")
    assert cfg.backbone.arch == "vit_b_16" and cfg.backbone.use_cls


def test_tiny_cpu_preset():
    cfg = load_config("tiny-cpu")
    assert cfg.backbone.arch == "salf_tinycnn" and cfg.backbone.input_size == (112, 112)
    assert cfg.grid == (7, 7) and cfg.radius == 16 and cfg.similarity.source == "masks"
    assert cfg.pooling == "avg" and cfg.backbone_train.enabled


def test_load_by_path(tmp_path):
    doc = load_config("tiny-cpu").to_dict()
    doc["seed"] = 7
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(doc))
    assert load_config(str(path)).seed == 7


@pytest.mark.parametrize("patch,match", [
    ({"epochz": 3}, r"unknown key\(s\) \['epochz'\]"),
    ({"cbl": {"lr": 0.1, "patiense": 2}}, r"config.cbl: unknown key\(s\) \['patiense'\]"),
    ({"backbone": {"arch": "resnet50", "colour": 1}}, "unknown backbone keys"),
    ({"pooling": "max"}, "pooling must be 'avg' or 'softmax'"),
    ({"similarity": {"source": "llm"}}, "source must be 'masks' or 'clip'"),
    ({"head": 3}, "expected an object"),
])
def test_bad_configs_are_clear_errors(patch, match):
    with pytest.raises(ValueError, match=match):
        config_from_dict(patch)


def test_missing_preset_lists_the_presets():
    with pytest.raises(FileNotFoundError, match="tiny-cpu"):
        load_config("no-such-preset")


def test_invalid_json_names_the_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="broken.json: invalid JSON"):
        load_config(str(path))
