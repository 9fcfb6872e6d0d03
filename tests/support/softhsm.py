"""A real SoftHSM2 for tests: a private token directory, tokens made with ``softhsm2-util``.

SoftHSM2 (Debian package ``softhsm2``, installed by ``.ci/run``) is a PKCS#11 module that
keeps its tokens in files; ``SOFTHSM2_CONF`` points it at a config naming the token
directory.  :class:`SoftHSM` writes such a config under a temporary directory and makes
tokens in it; ``env`` is what a ``nebula start`` child needs to see them.

One PKCS#11 module is loaded per process (python-pkcs11) and reads ``SOFTHSM2_CONF`` when
it initialises, so in-process tests share one :class:`SoftHSM` (``activate()`` sets the
variable) and ``init_token`` re-initialises a loaded module so it sees the new token.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from nebula.errors import ConfigError

MODULE_CANDIDATES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
)
USER_PIN = "123456"
SO_PIN = "87654321"


def module_path() -> str:
    for p in MODULE_CANDIDATES:
        if Path(p).exists():
            return p
    raise ConfigError(
        "SoftHSM2 is not installed (libsofthsm2.so not found): apt-get install softhsm2"
    )


class SoftHSM:
    def __init__(self, root: Path | None = None) -> None:
        if shutil.which("softhsm2-util") is None:
            raise ConfigError("SoftHSM2 is not installed: apt-get install softhsm2")
        self.module = module_path()
        self.root = Path(root or tempfile.mkdtemp(prefix="nebula-softhsm-"))
        self.tokens = self.root / "tokens"
        self.tokens.mkdir(parents=True, exist_ok=True)
        self.conf = self.root / "softhsm2.conf"
        self.conf.write_text(
            f"directories.tokendir = {self.tokens}\nobjectstore.backend = file\nlog.level = ERROR\n"
        )

    @property
    def env(self) -> dict[str, str]:
        return {"SOFTHSM2_CONF": str(self.conf)}

    def activate(self) -> None:
        """Point this process's SoftHSM2 at these tokens (before the module loads)."""
        os.environ["SOFTHSM2_CONF"] = str(self.conf)

    def init_token(self, label: str, pin: str = USER_PIN) -> None:
        subprocess.run(
            [
                "softhsm2-util", "--init-token", "--free", "--label", label,
                "--pin", pin, "--so-pin", SO_PIN,
            ],
            env={**os.environ, **self.env},
            check=True,
            capture_output=True,
            timeout=60,
        )  # fmt: skip
        self._reload()

    def delete_token(self, label: str) -> None:
        subprocess.run(
            ["softhsm2-util", "--delete-token", "--token", label],
            env={**os.environ, **self.env},
            check=True,
            capture_output=True,
            timeout=60,
        )
        self._reload()

    def pin_file(self, directory: Path, pin: str = USER_PIN, mode: int = 0o600) -> Path:
        p = Path(directory) / "hsm_pin"
        p.write_text(pin + "\n")
        p.chmod(mode)
        return p

    def _reload(self) -> None:
        # A module loaded in this process lists tokens as of its initialisation.
        if os.environ.get("SOFTHSM2_CONF") != str(self.conf):
            return
        try:
            import pkcs11

            lib = pkcs11.lib(self.module)
        except Exception:
            return
        lib.reinitialize()

    def cleanup(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
