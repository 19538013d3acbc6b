"""`salfctl export BUNDLE --out DIR` and `salfctl triton`. Heavy imports happen inside the commands."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import typer

from salf.cli import EXIT_FAILED, EXIT_USAGE, command, fail

log = logging.getLogger(__name__)


def export_errors() -> dict[type, int]:
    """An export that cannot be done (bad bundle, parity failure, bad option) exits 1 with the reason."""
    from .onnx_graphs import ExportError

    return {ExportError: EXIT_FAILED, ValueError: EXIT_FAILED, FileNotFoundError: EXIT_FAILED}


def _quiet_optimizer_logs() -> None:
    # onnxscript's optimizer logs every pass at INFO; keep the export output readable.
    for name in ("onnxscript", "onnx_ir"):
        logging.getLogger(name).setLevel(logging.WARNING)


def export(
    bundle: Path = typer.Argument(..., help="bundle folder (bundle.json + weights.safetensors), or a training run "
                                            "folder holding bundle/"),
    out: Path = typer.Option(Path("model_repository"), "--out", "-o", help="Triton model repository to write"),
    flavour: str = typer.Option("onnxruntime", "--flavour", "-f",
                                help="onnxruntime (native backend, NVIDIA images) | python (model.py + onnxruntime)"),
    parity: bool = typer.Option(True, "--parity/--no-parity", help="torch vs onnxruntime check (fails the export)"),
    parity_images: Optional[Path] = typer.Option(None, "--parity-images",
                                                 help="folder of real images for the parity check (e.g. DATA/test)"),
    atol: float = typer.Option(1e-4, "--atol", help="parity: absolute tolerance on scores and logits (fp32; the "
                                                        "maps' bound is relative to their own scale)"),
    rtol: float = typer.Option(1e-4, "--rtol", help="parity: tolerance relative to max |torch output|"),
    exporter: str = typer.Option("auto", "--exporter",
                                 help="auto (TorchScript, dynamo if tracing fails) | torchscript | dynamo"),
    maps_dtype: str = typer.Option("float32", "--maps-dtype",
                                   help="float32 | float16: the concept maps out of salf_cbm and into salf_head (float16 "
                                        "halves them on the Triton hop and in the gateway cache; predictions unchanged; "
                                        "docs/DESIGN.md 'Maps dtype')"),
    max_batch_size: int = typer.Option(32, "--max-batch-size"),
    max_queue_delay_us: int = typer.Option(0, "--max-queue-delay-us",
                                           help="dynamic batcher delay (µs); 0 measured best on CPU (docs/batching.md)"),
    instance_kind: str = typer.Option("auto", "--instance-kind", help="auto | cpu | gpu"),
    instance_count: int = typer.Option(1, "--instance-count"),
    tensorrt: Optional[str] = typer.Option(None, "--tensorrt",
                                           help="fp16 | fp32: TensorRT accelerator on GPU instances (onnxruntime flavour)"),
    threads: int = typer.Option(0, "--threads", help="onnxruntime intra-op threads per instance (0: default)"),
    report_json: Optional[Path] = typer.Option(None, "--report", help="also write the export report here"),
) -> None:
    """Export a bundle to a Triton model repository (salf_cbm + salf_head, configs, metadata)."""
    from .parity import Tolerance
    from .repository import export_repository
    from .triton_config import TritonOptions

    _quiet_optimizer_logs()
    if tensorrt and flavour != "onnxruntime":
        fail("--tensorrt applies to the onnxruntime flavour only", EXIT_USAGE)
    options = TritonOptions(max_batch_size=max_batch_size, max_queue_delay_us=max_queue_delay_us,
                            instance_kind=instance_kind, instance_count=instance_count, tensorrt=tensorrt,
                            intra_op_threads=threads)
    if not (bundle / "bundle.json").is_file() and (bundle / "bundle" / "bundle.json").is_file():
        bundle = bundle / "bundle"  # a training run folder (docs/DESIGN.md, "Training run layout")
    options.validate()
    report = export_repository(bundle, out, flavour=flavour, parity=parity, parity_images=parity_images,
                               options=options, tolerance=Tolerance(atol=atol, rtol=rtol), exporter=exporter,
                               maps_dtype=maps_dtype)
    doc = report.to_dict()
    if report_json:
        report_json.write_text(json.dumps(doc, indent=2) + "\n")
    typer.echo(f"exported {bundle} -> {out} ({flavour} flavour, opset {report.opset}, {report.seconds:.1f} s)")
    if report.parity:
        ratios = report.parity["ratio"]
        for key, value in report.parity["max_abs_diff"].items():
            typer.echo(f"  parity {key:40s} max abs diff {value:.3e}  (worst diff/bound {ratios[key]:.3f})")


def triton(
    model_repository: Path = typer.Option(Path("model_repository"), "--model-repository", "-m"),
    http_port: int = typer.Option(8000, "--http-port"),
    grpc_port: int = typer.Option(8001, "--grpc-port"),
    metrics_port: int = typer.Option(8002, "--metrics-port"),
    env: Optional[Path] = typer.Option(None, "--env", help="Triton environment (default .venv-triton)"),
    bind: str = typer.Option("127.0.0.1", "--bind", help="interface Triton listens on (0.0.0.0 opens it; no auth)"),
) -> None:
    """Run the pytriton-shipped Triton server against a repository until Ctrl-C (needs `make triton-env`)."""
    from .triton_server import main

    args = ["--model-repository", str(model_repository), "--http-port", str(http_port), "--grpc-port", str(grpc_port),
            "--metrics-port", str(metrics_port), "--bind", bind]
    if env:
        args += ["--env", str(env)]
    raise typer.Exit(code=main(args))


def register(app: typer.Typer) -> None:
    """Add this part's commands to the top-level `salfctl` app."""
    command(app, "export", errors=export_errors, prefix="export failed")(export)
    command(app, "triton")(triton)
