"""Fixtures: real quotad daemons (from $QUOTAD_BIN, default target/debug/quotad
in the repository) on a free 127.0.0.1 port and a Unix socket in a temp dir,
plus a small scriptable HTTP proxy for retry and SSE tests."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional

import httpx
import pytest

import quotad

REPO = Path(__file__).resolve().parents[3]
ADMIN_TOKEN = "admin-token-for-tests-0123456789"
CLIENT_TOKEN = "client-token-for-tests-0123456789"

TEST_CONFIG = """
metrics = ["cost_micros"]

[server]
listen = [{listen}]

[storage]
data_dir = "{data_dir}"
durability = "batch"
flush_interval_ms = 2

[engine]
reservation_ttl_default = "60s"
reservation_ttl_max = "1h"

[log]
level = "warn"

{auth}

{policy}

{history}

[[limits]]
name = "global-tokens"
metric = "tokens"
scope = "global"
algorithm = "token_bucket"
max = 1000000
refill = 1000000
period = "1m"

[[plans]]
name = "free"
default = true

  [[plans.limits]]
  name = "tokens-per-day"
  metric = "tokens"
  period = "1d"
  max = 10000

  [[plans.limits]]
  name = "requests-per-day"
  period = "1d"
  max = 1000

  [[plans.limits]]
  name = "gpt4o-tokens-per-hour"
  metric = "tokens"
  match = {{ event = "llm.*", attributes = {{ model = "gpt-4o" }} }}
  algorithm = "sliding"
  period = "1h"
  max = 5000
  mode = "degrade"

  [[plans.limits]]
  name = "image-credits"
  match = {{ event = "image.render" }}
  algorithm = "lifetime"
  max = 3

[[plans]]
name = "pro"

  [[plans.limits]]
  name = "tokens-per-day"
  metric = "tokens"
  period = "1d"
  max = 100000

  [[plans.limits]]
  name = "requests-per-day"
  period = "1d"
  max = 10000

  [[plans.limits]]
  name = "image-credits"
  match = {{ event = "image.render" }}
  algorithm = "lifetime"
  max = 100
"""

AUTH = f"""
[auth]
tokens = [{{ role = "admin", token = "{ADMIN_TOKEN}" }}, {{ role = "client", token = "{CLIENT_TOKEN}" }}]
"""

# The policy is changed through the API (PUT /v1/policy, /v1/plans/{name}, ...);
# the file's policy only seeds version 1 of the empty data directory.
POLICY_FROM_API = """
[policy]
source = "api"
"""


def history_section(dimensions: Optional[List[str]]) -> str:
    if dimensions is None:
        return ""
    return "[history]\ndimensions = [" + ", ".join(json.dumps(d) for d in dimensions) + "]\n"


def quotad_bin() -> Path:
    raw = os.environ.get("QUOTAD_BIN")
    path = Path(raw).expanduser().resolve() if raw else REPO / "target" / "debug" / "quotad"
    if not path.is_file() or not os.access(path, os.X_OK):
        pytest.fail(
            f"quotad binary not found at {path}: build it (cargo build) or set QUOTAD_BIN", pytrace=False
        )
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Daemon:
    """One quotad process on 127.0.0.1:<free port> and <tmp>/quotad.sock.
    ``policy_api``: ``[policy] source = "api"`` (policy writes allowed).
    ``dimensions``: ``[history] dimensions`` (usage kept per value of these
    attributes, for ``group_by``). ``extra``: TOML appended to the config
    (more ``[[limits]]``)."""

    def __init__(
        self,
        auth: bool = False,
        policy_api: bool = False,
        dimensions: Optional[List[str]] = None,
        extra: str = "",
    ) -> None:
        self.auth = auth
        self.policy_api = policy_api
        self.dimensions = dimensions
        self.extra = extra
        self.dir = Path(tempfile.mkdtemp(prefix="quotad-py-"))
        self.socket = str(self.dir / "quotad.sock")
        self.port = 0
        self.proc: Optional[subprocess.Popen] = None
        self.log_path = self.dir / "quotad.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "Daemon":
        binary = quotad_bin()
        for _ in range(5):
            self.port = free_port()
            config = self.dir / "quotad.toml"
            config.write_text(
                TEST_CONFIG.format(
                    listen=f'"127.0.0.1:{self.port}", "unix:{self.socket}"',
                    data_dir=self.dir / "data",
                    auth=AUTH if self.auth else "",
                    policy=POLICY_FROM_API if self.policy_api else "",
                    history=history_section(self.dimensions),
                )
                + self.extra
            )
            log = open(self.log_path, "ab")
            self.proc = subprocess.Popen(
                [str(binary), "serve", "--config", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.dir,
            )
            log.close()
            if self._wait_ready(30.0):
                return self
            code = self.proc.poll()
            self.stop()
            if code != 3:  # 3: the address could not be bound; try another port
                break
        raise RuntimeError(f"quotad did not become ready; log:\n{self.log()}")

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                return False
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1.0).status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        return False

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        p, self.proc = self.proc, None
        if p is None or p.poll() is not None:
            return
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=10)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def client(self, transport: str, **kw: Any) -> quotad.Client:
        if transport == "unix":
            return quotad.Client(socket=self.socket, **kw)
        return quotad.Client(self.url, **kw)

    def aclient(self, transport: str, **kw: Any) -> quotad.AsyncClient:
        if transport == "unix":
            return quotad.AsyncClient(socket=self.socket, **kw)
        return quotad.AsyncClient(self.url, **kw)


@pytest.fixture(scope="session")
def daemon():
    d = Daemon()
    try:
        d.start()
        yield d
    finally:
        d.cleanup()


@pytest.fixture(scope="session")
def auth_daemon():
    d = Daemon(auth=True)
    try:
        d.start()
        yield d
    finally:
        d.cleanup()


@pytest.fixture(scope="session")
def policy_daemon():
    """A daemon whose policy is changed through the API, with auth tokens."""
    d = Daemon(auth=True, policy_api=True)
    try:
        d.start()
        yield d
    finally:
        d.cleanup()


@pytest.fixture
def fresh_daemon():
    """A daemon of the test's own (admin and client tokens, usage kept per
    ``model``), for answers that must be exact over every subject: nothing
    else charges it. More TOML through ``fresh_daemon(extra=...)``."""
    made: List[Daemon] = []

    def make(extra: str = "", auth: bool = True) -> Daemon:
        d = Daemon(auth=auth, dimensions=["model"], extra=extra)
        made.append(d)
        return d.start()

    yield make
    for d in made:
        d.cleanup()


@pytest.fixture(params=["tcp", "unix"])
def transport(request) -> str:
    return request.param


@pytest.fixture
def client(daemon, transport):
    with daemon.client(transport) as c:
        yield c


@pytest.fixture
def subject() -> str:
    return f"test:{uuid.uuid4().hex[:16]}"


# ---------- skipping tests of endpoints the daemon does not serve yet ----------


def served(fn, what: str):
    """Runs ``fn``; skips the test when the daemon answers 404 ``not_found``
    (an endpoint this quotad does not serve yet)."""
    try:
        return fn()
    except quotad.NotFound as e:
        if e.code == "not_found":
            pytest.skip(f"{what}: not served by this quotad yet (404 not_found)")
        raise


async def aserved(coro, what: str):
    try:
        return await coro
    except quotad.NotFound as e:
        if e.code == "not_found":
            pytest.skip(f"{what}: not served by this quotad yet (404 not_found)")
        raise


def accepted(fn, field_name: str):
    """Runs ``fn``; skips when the daemon rejects the request field as unknown
    (a field this quotad does not take yet)."""
    try:
        return fn()
    except quotad.InvalidRequest as e:
        if f'unknown field "{field_name}"' in e.message or f"unknown field `{field_name}`" in e.message:
            pytest.skip(f"request field `{field_name}`: not accepted by this quotad yet (400 unknown field)")
        raise


# ---------- a scriptable proxy ----------


class Proxy:
    """An HTTP server on 127.0.0.1 that answers each request by the next step
    of ``script``: ``"503"`` (an unavailable answer), ``"drop"`` (close the
    connection without answering), ``"pass"`` (forward to ``upstream``), or a
    ``bytes`` SSE body served as ``text/event-stream``. Records every request."""

    def __init__(self, upstream: Optional[str] = None, script: Optional[List[Any]] = None) -> None:
        self.upstream = upstream
        self.script: List[Any] = list(script or [])
        self.requests: List[Dict[str, Any]] = []
        self.lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with proxy.lock:
                    proxy.requests.append(
                        {"method": self.command, "path": self.path, "headers": dict(self.headers), "body": body}
                    )
                    step = proxy.script.pop(0) if proxy.script else "pass"
                if step == "drop":
                    self.close_connection = True
                    try:
                        self.connection.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    return
                if step == "503":
                    data = json.dumps({"error": {"code": "unavailable", "message": "scripted outage"}}).encode()
                    self._reply(503, data, "application/json")
                    return
                if isinstance(step, bytes):
                    self.send_response(200)
                    self.send_header("Content-Type", "text/event-stream")
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self.wfile.write(step)
                    self.wfile.flush()
                    self.close_connection = True
                    return
                assert proxy.upstream, "no upstream to pass to"
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                r = httpx.request(
                    self.command, proxy.upstream + self.path, content=body, headers=headers, timeout=10.0
                )
                self._reply(r.status_code, r.content, r.headers.get("content-type", ""), r.headers)

            def _reply(self, status: int, data: bytes, ctype: str, extra: Any = None) -> None:
                self.send_response(status)
                if ctype:
                    self.send_header("Content-Type", ctype)
                if extra is not None:
                    for k, v in extra.items():
                        if k.lower().startswith(("x-ratelimit", "retry-after", "idempotent-replayed")):
                            self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = _handle

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def bodies(self) -> List[Dict[str, Any]]:
        return [json.loads(r["body"]) for r in self.requests if r["body"]]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def proxy_factory(daemon):
    made: List[Proxy] = []

    def make(script: Optional[List[Any]] = None, upstream: Optional[str] = "daemon") -> Proxy:
        p = Proxy(daemon.url if upstream == "daemon" else upstream, script)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()
