"""Local cloud metadata services (AWS IMDSv2, GCP, Azure Scheduled Events) on real sockets.

Each server follows its provider's documented behaviour closely enough that the real watcher cannot tell it
from the cloud: tokens and their expiry, required headers, 404s, ETags and hanging GETs, incarnations and
acknowledgements. Tests and ``swarm-node local --preempt`` raise notices with :meth:`MetadataServer.preempt`;
:meth:`MetadataServer.misbehave` makes a server answer garbage, HTTP 500 or nothing at all.
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import logging
import secrets
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

log = logging.getLogger(__name__)

MISBEHAVIOURS = ("bad_json", "http_500", "hang")
MAX_REQUEST_BODY = 64 * 1024
MAX_HANG = 3600.0


@dataclass(frozen=True)
class Request:
    """One request as a server saw it; header names are lower-case."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes = b""


@dataclass
class Answer:
    """What a server sends back."""

    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


def _text(status: int, text: str, **headers: str) -> Answer:
    return Answer(status, text.encode(), {"Content-Type": "text/plain", **headers})


def _json(status: int, doc: object) -> Answer:
    return Answer(status, json.dumps(doc).encode(), {"Content-Type": "application/json"})


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    owner: MetadataServer


class _Handler(BaseHTTPRequestHandler):
    server: _HttpServer
    protocol_version = "HTTP/1.0"  # one request per connection, like the watcher's
    timeout = 60  # a client that connects and never sends a request

    def do_GET(self) -> None:
        self._serve()

    def do_PUT(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def do_DELETE(self) -> None:
        self._serve()

    def _serve(self) -> None:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_REQUEST_BODY:
            self._send(Answer(400, b"bad Content-Length"))
            return
        body = self.rfile.read(length) if length else b""
        parts = urllib.parse.urlsplit(self.path)
        request = Request(
            self.command,
            parts.path,
            dict(urllib.parse.parse_qsl(parts.query, keep_blank_values=True)),
            {k.lower(): v for k, v in self.headers.items()},
            body,
        )
        answer = self.server.owner._handle(request)
        if answer is not None:
            self._send(answer)

    def _send(self, answer: Answer) -> None:
        try:
            self.send_response(answer.status)
            for name, value in answer.headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(answer.body)))
            self.end_headers()
            self.wfile.write(answer.body)
        except OSError:  # the client gave up (a timeout, or the watcher stopping)
            pass

    def log_message(self, format: str, *args: object) -> None:
        log.debug("%s metadata server: " + format, self.server.owner.provider, *args)


class MetadataServer:
    """A provider's metadata service on ``127.0.0.1`` (port 0 picks a free one), served from a daemon thread.

    Every request is kept in :attr:`requests`. Use the subclasses (or :func:`metadata_server`)."""

    provider: ClassVar[str] = ""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host, self.port = host, port
        self.requests: list[Request] = []
        self.refused = 0  # requests turned away for a missing or wrong header
        self._cond = threading.Condition()  # guards the state; hanging requests wait on it
        self._mode: str | None = None
        self._stopped = False
        self._httpd: _HttpServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The base URL (``http://127.0.0.1:PORT``); valid once started."""
        if self._httpd is None:
            raise RuntimeError("the metadata server is not started")
        return f"http://{self.host}:{self._httpd.server_address[1]}"

    def start(self) -> str:
        """Starts serving; returns the base URL."""
        if self._httpd is not None:
            return self.url
        httpd = _HttpServer((self.host, self.port), _Handler)
        httpd.owner = self
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, name=f"{self.provider}-metadata", daemon=True
        )
        self._thread.start()
        log.debug("%s metadata server on %s", self.provider, self.url)
        return self.url

    def stop(self) -> None:
        """Stops serving and releases every hanging request."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        httpd, self._httpd = self._httpd, None
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> MetadataServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def misbehave(self, mode: str | None) -> None:
        """From now on answer garbage (``bad_json``: a 200 whose body breaks the protocol), ``http_500``, or
        nothing at all (``hang``: read the request, never answer); ``None`` behaves again."""
        if mode is not None and mode not in MISBEHAVIOURS:
            raise ValueError(f"misbehaviour must be one of {', '.join(MISBEHAVIOURS)} or None, got {mode!r}")
        with self._cond:
            self._mode = mode
            self._cond.notify_all()

    @property
    def garbage(self) -> bool:
        """Whether notice endpoints should answer a body that breaks the protocol."""
        return self._mode == "bad_json"

    def preempt(self, kind: str = "terminate", notice_seconds: float = 30.0) -> str | None:
        """Raises a notice the way the provider does; returns its event id where the provider has them."""
        raise NotImplementedError

    def _handle(self, request: Request) -> Answer | None:
        with self._cond:
            self.requests.append(request)
            if self._mode == "hang":
                self._cond.wait_for(lambda: self._stopped or self._mode != "hang", MAX_HANG)
                return None  # the connection closes without an answer
            if self._mode == "http_500":
                return _text(500, "Internal Server Error")
        return self.answer(request)

    def answer(self, request: Request) -> Answer:
        """The provider's answer to ``request`` (called on the connection's thread)."""
        raise NotImplementedError

    def paths(self, method: str | None = None) -> list[str]:
        """The paths requested so far (with ``method`` only, if given)."""
        with self._cond:
            return [r.path for r in self.requests if method is None or r.method == method]


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(round(ts)))


class AwsMetadataServer(MetadataServer):
    """EC2 IMDSv2: ``PUT /latest/api/token`` first, every GET with a valid unexpired token (else 401)."""

    provider = "aws"
    TOKEN_PATH = "/latest/api/token"
    ACTION_PATH = "/latest/meta-data/spot/instance-action"
    REBALANCE_PATH = "/latest/meta-data/events/recommendations/rebalance"
    INSTANCE_ID = "i-0123456789abcdef0"
    TTL_HEADER = "x-aws-ec2-metadata-token-ttl-seconds"
    TOKEN_HEADER = "x-aws-ec2-metadata-token"

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__(host, port)
        self.token_puts = 0
        self.unauthorized = 0  # GETs answered 401
        self._tokens: dict[str, float] = {}  # token -> monotonic expiry
        self._action: dict[str, str] | None = None
        self._rebalance: dict[str, str] | None = None

    def expire_tokens(self) -> None:
        """Every token handed out so far expires now."""
        with self._cond:
            self._tokens.clear()

    def preempt(self, kind: str = "terminate", notice_seconds: float = 30.0) -> str | None:
        """A spot interruption ``kind`` (terminate, stop, hibernate) ``notice_seconds`` from now."""
        if kind not in ("terminate", "stop", "hibernate"):
            raise ValueError(f"an AWS interruption is terminate, stop or hibernate, not {kind!r}")
        with self._cond:
            self._action = {"action": kind, "time": _iso(time.time() + notice_seconds)}
        return None

    def rebalance(self) -> None:
        """A rebalance recommendation, noticed now."""
        with self._cond:
            self._rebalance = {"noticeTime": _iso(time.time())}

    def clear(self) -> None:
        """Withdraws the interruption notice and the rebalance recommendation."""
        with self._cond:
            self._action = self._rebalance = None

    def answer(self, request: Request) -> Answer:
        if request.path == self.TOKEN_PATH and request.method == "PUT":
            if "x-forwarded-for" in request.headers:  # IMDS refuses token requests that went through a proxy
                return _text(403, "Forbidden")
            try:
                ttl = int(request.headers.get(self.TTL_HEADER, ""))
            except ValueError:
                ttl = 0
            if not 1 <= ttl <= 21600:
                return _text(400, "Bad Request")
            token = secrets.token_urlsafe(32)
            with self._cond:
                self._tokens[token] = time.monotonic() + ttl
                self.token_puts += 1
            return _text(200, token, **{"X-aws-ec2-metadata-token-ttl-seconds": str(ttl)})
        if request.method != "GET":
            return _text(405, "Method Not Allowed")
        with self._cond:
            expiry = self._tokens.get(request.headers.get(self.TOKEN_HEADER, ""))
            if expiry is None or time.monotonic() >= expiry:
                self.unauthorized += 1
                return _text(401, "Unauthorized")
            action, rebalance = self._action, self._rebalance
        if request.path == "/latest/meta-data/instance-id":
            return _text(200, self.INSTANCE_ID)
        if request.path in (self.ACTION_PATH, self.REBALANCE_PATH):
            if self.garbage:
                return Answer(200, b'{"action": "terminate", "time": ', {"Content-Type": "application/json"})
            doc = action if request.path == self.ACTION_PATH else rebalance
            return _json(200, doc) if doc is not None else _text(404, "Not Found")
        return _text(404, "Not Found")


class GcpMetadataServer(MetadataServer):
    """GCE metadata server: ``Metadata-Flavor: Google`` required (else 403), values with ETags, hanging GETs."""

    provider = "gcp"
    PREFIX = "/computeMetadata/v1/"

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__(host, port)
        self._values = {"instance/preempted": "FALSE", "instance/maintenance-event": "NONE", "instance/id": "4520"}
        self._versions = dict.fromkeys(self._values, 0)

    def _etag(self, key: str) -> str:
        return hashlib.sha256(f"{key}:{self._versions[key]}".encode()).hexdigest()[:16]

    def set_value(self, key: str, value: str) -> None:
        """Sets ``instance/...`` metadata ``key``, waking the hanging GETs on it."""
        with self._cond:
            if self._values.get(key) != value:
                self._values[key] = value
                self._versions[key] = self._versions.get(key, 0) + 1
                self._cond.notify_all()

    def preempt(self, kind: str = "terminate", notice_seconds: float = 30.0) -> str | None:
        """``terminate``: ``preempted`` turns TRUE (GCP gives no deadline: the guest has about 30 s);
        ``rebalance``: a live migration (``MIGRATE_ON_HOST_MAINTENANCE``); ``maintenance``:
        ``TERMINATE_ON_HOST_MAINTENANCE``."""
        values = {
            "terminate": ("instance/preempted", "TRUE"),
            "rebalance": ("instance/maintenance-event", "MIGRATE_ON_HOST_MAINTENANCE"),
            "maintenance": ("instance/maintenance-event", "TERMINATE_ON_HOST_MAINTENANCE"),
        }
        if kind not in values:
            raise ValueError(f"a GCP notice is terminate, rebalance or maintenance, not {kind!r}")
        self.set_value(*values[kind])
        return None

    def answer(self, request: Request) -> Answer:
        if request.headers.get("metadata-flavor") != "Google" or "x-forwarded-for" in request.headers:
            with self._cond:
                self.refused += 1
            return _text(403, "Missing Metadata-Flavor:Google header.")
        if not request.path.startswith(self.PREFIX):
            return _text(404, "Not Found")
        key = request.path[len(self.PREFIX) :]
        with self._cond:
            if key not in self._values:
                return _text(404, "Not Found")
            if request.method != "GET":
                return _text(405, "Method Not Allowed")
            if request.query.get("wait_for_change") == "true":
                last = request.query.get("last_etag") or self._etag(key)
                try:
                    hang = min(float(request.query.get("timeout_sec", MAX_HANG)), MAX_HANG)
                except ValueError:
                    return _text(400, "Bad Request")
                self._cond.wait_for(lambda: self._stopped or self._etag(key) != last, max(hang, 0.0))
            value, etag = self._values[key], self._etag(key)
        if self.garbage and key != "instance/id":
            value = "{MAYBE"
        return _text(200, value, **{"Metadata-Flavor": "Google", "ETag": etag})


class AzureMetadataServer(MetadataServer):
    """Azure IMDS Scheduled Events: ``Metadata: true`` required (else 400), a document with an incarnation,
    and acknowledgements by POST."""

    provider = "azure"
    EVENTS_PATH = "/metadata/scheduledevents"
    NAME_PATH = "/metadata/instance/compute/name"
    VM_NAME = "local-vm"

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__(host, port)
        self.incarnation = 1
        self.acknowledged: list[str] = []
        self._events: list[dict[str, object]] = []

    def schedule(self, event_type: str, notice_seconds: float = 30.0, resources: list[str] | None = None) -> str:
        """Adds a ``Scheduled`` event of ``event_type`` (Preempt, Terminate, Freeze, Reboot, Redeploy), due
        ``notice_seconds`` from now, for ``resources`` (this VM by default); returns its EventId."""
        event_id = str(uuid.uuid4()).upper()
        event = {
            "EventId": event_id,
            "EventType": event_type,
            "ResourceType": "VirtualMachine",
            "Resources": [self.VM_NAME] if resources is None else list(resources),
            "EventStatus": "Scheduled",
            "NotBefore": email.utils.formatdate(round(time.time() + notice_seconds), usegmt=True),
            "Description": f"{event_type} scheduled by the local metadata server",
            "EventSource": "Platform",
            "DurationInSeconds": -1,
        }
        with self._cond:
            self._events.append(event)
            self.incarnation += 1
        return event_id

    def preempt(self, kind: str = "terminate", notice_seconds: float = 30.0) -> str | None:
        """``terminate``: a Spot ``Preempt`` event due ``notice_seconds`` from now; returns its EventId."""
        if kind != "terminate":
            raise ValueError(f"an Azure notice is terminate (a Preempt event), not {kind!r}")
        return self.schedule("Preempt", notice_seconds)

    def answer(self, request: Request) -> Answer:
        if request.headers.get("metadata") != "true" or "x-forwarded-for" in request.headers:
            with self._cond:
                self.refused += 1
            return _json(400, {"error": "Bad request. Required metadata header not specified"})
        if not request.query.get("api-version"):
            return _json(400, {"error": "Bad request. api-version was not specified in the request"})
        if request.path == self.NAME_PATH and request.method == "GET":
            return _text(200, self.VM_NAME)
        if request.path != self.EVENTS_PATH:
            return _json(404, {"error": "Not found"})
        if request.method == "POST":
            return self._start(request.body)
        if request.method != "GET":
            return _json(405, {"error": "Method not allowed"})
        if self.garbage:
            return Answer(200, b'{"DocumentIncarnation": "two", "Events": [', {"Content-Type": "application/json"})
        with self._cond:
            return _json(200, {"DocumentIncarnation": self.incarnation, "Events": list(self._events)})

    def _start(self, body: bytes) -> Answer:
        try:
            starts = json.loads(body)["StartRequests"]
            ids = [str(s["EventId"]) for s in starts]
        except (ValueError, KeyError, TypeError):
            return _json(400, {"error": "Bad request. StartRequests expected"})
        with self._cond:
            known = [i for i in ids if any(e["EventId"] == i for e in self._events)]
            if known:
                self.acknowledged.extend(known)
                self._events = [e for e in self._events if e["EventId"] not in known]
                self.incarnation += 1
        return Answer(200)


SERVERS: dict[str, type[MetadataServer]] = {
    "aws": AwsMetadataServer,
    "gcp": GcpMetadataServer,
    "azure": AzureMetadataServer,
}


def metadata_server(provider: str, host: str = "127.0.0.1", port: int = 0) -> MetadataServer:
    """A (not yet started) local metadata server for ``provider``: ``aws``, ``gcp`` or ``azure``."""
    try:
        return SERVERS[provider](host, port)
    except KeyError:
        raise ValueError(f"no local metadata server for {provider!r}; one of {', '.join(SERVERS)}") from None
