"""The explorer's request guards (clients/ui/app.py): Host, Origin, launch secret, and which static files
may be read."""
import re
from pathlib import Path

import pytest

from clients.ui.app import STATIC_TYPES, host_allowed, origin_allowed, secret_matches, split_host, static_file, \
    static_name

STATIC = Path(__file__).resolve().parents[2] / "clients" / "ui" / "static"


@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:8080", ("127.0.0.1", 8080)),
    ("LocalHost:80", ("localhost", 80)),
    ("[::1]:9000", ("::1", 9000)),
    ("example.com", ("example.com", None)),
])
def test_split_host(text, expected):
    assert split_host(text) == expected


@pytest.mark.parametrize("text", [":80", "[::1", "host:", "host:abc"])
def test_split_host_refuses_malformed(text):
    with pytest.raises(ValueError):
        split_host(text)


@pytest.mark.parametrize("host, ok", [
    ("127.0.0.1:8080", True),
    ("localhost:8080", True),
    ("[::1]:8080", True),
    ("192.168.1.20:8080", True),         # an IP literal cannot be a rebinding name
    ("127.0.0.1:8081", False),           # another port
    ("127.0.0.1", False),                # no port: not what a browser sends for this server
    ("attacker.example:8080", False),    # DNS rebinding: a foreign name resolving to us
    ("localhost.attacker.example:8080", False),
    ("", False),
    (None, False),
    ("[::1:8080", False),
])
def test_host_allowed(host, ok):
    assert host_allowed(host, 8080, "127.0.0.1") is ok


def test_host_allowed_accepts_the_bound_name():
    assert host_allowed("myhost.lan:8080", 8080, "myhost.lan")
    assert not host_allowed("myhost.lan:8080", 8080, "127.0.0.1")


@pytest.mark.parametrize("origin, fetch_site, ok", [
    (None, None, True),                           # navigation, curl
    ("http://127.0.0.1:8080", "same-origin", True),
    ("http://127.0.0.1:8080", "cross-site", False),
    ("http://evil.example", None, False),
    ("http://127.0.0.1:9999", "same-site", False),  # another local port is another origin
    ("https://127.0.0.1:8080", None, False),
    ("null", None, False),                        # sandboxed iframes, file:// pages
    (None, "cross-site", False),
    (None, "same-site", False),                   # an <img> on another local port: no Origin, but labelled
    (None, "none", True),                         # typed or opened from the terminal
])
def test_origin_allowed(origin, fetch_site, ok):
    assert origin_allowed(origin, "127.0.0.1:8080", fetch_site) is ok


def test_secret_matches():
    assert secret_matches("s3cret-value-1234", "s3cret-value-1234")
    assert not secret_matches("s3cret-value-123", "s3cret-value-1234")
    assert not secret_matches(None, "s3cret-value-1234")
    assert not secret_matches("", "s3cret-value-1234")


@pytest.mark.parametrize("rest", ["app.js", "app.css", "index.html", "js/geometry.js", "js/state.js"])
def test_static_name_serves_the_page_files(rest):
    assert static_name(rest) == rest
    assert static_file(rest) == (STATIC / rest).read_bytes()


@pytest.mark.parametrize("rest", [
    "../app.py", "js/../../app.py", "..", ".", "js/./state.js", "./app.js",
    "%2e%2e/app.py", "..%2fapp.py", "js/..%2f..%2fapp.py", "%2E%2E%2Fapp.py", "..\\app.py", "js\\..\\..\\app.py",
    "/etc/passwd", "js//state.js", "", "js/", "app.py", "__init__.py", "app.js.map", "app", ".htaccess", "app.js%00.py",
])
def test_static_name_refuses_paths_out_of_static_and_unknown_suffixes(rest):
    assert static_name(rest) is None


def test_static_file_is_none_for_a_missing_file():
    assert static_name("js/nothing.js") == "js/nothing.js"
    assert static_file("js/nothing.js") is None


def test_every_module_the_page_imports_exists_with_a_known_suffix():
    """index.html's module and, transitively, every static import: all under static/, all served as .js."""
    seen, todo = set(), ["app.js"]
    page = (STATIC / "index.html").read_text()
    assert '<script type="module" src="/static/app.js"></script>' in page
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        assert static_name(name) == name and STATIC_TYPES[Path(name).suffix].startswith("text/javascript")
        text = static_file(name).decode()
        for spec in re.findall(r'^import .* from "([^"]+)";$', text, re.M):
            assert spec.startswith("./"), spec
            todo.append((Path(name).parent / spec).as_posix().removeprefix("./"))
    assert {p.relative_to(STATIC).as_posix() for p in STATIC.rglob("*.js")} == seen  # no module left unloaded
