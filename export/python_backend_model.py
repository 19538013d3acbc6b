"""Triton Python-backend model that runs this version's ``model.onnx`` with onnxruntime.

Copied by ``salfctl export --flavour python`` to ``<model>/1/model.py`` of both ``salf_cbm`` and
``salf_head``; it reads names, dtypes and dims from the model's ``config.pbtxt``, so one file serves
both. It runs inside Triton's python-backend stub, which needs ``numpy<2`` and ``onnxruntime`` in the
Python it runs (``make triton-env``); it imports nothing from this repository.

- ``initialize`` parses the config and builds the onnxruntime session once (CUDA execution provider
  on a GPU instance when onnxruntime-gpu is installed, else CPU).
- ``execute`` validates every request; the valid ones are concatenated along the batch axis and run
  in ONE onnxruntime call (this is where Triton's dynamic batching pays off), then split back. It
  returns exactly one response per request, in order; a bad request gets its own error response.
  Only a fault of the whole model raises.
- Each response carries the outputs its request asked for (all of them when it named none): the
  gateway's Predict asks ``salf_cbm`` for scores and logits only, so the concept maps (952 KB per image
  at the paper's size) are neither copied into the response nor sent.
"""
import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils



def _log(level: str, message: str) -> None:
    """Into Triton's own log (pb_utils.Logger, python backend >= 23.04)."""
    logger = getattr(pb_utils, "Logger", None)
    if logger is not None:
        getattr(logger, f"log_{level}")(message)


def _numpy_dtype(triton_type: str) -> np.dtype:
    return np.dtype(pb_utils.triton_string_to_numpy(triton_type))


class TritonPythonModel:
    """One onnxruntime session per model instance."""

    def initialize(self, args):
        self.config = json.loads(args["model_config"])
        self.name = self.config["name"]
        self.max_batch_size = int(self.config.get("max_batch_size", 0))
        self.inputs = [(t["name"], _numpy_dtype(t["data_type"]), tuple(int(d) for d in t["dims"]))
                       for t in self.config["input"]]
        self.outputs = [t["name"] for t in self.config["output"]]
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        if not os.path.isfile(path):
            raise pb_utils.TritonModelException(f"{self.name}: {path} does not exist")
        options = ort.SessionOptions()
        threads = int(self.config.get("parameters", {}).get("intra_op_thread_count", {}).get("string_value", "0"))
        options.intra_op_num_threads = threads
        # No spinning after a run: the pool's threads would hold the cores for a while after each batch,
        # against the next request's arrival and the gateway beside Triton (a 54.5 vs 55.0 ms forward at
        # the paper's size, the same within noise; measured, docs/performance.md).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = self._providers(args)
        self.session = ort.InferenceSession(path, options, providers=providers)
        _log("info", f"{self.name}: loaded {path} with {self.session.get_providers()}")

    @staticmethod
    def _providers(args):
        if args.get("model_instance_kind") == "GPU" and "CUDAExecutionProvider" in ort.get_available_providers():
            device = int(args.get("model_instance_device_id", 0))
            return [("CUDAExecutionProvider", {"device_id": device}), "CPUExecutionProvider"]
        return ["CPUExecutionProvider"]

    def _read(self, request):
        """The request's inputs as ``{name: array [b, *dims]}``; ValueError names what is wrong."""
        feeds, batch = {}, None
        for name, dtype, dims in self.inputs:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                raise ValueError(f"{self.name}: missing input {name!r}")
            array = tensor.as_numpy()
            if array.dtype != dtype:
                raise ValueError(f"{self.name}: input {name!r} has dtype {array.dtype}, expected {dtype}")
            if tuple(array.shape[1:]) != dims or array.ndim != len(dims) + 1:
                raise ValueError(f"{self.name}: input {name!r} has shape {list(array.shape)}, "
                                 f"expected [batch, {', '.join(map(str, dims))}]")
            if batch is not None and array.shape[0] != batch:
                raise ValueError(f"{self.name}: inputs disagree on the batch size")
            batch = array.shape[0]
            if not 1 <= batch <= max(self.max_batch_size, 1):
                raise ValueError(f"{self.name}: batch size {batch} outside 1..{self.max_batch_size}")
            feeds[name] = array
        return feeds, batch

    def _wanted(self, request):
        """The outputs ``request`` asked for, in the config's order; all of them when it named none."""
        names = set(request.requested_output_names() or ())
        unknown = names - set(self.outputs)
        if unknown:
            raise ValueError(f"{self.name}: unknown output(s) {sorted(unknown)}; the model has {self.outputs}")
        return [o for o in self.outputs if o in names] or list(self.outputs)

    @staticmethod
    def _response(names, outputs):
        return pb_utils.InferenceResponse(
            output_tensors=[pb_utils.Tensor(name, np.ascontiguousarray(value)) for name, value in zip(names, outputs)])

    @staticmethod
    def _error(message):
        return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message))

    def execute(self, requests):
        responses = [None] * len(requests)
        good = []  # (request index, feeds, batch size, wanted outputs)
        for i, request in enumerate(requests):
            try:
                feeds, batch = self._read(request)
                wanted = self._wanted(request)
            except ValueError as exc:
                responses[i] = self._error(str(exc))
                continue
            good.append((i, feeds, batch, wanted))
        if good:
            try:
                self._run_merged(good, responses)
            except Exception as exc:  # noqa: BLE001 - onnxruntime raises several types
                # The merged run failed: run each request alone so only the faulty one gets the error.
                _log("warn", f"{self.name}: merged run of {len(good)} requests failed ({exc}); running them one by one")
                self._run_each(good, responses)
        return responses

    def _run_merged(self, good, responses):
        names = [name for name, _, _ in self.inputs]
        feeds = {n: np.concatenate([f[n] for _, f, _, _ in good], axis=0) for n in names}
        needed = set().union(*(wanted for _, _, _, wanted in good))
        run = [o for o in self.outputs if o in needed]
        outputs = dict(zip(run, self.session.run(run, feeds)))
        start = 0
        for i, _, batch, wanted in good:
            responses[i] = self._response(wanted, [outputs[o][start:start + batch] for o in wanted])
            start += batch

    def _run_each(self, good, responses):
        for i, feeds, _, wanted in good:
            try:
                responses[i] = self._response(wanted, self.session.run(wanted, feeds))
            except Exception as exc:  # noqa: BLE001
                responses[i] = self._error(f"{self.name}: inference failed: {exc}")

    def finalize(self):
        self.session = None
