"""serving/status.py: each domain error's gRPC code, INTERNAL for everything else, and the deadline a
call's context turns into."""
import grpc
import pytest

from serving import errors
from serving.status import NO_DEADLINE_ABOVE_S, request_timeout, status_for


@pytest.mark.parametrize("kind, code", [
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.BackendUnavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (errors.Cancelled, grpc.StatusCode.CANCELLED),
    (errors.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
])
def test_each_domain_error_has_its_code_and_keeps_its_message(kind, code):
    assert status_for(kind("top_k 4 is out of range")) == (code, "top_k 4 is out of range")


@pytest.mark.parametrize("exc", [ValueError("secret detail"), LookupError("x"), KeyError("k"),
                                 errors.GatewayError("no code of its own")])
def test_anything_else_is_internal_without_its_message(exc):
    code, message = status_for(exc)
    assert code is grpc.StatusCode.INTERNAL
    assert message == f"internal error ({type(exc).__name__}); see the gateway's log"
    assert "secret detail" not in message


def test_a_subclass_of_a_domain_error_gets_the_domain_code():
    class UnknownConcept(errors.InvalidArgument):
        pass

    assert status_for(UnknownConcept("unknown concept 'purple'"))[0] is grpc.StatusCode.INVALID_ARGUMENT


class _Context:
    def __init__(self, remaining):
        self.remaining = remaining

    def time_remaining(self):
        return self.remaining


def test_request_timeout_is_the_time_left_or_none():
    assert request_timeout(_Context(None)) is None
    assert request_timeout(_Context(2.5)) == 2.5 and isinstance(request_timeout(_Context(2)), float)
    assert request_timeout(_Context(NO_DEADLINE_ABOVE_S)) == NO_DEADLINE_ABOVE_S
    # gRPC's "infinite" deadline reports ~9.2e18 s: that means no deadline, not a number to pass on
    assert request_timeout(_Context(9.2e18)) is None
    assert request_timeout(_Context(NO_DEADLINE_ABOVE_S + 1.0)) is None
