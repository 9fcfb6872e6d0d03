"""A private SoftHSM2 installation: the PKCS#11 token ``nebula demo``, ``nebula bench`` and
the tests sign from.

SoftHSM2 (Debian/Ubuntu package ``softhsm2``, Homebrew ``softhsm``) is a PKCS#11 module
that keeps its tokens in files; ``SOFTHSM2_CONF`` points it at a config naming the token
directory.  :class:`SoftHSM` writes such a config and token directory under ``root`` (an
installation of its own, nothing shared with the system's tokens), makes tokens in it with
``softhsm2-util``, and generates keys inside a token with ``nebula hsm generate`` (a child
process: python-pkcs11 loads one module per process, and that module reads
``SOFTHSM2_CONF`` once).  ``env`` is what a ``nebula start`` child needs to see the tokens.

:meth:`SoftHSM.clone` copies the token directory to another installation.  SoftHSM2
stores a token's private objects encrypted under a key that only the user PIN unlocks, so
the copy is the stand-in for an HSM's own cloning or wrapped backup: the same key in a
second device, never in plaintext outside one.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from nebula.devnet.cometbft import ValidatorKey
from nebula.errors import ConfigError

__all__ = [
    "INSTALL_HINT",
    "MODULE_CANDIDATES",
    "SO_PIN",
    "USER_PIN",
    "SoftHSM",
    "SoftHSMMissing",
    "check_installed",
    "installations",
    "module_path",
    "pkcs11_toml",
]

MODULE_CANDIDATES = (
    "/usr/lib/softhsm/libsofthsm2.so",  # Debian, Ubuntu
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib64/pkcs11/libsofthsm2.so",  # Fedora
    "/usr/local/lib/softhsm/libsofthsm2.so",  # Homebrew (Intel), source builds
    "/opt/homebrew/lib/softhsm/libsofthsm2.so",  # Homebrew (Apple silicon)
)
INSTALL_HINT = (
    "install it with `apt-get install softhsm2` (Debian/Ubuntu) or `brew install softhsm` (macOS)"
)
USER_PIN = "123456"
SO_PIN = "87654321"
PIN_NAME = "hsm_pin"


class SoftHSMMissing(ConfigError):
    """SoftHSM2 is not installed (the message says how to install it)."""


def module_path() -> str:
    """The SoftHSM2 PKCS#11 module on this machine; :class:`SoftHSMMissing` if none."""
    for p in MODULE_CANDIDATES:
        if Path(p).exists():
            return p
    raise SoftHSMMissing(f"SoftHSM2 is not installed (no libsofthsm2.so found): {INSTALL_HINT}")


def check_installed() -> str:
    """The module path if SoftHSM2 (module and ``softhsm2-util``) is installed, else
    :class:`SoftHSMMissing` saying how to install it."""
    _util()
    return module_path()


def _util() -> str:
    util = shutil.which("softhsm2-util")
    if util is None:
        raise SoftHSMMissing(
            f"SoftHSM2 is not installed (softhsm2-util is not on PATH): {INSTALL_HINT}"
        )
    return util


def pkcs11_toml(
    module: str,
    token_label: str,
    *,
    key_type: str = "ed25519",
    key_label: str = "validator",
    pin_path: str = f"./{PIN_NAME}",
    timeout: float = 1.5,
    public_key: bytes | None = None,
    section: str = "signing.pkcs11",
) -> str:
    """A ``[signing.pkcs11]`` section (``section`` for ``[chains.signing.pkcs11]``);
    with ``public_key`` the token's key must be that one (``public_key`` pin)."""
    lines = [
        f"[{section}]",
        f"module_path = {json.dumps(module)}",
        f"token_label = {json.dumps(token_label)}",
        f"pin_path = {json.dumps(pin_path)}",
        f"key_label = {json.dumps(key_label)}",
        f"key_type = {json.dumps(key_type)}",
        f"timeout = {timeout!r}",
    ]
    if public_key is not None:
        lines.append(f"public_key = {json.dumps(base64.b64encode(public_key).decode())}")
    return "\n".join(lines)


class SoftHSM:
    """A SoftHSM2 installation of its own: ``root/softhsm2.conf`` and ``root/tokens``."""

    def __init__(self, root: Path) -> None:
        self._util = _util()
        self.module = module_path()
        self.root = Path(root)
        self.tokens = self.root / "tokens"
        self.tokens.mkdir(parents=True, exist_ok=True)
        self.conf = self.root / "softhsm2.conf"
        self.conf.write_text(
            f"directories.tokendir = {self.tokens}\nobjectstore.backend = file\nlog.level = ERROR\n"
        )

    @property
    def env(self) -> dict[str, str]:
        """The variables a child process needs to use this installation's tokens."""
        return {"SOFTHSM2_CONF": str(self.conf)}

    def _child_env(self) -> dict[str, str]:
        from nebula.devnet.cluster import _child_env

        return _child_env(self.env)

    def init_token(self, label: str, pin: str = USER_PIN) -> None:
        """Initialise a new token labelled ``label`` with user PIN ``pin``."""
        r = subprocess.run(
            [
                self._util, "--init-token", "--free", "--label", label,
                "--pin", pin, "--so-pin", SO_PIN,
            ],
            env=self._child_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )  # fmt: skip
        if r.returncode != 0:
            raise ConfigError(f"softhsm2-util could not create token {label!r}: {r.stderr}")

    def pin_file(self, directory: Path, pin: str = USER_PIN, mode: int = 0o600) -> Path:
        """Write ``directory/hsm_pin`` holding ``pin`` (mode 0600 unless told)."""
        p = Path(directory) / PIN_NAME
        p.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "w") as f:
            f.write(pin + "\n")
        p.chmod(mode)
        return p

    def generate_key(
        self,
        token_label: str,
        *,
        key_type: str = "ed25519",
        key_label: str = "validator",
        pin: str = USER_PIN,
    ) -> ValidatorKey:
        """Generate a key inside the token with ``nebula hsm generate``; its public key."""
        pin_path = self.pin_file(self.root, pin)
        r = subprocess.run(
            [
                sys.executable, "-m", "nebula.cli.main", "hsm", "generate", "--json",
                "--module", self.module, "--token-label", token_label,
                "--pin-path", str(pin_path), "--key-label", key_label, "--key-type", key_type,
            ],
            env=self._child_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )  # fmt: skip
        if r.returncode != 0:
            raise ConfigError(f"nebula hsm generate failed: {r.stderr.strip()}")
        info = json.loads(r.stdout)
        return ValidatorKey.from_json(info["pub_key"])

    def clone(self, root: Path) -> SoftHSM:
        """A second installation under ``root`` holding copies of every token (see the
        module docstring)."""
        other = SoftHSM(root)
        shutil.rmtree(other.tokens)
        shutil.copytree(self.tokens, other.tokens)
        return other


def installations(
    root: Path, n: int, token_label: str, key_type: str
) -> tuple[list[SoftHSM], ValidatorKey]:
    """``n`` SoftHSM2 installations ``root/node1`` .. ``root/node<n>`` holding one key.

    The key is generated inside the token of ``node1``; the others are clones of it.  One
    installation per Nebula process: SoftHSM2's file store is not safe for several
    processes logging in on one token directory at once (in a 3-node bench one node found
    no token and another got CKR_GENERAL_ERROR; 6 processes logging in at once, 25 times,
    failed 2 of 150).
    """
    first = SoftHSM(Path(root) / "node1")
    first.init_token(token_label)
    key = first.generate_key(token_label, key_type=key_type)
    return [first, *(first.clone(Path(root) / f"node{i}") for i in range(2, n + 1))], key
