"""`salfctl export`: both flavours from the command line, parity figures printed, clear errors."""
import json

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2
from typer.testing import CliRunner

from clients.salfctl import app

pytestmark = pytest.mark.timeout(120)
runner = CliRunner()


def _backend(repo, name="salf_cbm") -> str:
    cfg = text_format.Parse((repo / name / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    return cfg.backend


def test_export_both_flavours_from_the_cli(random_bundle, tmp_path, synth_data):
    out = tmp_path / "repo"
    result = runner.invoke(app, ["export", str(random_bundle), "--out", str(out), "--flavour", "python",
                                 "--parity-images", str(synth_data / "test"), "--report", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    assert "python flavour, opset 18" in result.output
    assert "parity real/salf_cbm/logits" in result.output
    assert _backend(out) == "python" and (out / "salf_head" / "1" / "model.py").is_file()
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["parity"]["image_sets"] == ["random", "real"]

    result = runner.invoke(app, ["export", str(random_bundle), "--out", str(out), "--no-parity",
                                 "--tensorrt", "fp16", "--max-batch-size", "8"])
    assert result.exit_code == 0, result.output
    cfg = text_format.Parse((out / "salf_head" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert cfg.backend == "onnxruntime" and cfg.max_batch_size == 8
    assert cfg.optimization.execution_accelerators.gpu_execution_accelerator[0].name == "tensorrt"
    assert not (out / "salf_cbm" / "1" / "model.py").exists()


@pytest.mark.parametrize("args, message", [
    (["--flavour", "tf"], "unknown flavour 'tf'"),
    (["--flavour", "python", "--tensorrt", "fp16"], "--tensorrt applies to the onnxruntime flavour only"),
    (["--instance-kind", "tpu"], "instance_kind must be one of"),
])
def test_bad_options_exit_non_zero_with_a_message(random_bundle, tmp_path, args, message):
    result = runner.invoke(app, ["export", str(random_bundle), "--out", str(tmp_path / "r"), *args])
    assert result.exit_code != 0
    assert message in result.output
    assert not (tmp_path / "r" / "salf_cbm").exists()


def test_a_training_run_folder_is_accepted(random_bundle, tmp_path):
    import shutil

    shutil.copytree(random_bundle, tmp_path / "run" / "bundle")
    result = runner.invoke(app, ["export", str(tmp_path / "run"), "--out", str(tmp_path / "r"), "--no-parity"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "r" / "salf_cbm" / "1" / "model.onnx").is_file()


def test_missing_bundle_is_reported(tmp_path):
    result = runner.invoke(app, ["export", str(tmp_path / "nope"), "--out", str(tmp_path / "r")])
    assert result.exit_code == 1 and "not a SALF-CBM bundle" in result.output
