"""A real SoftHSM2 for tests: a private token directory, tokens made with ``softhsm2-util``.

The installation itself (config, token directory, ``init_token``, ``pin_file``,
``generate_key``, ``clone``, ``env`` for ``nebula start`` children) is
:class:`nebula.devnet.softhsm.SoftHSM`, shared with ``nebula demo`` and ``nebula bench``;
this subclass adds what in-process tests need.

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

from nebula.devnet import softhsm as _devnet
from nebula.devnet.softhsm import SO_PIN, USER_PIN, module_path

__all__ = ["SO_PIN", "USER_PIN", "SoftHSM", "module_path"]


class SoftHSM(_devnet.SoftHSM):
    def __init__(self, root: Path | None = None) -> None:
        super().__init__(Path(root or tempfile.mkdtemp(prefix="nebula-softhsm-")))

    def activate(self) -> None:
        """Point this process's SoftHSM2 at these tokens (before the module loads)."""
        os.environ["SOFTHSM2_CONF"] = str(self.conf)

    def init_token(self, label: str, pin: str = USER_PIN) -> None:
        super().init_token(label, pin)
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
