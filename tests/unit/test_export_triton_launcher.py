"""The Triton launcher's pieces that need no running server: locating the install, the stub, ports."""
import os

import pytest

from export.triton_server import STUB_NAME, TritonError, TritonServer, find_install, free_ports, prepare_backends


def test_missing_environment_says_how_to_create_it(tmp_path):
    with pytest.raises(TritonError, match=r"no Triton server under .*run `make triton-env`"):
        find_install(tmp_path / "no-env")


def test_environment_variable_selects_the_install(tmp_path, monkeypatch):
    monkeypatch.setenv("SALF_TRITON_ENV", str(tmp_path / "elsewhere"))
    with pytest.raises(TritonError, match="elsewhere"):
        find_install()


def test_installed_server_and_stub_are_ready():
    """`make triton-env` (a dependency of `make test`) left a runnable server with the 3.11 stub in place."""
    install = find_install()
    assert os.access(install.binary, os.X_OK)
    backends = prepare_backends(install)  # idempotent: a second call changes nothing
    stub = backends / "python" / STUB_NAME
    assert stub.is_file() and os.access(stub, os.X_OK)
    assert (backends / "python" / "libtriton_python.so").is_file()
    mtime = stub.stat().st_mtime_ns
    prepare_backends(install)
    assert stub.stat().st_mtime_ns == mtime


def test_free_ports_are_distinct_and_bindable():
    import socket

    ports = free_ports(3)
    assert len(set(ports)) == 3
    for port in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_missing_repository_is_a_clear_error(tmp_path):
    with pytest.raises(TritonError, match="model repository .*nothing does not exist"):
        TritonServer(tmp_path / "nothing")


def test_empty_repository_says_how_to_fill_it(tmp_path):
    (tmp_path / "README.md").write_text("x")
    with pytest.raises(TritonError, match=r"holds no models .*salfctl export BUNDLE"):
        TritonServer(tmp_path)


def test_server_urls_and_stop_before_start(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.pbtxt").write_text("")
    server = TritonServer(tmp_path, http_port=8100, grpc_port=8101, metrics_port=8102)
    assert server.stop() is None and not server.alive
    server.http_port, server.grpc_port, server.metrics_port = 1, 2, 3
    assert (server.http_url, server.grpc_url, server.metrics_url) == (
        "127.0.0.1:1", "127.0.0.1:2", "http://127.0.0.1:3/metrics")
