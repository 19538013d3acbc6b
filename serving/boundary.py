"""The gateway's per-call error boundary and admission: every Gateway RPC and every Stream item passes
through :class:`Boundary` on the event loop.

- Gateway RPCs are registered as stream-unary handlers over raw bytes, so the boundary runs as soon
  as the call's headers arrive. It waits at most ``stream_idle_s`` for the request message (a client
  that sends nothing is dropped with DEADLINE_EXCEEDED), parses it (malformed protobuf is
  INVALID_ARGUMENT, not INTERNAL), admits it (``max_in_flight``: beyond it RESOURCE_EXHAUSTED at once,
  nothing queues without bound) and runs the servicer method in the inference pool, whose size is the
  in-flight limit, so as many requests reach the backend at once as are admitted (Triton's dynamic
  batcher needs that concurrency).
- The request's :class:`~serving.budget.Budget` carries its deadline and is cancelled when the client
  cancels or the call is cancelled: the gateway's own loops stop at their next check.
- Stream items share the same in-flight slots, but wait for one instead of being refused (a stream's
  window already bounds it).
"""
from __future__ import annotations

import asyncio
import collections
import logging
import time
from concurrent import futures

import grpc

from salf import load_api

from . import errors
from .budget import Budget
from .convert import GatewayServicer
from .metrics import GatewayMetrics
from .status import request_timeout, status_for

log = logging.getLogger(__name__)


# Trailing metadata of every Gateway call: the replica that answered (`salfctl serve --replica-name`, default
# HOSTNAME:PORT, the pod's name under Kubernetes), for logs and for tests behind a balancer.
REPLICA_HEADER = "x-salf-replica"


class Boundary:
    """Admission, idle-stream timeout, parsing, the inference pool, metrics and status codes for every
    Gateway RPC (module docstring)."""

    def __init__(self, metrics: GatewayMetrics, executor: futures.ThreadPoolExecutor, max_in_flight: int,
                 stream_idle_s: float) -> None:
        self.metrics = metrics
        self.executor = executor
        self.max_in_flight = int(max_in_flight)
        self.stream_idle_s = float(stream_idle_s)
        self.in_flight = 0  # touched only on the event loop
        self.draining = False  # set on shutdown: new calls are refused with UNAVAILABLE
        self._waiters: collections.deque[asyncio.Future] = collections.deque()  # stream items waiting for a slot
        # Sent as initial metadata of every call (REPLICA_HEADER): which replica answered, behind a balancer.
        self.replica = ""

    def handler(self, method: str, request_type, response_type, behavior) -> grpc.RpcMethodHandler:
        async def call(request_iterator, context):
            return await self._call(method, request_type, behavior, request_iterator, context)

        return grpc.stream_unary_rpc_method_handler(call, request_deserializer=None,
                                                    response_serializer=response_type.SerializeToString)

    async def _read(self, method: str, request_type, request_iterator):
        """The call's one request message, parsed; :class:`errors.DeadlineExceeded` when none arrives
        within ``stream_idle_s``."""
        try:
            raw = await asyncio.wait_for(request_iterator.__anext__(), self.stream_idle_s)
        except asyncio.TimeoutError:
            raise errors.DeadlineExceeded(f"no request message arrived within {self.stream_idle_s:g} s of the "
                                          f"call's start; the stream was dropped") from None
        except StopAsyncIteration:
            raise errors.InvalidArgument(f"{method} received no request message") from None
        try:
            return request_type.FromString(raw)
        except Exception as exc:  # protobuf's DecodeError, or a message it cannot parse at all
            raise errors.InvalidArgument(f"the request is not a valid {request_type.DESCRIPTOR.full_name} "
                                         f"({len(raw)} bytes): {exc}") from None

    async def _call(self, method, request_type, behavior, request_iterator, context):
        start = time.perf_counter()
        code, message = grpc.StatusCode.OK, ""
        budget = Budget(request_timeout(context))
        admitted = False
        if self.replica:
            # In the trailers, not the initial metadata: a response that sent headers is "committed" and
            # neither gRPC's retry policy nor Envoy retries its UNAVAILABLE (Trailers-Only errors they do).
            context.set_trailing_metadata(((REPLICA_HEADER, self.replica),))
        try:
            # The message first: a call that is still waiting for its body is no work yet and does not
            # count against the in-flight limit (it costs the event loop a few hundred bytes).
            request = await self._read(method, request_type, request_iterator)
            if self.draining:
                raise errors.BackendUnavailable("the gateway is shutting down; retry on another instance")
            if self.in_flight >= self.max_in_flight:
                raise errors.ResourceExhausted(f"the gateway is at its limit of {self.max_in_flight} requests in "
                                               f"flight; retry with backoff")
            admitted = True
            self.in_flight += 1
            self.metrics.in_flight.labels(method).inc()
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self.executor, behavior, request, budget)
        except asyncio.CancelledError:
            budget.cancel()  # the worker thread stops at its next check
            code = grpc.StatusCode.CANCELLED
            log.info("%s -> CANCELLED (the client went away, or the shutdown grace ended)", method)
            raise
        except Exception as exc:
            code, message = status_for(exc)
            if code is grpc.StatusCode.INTERNAL:
                log.error("%s failed", method, exc_info=exc)
            else:
                log.info("%s -> %s: %s", method, code.name, message)
        finally:
            if admitted:
                self._release(method)
            self.metrics.observe_request(method, code.name, time.perf_counter() - start)
        await context.abort(code, message, trailing_metadata=((REPLICA_HEADER, self.replica),) if self.replica else ())

    def _release(self, method: str) -> None:
        self.in_flight -= 1
        self.metrics.in_flight.labels(method).dec()
        self._wake_next()

    def _wake_next(self) -> None:
        while self._waiters:  # the next waiting stream item, if any, takes the free slot
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                break

    async def _acquire(self, method: str) -> None:
        """A slot for one stream item, waiting for one if the gateway is at its limit (a stream is
        cooperative: its window already bounds it; a unary call is refused at the limit instead)."""
        while self.in_flight >= self.max_in_flight:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._wake_next()  # woken, then cancelled before taking the slot: pass the wake-up on
                raise
        self.in_flight += 1
        self.metrics.in_flight.labels(method).inc()

    # ---------------------------------------------------------- the Stream RPC

    def stream_handler(self, servicer: GatewayServicer, default_window: int) -> grpc.RpcMethodHandler:
        pb, _ = load_api()

        async def call(request_iterator, context):
            async for response in self._stream(pb, servicer, default_window, request_iterator, context):
                yield response

        return grpc.stream_stream_rpc_method_handler(call, request_deserializer=None,
                                                     response_serializer=pb.StreamResponse.SerializeToString)

    async def _stream(self, pb, servicer, default_window: int, request_iterator, context):
        """Read items while fewer than the stream's window are being worked on, run each like its unary
        RPC (same servicer method, admission and status codes, but as a ``StreamError`` in its answer),
        yield answers as they complete. The stream fails as a whole only for what has no item to blame:
        a malformed message, ``stream_idle_s`` without a message while nothing is in flight, shutdown."""
        start = time.perf_counter()
        code, message = grpc.StatusCode.OK, ""
        budget = Budget(request_timeout(context))  # the whole stream's deadline, shared by its items
        if self.replica:
            context.set_trailing_metadata(((REPLICA_HEADER, self.replica),))
        messages = request_iterator.__aiter__()
        window: int | None = None
        items: set[asyncio.Task] = set()
        reading: asyncio.Future | None = None
        ended = False
        try:
            while True:
                if reading is None and not ended and (window is None or len(items) < window):
                    reading = asyncio.ensure_future(messages.__anext__())
                pending = items | ({reading} if reading is not None else set())
                if not pending:
                    break
                done, _ = await asyncio.wait(pending, timeout=None if items else self.stream_idle_s,
                                             return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    raise errors.DeadlineExceeded(f"no message arrived on the stream within {self.stream_idle_s:g} s "
                                                  f"while none of its items was in flight; the stream was dropped")
                for task in done:
                    if task is not reading:
                        items.discard(task)
                        yield task.result()
                        continue
                    reading = None
                    try:
                        raw = task.result()
                    except StopAsyncIteration:
                        ended = True
                        continue
                    try:
                        item = pb.StreamRequest.FromString(raw)
                    except Exception as exc:  # protobuf's DecodeError: no id to answer, the stream fails
                        raise errors.InvalidArgument(f"stream message {len(raw)} bytes is not a valid "
                                                     f"salf.v1.StreamRequest: {exc}") from None
                    if window is None:
                        window = min(int(item.window) or default_window, self.max_in_flight)
                    items.add(asyncio.ensure_future(self._stream_item(pb, servicer, item, budget)))
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            log.info("Stream -> CANCELLED (the client went away, or the shutdown grace ended)")
            raise
        except Exception as exc:
            code, message = status_for(exc)
            log.info("Stream -> %s: %s", code.name, message)
        finally:
            if code is not grpc.StatusCode.OK or items:
                budget.cancel()  # items still running stop at their next check
            for task in (*items, *([reading] if reading is not None else [])):
                task.cancel()
            self.metrics.observe_request("Stream", code.name, time.perf_counter() - start)
        if code is not grpc.StatusCode.OK:
            await context.abort(code, message)

    async def _stream_item(self, pb, servicer, item, budget: Budget):
        kind = item.WhichOneof("request")
        method = f"Stream.{(kind or 'empty').capitalize()}"
        start = time.perf_counter()
        code, message = grpc.StatusCode.OK, ""
        admitted = False
        try:
            if kind is None:
                raise errors.InvalidArgument("stream item has neither a predict nor an explain request")
            if self.draining:
                raise errors.BackendUnavailable("the gateway is shutting down; retry on another instance")
            await self._acquire(method)
            admitted = True
            behavior = servicer.Predict if kind == "predict" else servicer.Explain
            loop = asyncio.get_running_loop()
            response = await loop.run_in_executor(self.executor, behavior, getattr(item, kind), budget)
            return pb.StreamResponse(id=item.id, **{kind: response})
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:
            code, message = status_for(exc)
            if code is grpc.StatusCode.INTERNAL:
                log.error("%s item %r failed", method, item.id, exc_info=exc)
            return pb.StreamResponse(id=item.id, error=pb.StreamError(code=code.name, message=message))
        finally:
            if admitted:
                self._release(method)
            self.metrics.observe_request(method, code.name, time.perf_counter() - start)
