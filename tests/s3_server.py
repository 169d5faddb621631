"""A real S3-compatible server on loopback for tests: moto's server mode, in its own process.

Run as a script, this module serves moto's S3 on 127.0.0.1 on a port the OS picks and prints
``port=N`` once the socket listens. :class:`S3Server` starts that process in its own process
group and stops the group; the fixtures below give a test a fresh bucket and the ``AWS_*``
environment that delta-rs, pyarrow and boto3 read.

One fix on top of moto: its conditional writes (``If-None-Match: *``, ``If-Match``) check and
then write without a lock, so two racing requests can both win (measured on moto 5.2.5: 1 trial
in 300 of 8 concurrent ``If-None-Match`` PUTs of one key had two winners). S3 itself is atomic
here, and both delta-rs's commits and lmat's lease rely on it, so the server serializes writing
requests (PUT, POST, DELETE); reads stay concurrent.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

_WRITES = frozenset({"PUT", "POST", "DELETE"})


class _AtomicWrites:
    """WSGI middleware: one writing request at a time (S3's conditional writes are atomic)."""

    def __init__(self, app: Any):
        self.app = app
        self.lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        if environ.get("REQUEST_METHOD") not in _WRITES:
            return self.app(environ, start_response)
        with self.lock:
            # Drain the response inside the lock: the write happens while the body is built.
            return list(self.app(environ, start_response))


def _serve() -> None:
    from moto.moto_server import werkzeug_app
    from werkzeug.serving import WSGIRequestHandler, make_server

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
    app = werkzeug_app.DomainDispatcherApplication(werkzeug_app.create_backend_app)
    handler = getattr(werkzeug_app, "MotoRequestHandler", WSGIRequestHandler)  # moto >= 5.1.x
    server = make_server("127.0.0.1", 0, _AtomicWrites(app), threaded=True, request_handler=handler)
    os.environ["MOTO_PORT"] = str(server.server_port)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"port={server.server_port}", flush=True)
    server.serve_forever()


@dataclass
class S3Server:
    """A moto S3 server process on 127.0.0.1 (start with :meth:`start`, stop with :meth:`stop`)."""

    proc: subprocess.Popen[str] | None = None
    port: int = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 30.0) -> S3Server:
        # Its stderr (warnings and errors only) is read back if it fails to start.
        with tempfile.TemporaryFile(mode="w+") as log:
            self.proc = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__)],
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                start_new_session=True,  # its own process group, stopped as a whole
            )
            line: list[str] = []
            reader = threading.Thread(target=lambda: line.append(self.proc.stdout.readline()))  # type: ignore[union-attr]
            reader.start()
            reader.join(timeout_s)
            if not line or not line[0].startswith("port="):
                self.stop()
                log.seek(0)
                raise RuntimeError(
                    f"moto S3 server did not start within {timeout_s}s: {log.read()[-2000:]}"
                )
        self.port = int(line[0].strip().split("=", 1)[1])
        return self

    def env(self) -> dict[str, str]:
        """The ``AWS_*`` variables that point delta-rs, pyarrow and boto3 at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ALLOW_HTTP": "true",
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_REGION": "us-east-1",
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def client(self) -> Any:
        import boto3
        from botocore.config import Config

        env = self.env()
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
            region_name=env["AWS_REGION"],
            config=Config(s3={"addressing_style": "path"}),
        )

    def create_bucket(self, name: str | None = None) -> str:
        name = name or f"lmat-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(10)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.proc = None


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """One S3 server for the session, stopped (its whole process group) at the end."""
    server = S3Server().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The test's ``AWS_*`` environment (set in this process too) with a fresh bucket in
    ``LMAT_TEST_BUCKET``."""
    env = {**s3_server.env(), "LMAT_TEST_BUCKET": s3_server.create_bucket()}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env


@pytest.fixture
def s3_store_uri(s3_env: dict[str, str]) -> str:
    """An ``s3://`` URI for a store (not yet created) in the test's fresh bucket."""
    return f"s3://{s3_env['LMAT_TEST_BUCKET']}/store"


def wait_until(pred: Any, timeout_s: float, what: str) -> None:
    """Poll ``pred()`` until true; fail the test naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.05)


if __name__ == "__main__":
    _serve()
