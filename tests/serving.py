"""A live `structkv serve` for tests: the real server in a subprocess on a free 127.0.0.1
port, plain-HTTP helpers and its Prometheus gauges (tests/test_serve.py and the reliability
suite share it)."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

NAME = "smollm2-structkv"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, engine_dir, kv_cache_mb: int = 256, source=None) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        source = source or ["--engine", str(engine_dir)]
        cmd = [sys.executable, "-m", "structkv.cli", "serve", *source,
               "--port", str(self.port), "--kv-cache-mb", str(kv_cache_mb),
               "--served-model-name", NAME]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
        self.log: list[str] = []
        ready = threading.Event()

        def read() -> None:
            for line in self.proc.stderr:
                self.log.append(line)
                if "StructKV serving" in line:
                    ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(120):
            self.proc.kill()
            raise AssertionError("server did not start:\n" + "".join(self.log))

    def post(self, path: str, body, raw: bool = False) -> tuple[int, dict]:
        data = body if raw else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data, {"content-type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def get(self, path: str) -> str:
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return r.read().decode()

    def gauge(self, name: str) -> float:
        line = next(x for x in self.get("/metrics").splitlines() if x.startswith(name + " "))
        return float(line.split()[1])

    def sigterm_when_running(self, requests: int) -> int:
        """SIGTERM once ``requests`` are running (or after 60 s); the exit status (30 s)."""
        deadline = time.time() + 60
        while self.gauge("structkv_requests_running") < requests and time.time() < deadline:
            time.sleep(0.1)
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)
