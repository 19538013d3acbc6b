"""config.pbtxt generation: both flavours parse as Triton's own ModelConfig and carry the real shapes."""
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from export.repository import graph_io, write_flavour
from export.triton_config import Enum, TensorSpec, TritonOptions, model_config, to_pbtxt, validate_pbtxt

CFG = model_config_pb2.ModelConfig
IMAGE = TensorSpec("image", "uint8", (64, 64, 3))
OUTS = [TensorSpec("concept_maps", "float32", (6, 7, 7)), TensorSpec("concept_scores", "float32", (6,)),
        TensorSpec("logits", "float32", (3,))]


def parse(path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_emitter_writes_messages_lists_enums_and_escapes():
    text = to_pbtxt({"name": 'a"b', "dims": [1, 2], "kind": Enum("KIND_CPU"), "flag": True,
                     "sub": {"x": 1}, "rep": [{"y": 2}, {"y": 3}], "skip": None})
    assert text.splitlines() == ['name: "a\\"b"', "dims: [ 1, 2 ]", "kind: KIND_CPU", "flag: true",
                                 "sub {", "  x: 1", "}", "rep {", "  y: 2", "}", "rep {", "  y: 3", "}"]


@pytest.mark.parametrize("flavour", ["onnxruntime", "python"])
def test_config_parses_as_triton_model_config(flavour):
    cfg = text_format.Parse(to_pbtxt(model_config("salf_cbm", flavour, [IMAGE], OUTS)), CFG())
    assert cfg.backend == flavour and cfg.max_batch_size == 32
    assert cfg.input[0].data_type == model_config_pb2.TYPE_UINT8 and list(cfg.input[0].dims) == [64, 64, 3]
    assert [o.name for o in cfg.output] == ["concept_maps", "concept_scores", "logits"]
    assert all(o.data_type == model_config_pb2.TYPE_FP32 for o in cfg.output)
    assert list(cfg.output[0].dims) == [6, 7, 7]
    assert cfg.HasField("dynamic_batching") and cfg.dynamic_batching.max_queue_delay_microseconds == 0
    assert cfg.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_AUTO
    assert cfg.version_policy.latest.num_versions == 2  # the newest two: a version switch never strands requests in flight
    warm = cfg.model_warmup[0]
    assert warm.batch_size == 1 and warm.inputs["image"].zero_data
    assert list(warm.inputs["image"].dims) == [64, 64, 3]
    assert cfg.parameters["intra_op_thread_count"].string_value == "0"
    assert not cfg.optimization.execution_accelerators.gpu_execution_accelerator


def test_tensorrt_accelerator_behind_flag():
    opts = TritonOptions(tensorrt="fp16", instance_kind="gpu", instance_count=2, max_queue_delay_us=500)
    cfg = text_format.Parse(to_pbtxt(model_config("salf_head", "onnxruntime", OUTS[:1], OUTS[1:], opts)), CFG())
    acc = cfg.optimization.execution_accelerators.gpu_execution_accelerator
    assert [a.name for a in acc] == ["tensorrt"] and acc[0].parameters["precision_mode"] == "FP16"
    assert cfg.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    assert cfg.instance_group[0].count == 2 and cfg.dynamic_batching.max_queue_delay_microseconds == 500


@pytest.mark.parametrize("kwargs, match", [
    ({"max_batch_size": 0}, "max_batch_size"),
    ({"instance_kind": "tpu"}, "instance_kind"),
    ({"tensorrt": "int8"}, "tensorrt precision"),
    ({"instance_count": 0}, "instance_count"),
    ({"max_queue_delay_us": -1}, "max_queue_delay_us"),
])
def test_bad_options_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        model_config("salf_cbm", "python", [IMAGE], OUTS, TritonOptions(**kwargs))


def test_unknown_flavour_and_dtype_are_rejected():
    with pytest.raises(ValueError, match="unknown flavour 'tensorflow'"):
        model_config("salf_cbm", "tensorflow", [IMAGE], OUTS)
    with pytest.raises(ValueError, match="dtype 'float64'"):
        model_config("salf_cbm", "python", [TensorSpec("image", "float64", (3,))], OUTS)


def test_invalid_pbtxt_is_reported_with_its_path():
    with pytest.raises(ValueError, match="x/config.pbtxt is not a valid Triton ModelConfig"):
        validate_pbtxt("max_batch_size: 4\nno_such_field: 1\n", where="x/config.pbtxt")


def test_exported_configs_match_graph_shapes_in_both_flavours(exported_repo, tmp_path):
    """The session export (python flavour) switched to onnxruntime in a copy: one export, two flavours."""
    import shutil

    repo = tmp_path / "repo"
    shutil.copytree(exported_repo, repo)
    for flavour in ("python", "onnxruntime"):
        write_flavour(repo, flavour)
        for name in ("salf_cbm", "salf_head"):
            cfg = parse(repo / name / "config.pbtxt")
            ins, outs = graph_io(repo / name / "1" / "model.onnx")
            assert cfg.backend == flavour and cfg.name == name
            assert [(i.name, list(i.dims)) for i in cfg.input] == [(t.name, list(t.dims)) for t in ins]
            assert [(o.name, list(o.dims)) for o in cfg.output] == [(t.name, list(t.dims)) for t in outs]
            assert (repo / name / "1" / "model.py").exists() == (flavour == "python")
    assert '"flavour": "onnxruntime"' in (repo / "salf_model.json").read_text()
    assert [t.dims for t in graph_io(repo / "salf_cbm" / "1" / "model.onnx")[1]] == [(6, 7, 7), (6,), (3,)]


def test_the_batching_settings_carry_their_reason():
    """The measured default says why in the file itself; a chosen delay says it was chosen."""
    text = to_pbtxt(model_config("salf_cbm", "python", [IMAGE], OUTS))
    assert "# dynamic_batching, measured at the paper's size" in text and "docs/batching.md" in text
    assert text.index("# dynamic_batching") < text.index("dynamic_batching {")
    chosen = to_pbtxt(model_config("salf_cbm", "python", [IMAGE], OUTS, TritonOptions(max_queue_delay_us=500)))
    assert "set by salfctl export --max-queue-delay-us" in chosen and "max_queue_delay_microseconds: 500" in chosen
    assert text_format.Parse(chosen, CFG()).dynamic_batching.max_queue_delay_microseconds == 500
