"""The explorer's HTTP layer (standard library only): one page, its scripts (ES modules) and style, and a small JSON
API that forwards to :class:`clients.ui.session.Explorer`.

Who may talk to it. Binding to loopback is not enough: any page open in the same browser can send
requests to a local port (cross-site requests), and a hostile DNS name can be pointed at 127.0.0.1
after the page loaded (DNS rebinding). So every request must pass, in order:

1. **Host**: the ``Host`` header names this server, by an IP literal, ``localhost`` or the ``--host``
   name, with its port (a rebinding attack always arrives under the attacker's DNS name);
2. **Origin**: when the browser sends ``Origin`` (every cross-origin request and every POST), it is this
   server's own, and ``Sec-Fetch-Site`` is ``same-origin`` or ``none`` (another local port is
   "same-site" to the browser, which then sends even a SameSite=Strict cookie);
3. **secret**: a per-launch secret (``secrets.token_urlsafe``), printed in the URL by `salfctl ui`
   (``/?secret=...``, as Jupyter does). Opening that URL sets an HttpOnly, SameSite=Strict cookie that
   authorises the page's later requests; the page also sends the secret as ``X-Salf-Secret``.

No CORS headers are ever sent, so a foreign page can neither read an answer nor pass a preflight.
The gateway's token stays in this process (the :class:`SalfClient`), never in the page.
"""
from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import re
import secrets
import threading
from http.cookies import SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import grpc

from .session import Explorer, UnknownImage, UserError, rpc_error

log = logging.getLogger(__name__)

MAX_BODY = 64 * 1024 * 1024  # an image upload (the gateway's own message cap)
# the page's files, by suffix: modules must come with a JavaScript type (the browser refuses others, nosniff)
STATIC_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
                ".html": "text/html; charset=utf-8"}
_STATIC_PART = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")  # no "..", ".", "%", "\\" nor empty parts
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
                               "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",  # the page's URL carries the secret
    "Cache-Control": "no-store",
    "Cross-Origin-Resource-Policy": "same-origin",
}


# ------------------------------------------------------------------ who may ask (pure functions)

def split_host(host: str) -> tuple[str, int | None]:
    """``"name:port"``, ``"[::1]:port"`` or ``"name"`` -> ``(name, port or None)``; ValueError if malformed."""
    host = host.strip()
    if host.startswith("["):
        end = host.index("]")
        name, rest = host[1:end], host[end + 1:]
    else:
        name, sep, rest = host.partition(":")
        rest = sep + rest
    port = int(rest[1:]) if rest.startswith(":") and rest[1:] else None
    if not name or (rest and port is None):
        raise ValueError(f"malformed host {host!r}")
    return name.lower(), port


def host_allowed(host_header: str | None, port: int, bound_host: str) -> bool:
    """The ``Host`` header names this server: an IP literal, ``localhost`` or ``bound_host``, and ``port``."""
    if not host_header:
        return False
    try:
        name, p = split_host(host_header)
    except ValueError:
        return False
    if p != port:
        return False
    if name in ("localhost", bound_host.lower()):
        return True
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def origin_allowed(origin: str | None, host_header: str | None, fetch_site: str | None = None) -> bool:
    """No ``Origin`` (a plain navigation or a non-browser client), or exactly ``http://<Host>``; and, when
    the browser says where a request comes from (``Sec-Fetch-Site``), only this page itself
    (``same-origin``) or the user (``none``: typed, bookmarked, opened from a terminal). Another port on
    the same host is ``same-site`` for the browser, and sends the SameSite cookie: refused here."""
    if fetch_site not in (None, "same-origin", "none"):
        return False
    if origin is None:
        return True
    return bool(host_header) and origin.lower() == f"http://{host_header.strip().lower()}"


def secret_matches(given: str | None, secret: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), secret.encode())


def static_name(rest: str) -> str | None:
    """The file under ``static/`` that the URL path after ``/static/`` names (``"js/geometry.js"``), or
    None: every part a plain name (so nothing outside ``static/``, encoded or not), a known suffix."""
    parts = rest.split("/")
    if not all(_STATIC_PART.fullmatch(p) for p in parts) or Path(parts[-1]).suffix not in STATIC_TYPES:
        return None
    return "/".join(parts)


def static_file(name: str) -> bytes | None:
    """The bytes of ``static/<name>`` (a :func:`static_name`), or None when there is no such file (or it
    resolves outside ``static/``, as a link could)."""
    root = resources.files("clients.ui").joinpath("static")
    file = root.joinpath(*name.split("/"))
    if isinstance(root, Path) and not Path(file).resolve().is_relative_to(root.resolve()):
        return None
    return file.read_bytes() if file.is_file() else None


# ------------------------------------------------------------------ the server

class ExplorerServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, explorer: Explorer, host: str = "127.0.0.1", port: int = 8080, secret: str | None = None):
        self.explorer = explorer
        self.bound_host = host
        self.secret = secret or secrets.token_urlsafe(24)
        self.cookie_name = "salf_ui_secret"
        super().__init__((host, port), Handler)
        self.cookie_name = f"salf_ui_{self.port}"  # one cookie per launch's port: two explorers do not clash

    @property
    def port(self) -> int:
        return self.server_address[1]

    @property
    def url(self) -> str:
        host = self.bound_host
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        elif ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}/?secret={self.secret}"

    def start(self) -> "ExplorerServer":
        threading.Thread(target=self.serve_forever, name="salf-ui", daemon=True).start()
        return self


class Handler(BaseHTTPRequestHandler):
    server: ExplorerServer
    protocol_version = "HTTP/1.1"
    server_version = "salf-ui"

    def log_message(self, format, *args) -> None:  # noqa: A002 (the base class's name)
        log.debug("%s %s", self.address_string(), format % args)

    # ---------------------------------------------------------- replies

    def _send(self, status: int, body: bytes, content_type: str, extra: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in {**SECURITY_HEADERS, **(extra or {})}.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, doc, status: int = 200) -> None:
        self._send(status, json.dumps(doc).encode(), "application/json")

    def _error(self, status: int, code: str, message: str) -> None:
        self._json({"error": {"code": code, "message": message}}, status)

    # ---------------------------------------------------------- the three checks

    def _refuse(self, why: str, message: str) -> bool:
        log.warning("refused %s %s from %s: %s", self.command, urlsplit(self.path).path, self.client_address[0], why)
        self._error(403, "FORBIDDEN", message)
        return False

    def _allowed(self, query: dict) -> bool:
        srv = self.server
        host = self.headers.get("Host")
        if not host_allowed(host, srv.port, srv.bound_host):
            return self._refuse(f"Host {host!r}", f"refused: Host {host!r} is not this explorer "
                                                  f"(open the URL salfctl ui printed)")
        origin, site = self.headers.get("Origin"), self.headers.get("Sec-Fetch-Site")
        if not origin_allowed(origin, host, site):
            return self._refuse(f"Origin {origin!r}, Sec-Fetch-Site {site!r}",
                                "refused: a request from another site or page")
        cookie = SimpleCookie(self.headers.get("Cookie") or "")
        given = [self.headers.get("X-Salf-Secret"), (query.get("secret") or [None])[0],
                 cookie[srv.cookie_name].value if srv.cookie_name in cookie else None]
        if not any(secret_matches(g, srv.secret) for g in given):
            return self._refuse("no launch secret", "refused: this explorer needs its launch secret; open the URL "
                                                    "`salfctl ui` printed (http://HOST:PORT/?secret=...)")
        return True

    # ---------------------------------------------------------- dispatch

    def do_OPTIONS(self) -> None:  # CORS preflight: never granted
        self._error(403, "FORBIDDEN", "refused: cross-origin requests are not allowed")

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        if n > MAX_BODY:
            raise UserError(f"request body of {n} bytes is over the {MAX_BODY}-byte limit")
        return self.rfile.read(n) if n else b""

    def _dispatch(self, method: str) -> None:
        parts = urlsplit(self.path)
        query = parse_qs(parts.query)
        if not self._allowed(query):
            self.close_connection = True
            return
        route = ROUTES.get((method, parts.path)) or _prefixed(method, parts.path)
        if route is None:
            self._error(404, "NOT_FOUND", f"no {method} {parts.path}")
            return
        try:
            body = self._body() if method == "POST" else b""
            route(self, parts.path, query, body)
        except grpc.RpcError as exc:
            code, message = rpc_error(exc)
            status = 503 if code in ("UNAVAILABLE", "DEADLINE_EXCEEDED") else 400 if code in (
                "INVALID_ARGUMENT", "NOT_FOUND", "OUT_OF_RANGE") else 502
            self._error(status, code, message)
        except UnknownImage as exc:
            self._error(404, "UNKNOWN_IMAGE", str(exc))
        except UserError as exc:
            self._error(400, "INVALID_ARGUMENT", str(exc))
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as exc:  # a bug: logged with its traceback, the page gets a message, the server stays up
            log.exception("explorer request %s %s failed", method, parts.path)
            self._error(500, "INTERNAL", f"{type(exc).__name__}: {exc}")


def _doc(body: bytes) -> dict:
    try:
        doc = json.loads(body or b"{}")
    except ValueError as exc:
        raise UserError(f"request body is not JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise UserError("request body must be a JSON object")
    return doc


def _int(value, what: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError) as exc:
        raise UserError(f"{what} must be an integer, got {value!r}") from exc


def _one(query: dict, name: str, default: str | None = None) -> str | None:
    return (query.get(name) or [default])[0]


# ------------------------------------------------------------------ routes

def page(h: Handler, path, query, body) -> None:
    extra = {}
    given = _one(query, "secret")
    if secret_matches(given, h.server.secret):
        extra["Set-Cookie"] = f"{h.server.cookie_name}={h.server.secret}; HttpOnly; SameSite=Strict; Path=/"
    h._send(200, static_file("index.html"), STATIC_TYPES[".html"], extra)


def static(h: Handler, path, query, body) -> None:
    rest = path[len("/static/"):]
    name = static_name(rest)
    data = static_file(name) if name else None
    if data is None:
        h._error(404, "NOT_FOUND", f"no static file {rest!r}")
        return
    h._send(200, data, STATIC_TYPES[Path(name).suffix])


def info(h: Handler, path, query, body) -> None:
    h._json(h.server.explorer.info())


def open_image(h: Handler, path, query, body) -> None:
    name = Path(unquote(h.headers.get("X-Filename") or "image")).name or "image"
    h._json(h.server.explorer.open_image(body, name))


def image_png(h: Handler, path, query, body) -> None:
    key = path.rsplit("/", 1)[-1].removesuffix(".png")
    h._send(200, h.server.explorer.image(key).png, "image/png")


def folder_open(h: Handler, path, query, body) -> None:
    h._json(h.server.explorer.open_folder_image(_int(_doc(body).get("index"), "index")))


def folder_thumb(h: Handler, path, query, body) -> None:
    index = _int(path.rsplit("/", 1)[-1].removesuffix(".png"), "folder index")
    h._send(200, h.server.explorer.folder_thumbnail(index), "image/png")


def explain(h: Handler, path, query, body) -> None:
    d = _doc(body)
    h._json(h.server.explorer.explain(str(d.get("key", "")), d.get("class_name"), _int(d.get("top_k", 0), "top_k")))


def region(h: Handler, path, query, body) -> None:
    d = _doc(body)
    h._json(h.server.explorer.explain_region(str(d.get("key", "")), str(d.get("explanation_id", "")),
                                             d.get("region"), _int(d.get("top_k", 0), "top_k")))


def intervene(h: Handler, path, query, body) -> None:
    d = _doc(body)
    h._json(h.server.explorer.intervene(str(d.get("key", "")), str(d.get("explanation_id", "")), d.get("region"),
                                        d.get("edits"), _int(d.get("top_k", 0), "top_k")))


def rules(h: Handler, path, query, body) -> None:
    h._json(h.server.explorer.rules(_one(query, "class", "") or ""))


def gallery(h: Handler, path, query, body) -> None:
    h._json(h.server.explorer.gallery(_one(query, "concept", "") or "", _int(_one(query, "k", "8"), "k")))


def figure_png(h: Handler, path, query, body) -> None:
    d = _doc(body)
    png = h.server.explorer.figure(str(d.get("key", "")), d.get("class_name"), list(d.get("concepts") or []),
                                   d.get("region"), str(d.get("scale", "common")))
    h._send(200, png, "image/png")


ROUTES = {
    ("GET", "/"): page,
    ("GET", "/index.html"): page,
    ("GET", "/api/info"): info,
    ("POST", "/api/image"): open_image,
    ("POST", "/api/folder/open"): folder_open,
    ("POST", "/api/explain"): explain,
    ("POST", "/api/region"): region,
    ("POST", "/api/intervene"): intervene,
    ("GET", "/api/rules"): rules,
    ("GET", "/api/gallery"): gallery,
    ("POST", "/api/figure"): figure_png,
}
PREFIXES = {("GET", "/static/"): static, ("GET", "/api/image/"): image_png, ("GET", "/api/folder/thumb/"): folder_thumb}


def _prefixed(method: str, path: str):
    for (m, prefix), route in PREFIXES.items():  # only static/ has subfolders (js/)
        if m == method and path.startswith(prefix) and (route is static or "/" not in path[len(prefix):]):
            return route
    return None
