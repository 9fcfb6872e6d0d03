"""Run real `nebula start` processes from tests: write config and key, start, stop."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from nebula.crypto.keys import SigningKey, write_key_file

REPO_ROOT = Path(__file__).resolve().parents[2]


def _toml_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


class NebulaProcess:
    """One `nebula start` process with its own directory."""

    def __init__(
        self,
        home: Path,
        *,
        chain_id: str,
        version: str,
        key: SigningKey | None,
        connections: list[str],
        persist: str = "local",
        raft: dict | None = None,
        extra: str = "",
        signing: str | None = None,
        log_format: str = "text",
    ) -> None:
        self.home = Path(home)
        self.home.mkdir(parents=True, exist_ok=True)
        self.config_path = self.home / "nebula.toml"
        self.log_path = self.home / "nebula.log"
        self.proc: subprocess.Popen[bytes] | None = None
        lines = [
            f"chain_id = {_toml_str(chain_id)}",
            f'version = "{version}"',
            f'log_format = "{log_format}"',
            'log_level = "debug"',
            f'persist = "{persist}"',
            'state_path = "./state.json"',
            f'signing_mode = "{"native" if signing is None else signing}"',
            extra,
            "[dial]",
            "backoff_min = 0.05",
            "backoff_max = 0.5",
        ]
        for c in connections:
            lines += ["[[connections]]", f"address = {_toml_str(c)}"]
        if raft is not None:
            lines += ["[raft]"]
            for k, v in raft.items():
                if k == "peers":
                    continue
                lines.append(f"{k} = {_toml_str(v) if isinstance(v, str) else v}")
            for pid, addr in raft["peers"].items():
                lines += ["[[raft.peers]]", f"id = {pid}", f"addr = {_toml_str(addr)}"]
        if signing is None and key is not None:
            write_key_file(self.home / "privkey", key, overwrite=True)
            lines += [
                "[signing.native]",
                'private_key_path = "./privkey"',
                f'key_type = "{key.key_type}"',
            ]
        elif signing is not None:
            pass  # the caller put the [signing.*] section in `extra`
        self.config_path.write_text("\n".join(lines) + "\n")

    def start(self) -> NebulaProcess:
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        # Run the same source tree the tests import.
        env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])]
        )
        logf = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nebula.cli.main", "start", "-c", str(self.config_path)],
            cwd=self.home,
            stdout=logf,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        logf.close()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            assert self.proc is not None
            os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(10)

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGCONT)
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_log(self, needle: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle in self.log_text():
                return
            if not self.alive():
                raise RuntimeError(f"nebula exited: {self.log_text()[-3000:]}")
            time.sleep(0.05)
        raise TimeoutError(f"{needle!r} not in nebula log: {self.log_text()[-3000:]}")

    def __enter__(self) -> NebulaProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
