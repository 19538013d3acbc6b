"""Bundle model -> the two ONNX graphs of the Triton repository (docs/DESIGN.md, "Triton model repository").

``salf_cbm``: ``image`` uint8 ``[B, H, W, 3]`` -> ``concept_maps`` float32 ``[B, M, Gh, Gw]``,
``concept_scores`` float32 ``[B, M]``, ``logits`` float32 ``[B, L]``. Normalisation (``/255``, mean,
std) is inside the graph so clients send uint8 (4x less traffic than float32).

``salf_head``: ``concept_maps`` float32 ``[B, M, Gh, Gw]`` -> ``concept_scores``, ``logits``: the part
that local intervention re-runs.

Exporter (``exporter="auto"``): the TorchScript-based ``torch.onnx.export(..., dynamo=False)`` first.
For these graphs (conv backbone, bilinear resize, 1x1 conv, reduce, gemm) it folds BatchNorm into
the convolutions and gives a small, clean graph with named inputs/outputs and a symbolic batch axis,
in about a second for the tiny CNN (the dynamo exporter takes 10-20x longer on CPU); torchvision and
timm ViTs trace too. A backbone that tracing cannot follow falls back to the dynamo exporter (``torch.export`` with a symbolic ``batch`` dim), which handles them;
the report names the exporter used. Either graph then goes through ``onnxscript.optimizer``
(constant folding, Identity/dead-node removal: 53 -> 36 nodes for the tiny CNN); what remains
besides the model's own ops is the Shape/Slice/Concat that keeps the batch axis dynamic.
Opset ``OPSET`` (18) is read by every onnxruntime since 1.14, including the 1.19 that NVIDIA's
Triton 24.10 (2.51) images ship.
"""
from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from salf.contract.repository import CBM_INPUTS, CBM_OUTPUTS, HEAD_INPUTS, HEAD_OUTPUTS
from training.model import SalfCBM, SalfHead, normalize_uint8

log = logging.getLogger(__name__)

OPSET = 18


class ExportError(RuntimeError):
    """The ONNX graphs could not be produced, failed the checker, or failed parity."""


class UInt8SalfCBM(nn.Module):
    """``SalfCBM`` with the uint8 -> normalised float step in front: what ``salf_cbm/1/model.onnx`` computes.

    ``forward(image uint8 [B, H, W, 3])`` -> ``(concept_maps [B, M, Gh, Gw], concept_scores [B, M],
    logits [B, L])``, all float32.
    """

    def __init__(self, model: SalfCBM, mean, std) -> None:
        super().__init__()
        self.model = model
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.model(normalize_uint8(image, self.mean, self.std))


MAPS_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16}

# The head's weights are sparse (GLM-SAGA keeps ~30 of M = 4741 concepts per class): at most this share of
# non-zeros per class and the graphs gather them instead of multiplying by the dense [L, M] matrix.
SPARSE_HEAD_MAX_SHARE = 0.125


class SparseLinear(nn.Module):
    """``x @ W.T + b`` for a sparse ``W [L, M]``: class ``l`` gathers its ``K`` non-zero inputs
    (``index [L, K]``, zero-padded ``weight [L, K]``, K the largest count of any class) and sums them.

    Why (measured, paper size, onnxruntime, one thread): the dense product reads all 19 MB of ``W`` for
    every image and was 1.05 ms of an Intervene's 2.9 ms of head and gateway work (batch 2, before and
    after the edit); the gathered one reads 240 KB. The same sums up to float32 rounding order (export
    parity checks it against the dense torch model). A zero-padded slot adds ``0 * x``, as the dense
    product's zeros do."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach()
        nonzero = w != 0
        k = max(1, int(nonzero.sum(dim=1).max()))
        # non-zeros first, each class's in concept order (a stable sort of the mask)
        order = torch.sort(nonzero.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :k]
        self.register_buffer("index", order.contiguous())
        self.register_buffer("weight", torch.gather(w, 1, order).contiguous())
        self.register_buffer("bias", linear.bias.detach().clone())

    @staticmethod
    def applies(linear: nn.Linear) -> bool:
        w = linear.weight.detach()
        return int((w != 0).sum(dim=1).max()) <= SPARSE_HEAD_MAX_SHARE * w.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x[:, self.index] * self.weight).sum(dim=-1) + self.bias


@contextmanager
def gathered_head(head: SalfHead):
    """While exporting: ``head.linear`` swapped for its :class:`SparseLinear` when sparse enough, and put
    back afterwards (the model itself is not copied: a ResNet-50 backbone is 100 MB)."""
    if not SparseLinear.applies(head.linear):
        yield head
        return
    dense = head.linear
    head.linear = SparseLinear(dense)
    try:
        yield head
    finally:
        head.linear = dense


class MapsCast(nn.Module):
    """``salf_cbm`` with its ``concept_maps`` output cast to ``dtype`` (scores and logits are computed
    from the float32 maps before the cast, so predictions do not change): docs/DESIGN.md "Maps dtype"."""

    def __init__(self, cbm: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.cbm, self.dtype = cbm, dtype

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        maps, scores, logits = self.cbm(image)
        return maps.to(self.dtype), scores, logits


class HeadFromMaps(nn.Module):
    """``salf_head`` taking its maps in ``dtype`` (the maps dtype of ``salf_cbm``) and computing in float32."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(maps.float())


def _maps_dtype(maps_dtype: str) -> torch.dtype:
    if maps_dtype not in MAPS_TORCH_DTYPES:
        raise ValueError(f"maps dtype must be one of {tuple(MAPS_TORCH_DTYPES)}, got {maps_dtype!r}")
    return MAPS_TORCH_DTYPES[maps_dtype]


EXPORTERS = ("auto", "torchscript", "dynamo")


def _export_torchscript(module: nn.Module, example: torch.Tensor, path: Path, inputs: tuple[str, ...],
                        outputs: tuple[str, ...], opset: int) -> None:
    dynamic_axes = {name: {0: "batch"} for name in (*inputs, *outputs)}
    with torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter warns that it is legacy; it is chosen deliberately (module docstring).
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=FutureWarning)
        # Mean/std and the grid-size test become trace constants: intended, the input size is fixed.
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(module.eval(), (example,), str(path), input_names=list(inputs),
                          output_names=list(outputs), dynamic_axes=dynamic_axes, opset_version=opset,
                          do_constant_folding=True, dynamo=False)


def _export_dynamo(module: nn.Module, example: torch.Tensor, path: Path, inputs: tuple[str, ...],
                   outputs: tuple[str, ...], opset: int) -> None:
    batch = torch.export.Dim("batch", min=1, max=4096)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module.eval(), (example,), None, input_names=list(inputs),
                                    output_names=list(outputs), dynamic_shapes=({0: batch},),
                                    opset_version=opset, dynamo=True, verbose=False, optimize=True)
    program.save(str(path))


def _export(module: nn.Module, example: torch.Tensor, path: Path, inputs: tuple[str, ...],
            outputs: tuple[str, ...], opset: int, exporter: str = "auto") -> str:
    """Write ``module`` on ``example`` to ``path`` with a dynamic batch axis on every tensor; returns
    the exporter used (``torchscript`` or ``dynamo``)."""
    if exporter not in EXPORTERS:
        raise ValueError(f"unknown exporter {exporter!r}; choose one of {EXPORTERS}")
    path.parent.mkdir(parents=True, exist_ok=True)
    used = "dynamo" if exporter == "dynamo" else "torchscript"
    try:
        if used == "torchscript":
            _export_torchscript(module, example, path, inputs, outputs, opset)
    except Exception as exc:  # noqa: BLE001 - tracing fails with many exception types
        if exporter != "auto":
            raise ExportError(f"TorchScript ONNX export of {type(module).__name__} failed: {exc}") from exc
        log.warning("TorchScript export failed (%s: %s); using the dynamo exporter", type(exc).__name__, exc)
        used = "dynamo"
    if used == "dynamo":
        try:
            _export_dynamo(module, example, path, inputs, outputs, opset)
        except Exception as exc:  # noqa: BLE001
            raise ExportError(f"ONNX export of {type(module).__name__} failed with the dynamo exporter: {exc}") from exc
    _optimize(path)
    _set_output_shapes(path, example.numpy())
    return used


def _set_output_shapes(path: Path, example) -> None:
    """Record every output's real shape ``[batch, ...]`` in the graph.

    ONNX shape inference cannot see through the batch-preserving ``Resize`` sizes (Shape/Slice/Concat),
    so the maps come out as ``[batch, M, ?, ?]``; one onnxruntime run on the example gives the real
    dims, which the Triton configs and the gateway then read from the file.
    """
    import onnx
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    results = session.run(None, {session.get_inputs()[0].name: example})
    model = onnx.load(str(path))
    for value, array in zip(model.graph.output, results):
        dims = value.type.tensor_type.shape.dim
        del dims[:]
        dims.add().dim_param = "batch"
        for size in array.shape[1:]:
            dims.add().dim_value = int(size)
    onnx.save(model, str(path))


def _optimize(path: Path) -> None:
    """Fold constants and drop Identity/dead nodes in place (``onnxscript.optimizer``)."""
    import onnx
    from onnxscript import optimizer

    model = onnx.load(str(path))
    before = len(model.graph.node)
    model = optimizer.optimize(model)
    onnx.save(model, str(path))
    log.debug("optimised %s: %d -> %d nodes", path, before, len(model.graph.node))


def check_graph(path: Path, inputs: tuple[str, ...], outputs: tuple[str, ...]) -> "onnx.ModelProto":
    """Run ``onnx.checker`` (full check, with shape inference) and verify the I/O names; returns the model."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"{path} fails the ONNX checker: {exc}") from exc
    model = onnx.load(str(path))
    got_in = tuple(i.name for i in model.graph.input)
    got_out = tuple(o.name for o in model.graph.output)
    if got_in != inputs or got_out != outputs:
        raise ExportError(f"{path}: graph I/O is {got_in} -> {got_out}, expected {inputs} -> {outputs}")
    return model


def export_cbm(model: SalfCBM, mean, std, input_size: tuple[int, int], path: Path,
               opset: int = OPSET, exporter: str = "auto", maps_dtype: str = "float32") -> str:
    """Write ``salf_cbm``'s graph (uint8 image in, maps in ``maps_dtype``, float32 scores/logits out) to
    ``path``; returns the exporter used."""
    h, w = (int(v) for v in input_size)
    example = torch.randint(0, 256, (2, h, w, 3), dtype=torch.uint8)
    module: nn.Module = UInt8SalfCBM(model, mean, std)
    if _maps_dtype(maps_dtype) != torch.float32:
        module = MapsCast(module, _maps_dtype(maps_dtype))
    with gathered_head(model.head):
        used = _export(module, example, path, CBM_INPUTS, CBM_OUTPUTS, opset, exporter)
    check_graph(path, CBM_INPUTS, CBM_OUTPUTS)
    log.info("exported salf_cbm (opset %d, %s exporter) to %s", opset, used, path)
    return used


def export_head(head: SalfHead, num_concepts: int, grid: tuple[int, int], path: Path,
                opset: int = OPSET, exporter: str = "auto", maps_dtype: str = "float32") -> str:
    """Write ``salf_head``'s graph (concept maps in ``maps_dtype`` in, float32 scores/logits out) to
    ``path``; returns the exporter used."""
    dtype = _maps_dtype(maps_dtype)
    example = torch.randn(2, int(num_concepts), int(grid[0]), int(grid[1])).to(dtype)
    module: nn.Module = head if dtype == torch.float32 else HeadFromMaps(head)
    with gathered_head(head):
        used = _export(module, example, path, HEAD_INPUTS, HEAD_OUTPUTS, opset, exporter)
    check_graph(path, HEAD_INPUTS, HEAD_OUTPUTS)
    log.info("exported salf_head (opset %d, %s exporter) to %s", opset, used, path)
    return used


def graph_summary(path: Path) -> dict:
    """Node count and op types of an ONNX file, for the export report (shows the graph stays clean)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    ops: dict[str, int] = {}
    for node in model.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return {"nodes": len(model.graph.node), "ops": dict(sorted(ops.items())),
            "opset": max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)}
