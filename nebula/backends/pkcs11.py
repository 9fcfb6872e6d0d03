"""Keys in a hardware security module, through PKCS#11 (python-pkcs11).

``signing_mode = "pkcs11"``: the consensus key lives in a token (an HSM, a YubiHSM through
its PKCS#11 module, a cloud HSM, SoftHSM2 for tests) and never leaves it.

* **Ed25519**: ``CKM_EDDSA`` (PKCS#11 3.0) over the sign bytes; a 64-byte signature.
* **secp256k1**: ``CKM_ECDSA`` over the SHA-256 digest of the sign bytes, as CometBFT
  does; the token's raw ``r || s`` (or a DER ``SEQUENCE``, which some tokens return) becomes
  CometBFT's 64-byte ``r || s`` with a low ``s`` (CometBFT refuses a high-S signature).

Every signature is verified against the **pinned public key** before it is released: the
key read from the token at start (and compared with ``public_key`` from the config when it
is set).  A token that answers with anything else is refused, never relayed.

Operation:

* One session, opened at start and reused for every request.  The token's login is held by
  a separate session per token and process that is never closed, so that one backend
  closing its session never logs another backend on the same token out.
* Calls into the module run on a dedicated worker thread (python-pkcs11 releases the GIL in
  ``C_Sign``), under the backend's ``timeout``: a slow or hung HSM refuses its own chain's
  request and never blocks the event loop, other chains or the process.  While a call
  that timed out is still inside the module, further requests are refused at once.
* A token or session error (device removed, session closed, key handle gone, general
  error) drops the session; the next request reconnects (open, log in, find the key,
  check it is still the pinned key) with exponential backoff (0.1 s doubling to 5 s); the
  requests in between are refused with the last error.
* **A rejected PIN is never retried**: a token that counts failed logins would lock (and a
  locked token is reported as such).  At start it is a :class:`CredentialRejected` error
  (``nebula start`` exits with status 3, which the systemd unit does not restart); while
  running, every later request is refused until the process is restarted with the
  right PIN.

``load_module`` loads one PKCS#11 module per process (python-pkcs11 supports one).
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import hashlib
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nebula.backends.base import Backend
from nebula.crypto.keys import (
    read_private_file,
    secp256k1_low_s,
    signature_verifier,
)
from nebula.errors import BackendError, ConfigError, CredentialRejected

log = logging.getLogger("nebula.backend.pkcs11")

__all__ = [
    "KEY_TYPES",
    "Pkcs11Backend",
    "Pkcs11Settings",
    "delete_key",
    "generate_key",
    "import_key",
    "load_module",
    "read_public_key",
]

KEY_TYPES = ("ed25519", "secp256k1")
ED25519_OID = "1.3.101.112"
SECP256K1_OID = "1.3.132.0.10"
BACKOFF_MIN = 0.1
BACKOFF_MAX = 5.0
MAX_TIMEOUT = 4.0  # CometBFT gives up on its signer after 5 s


@dataclass(frozen=True, slots=True)
class Pkcs11Settings:
    """Validated ``[signing.pkcs11]`` settings, the PIN already read."""

    module_path: str
    token_label: str
    pin: str
    key_type: str
    key_label: str | None = None
    key_id: bytes | None = None
    public_key: bytes | None = None  # the pin from the config, if any
    timeout: float = 1.0
    where: str = "signing.pkcs11"

    @classmethod
    def create(
        cls,
        *,
        module_path: str,
        token_label: str,
        pin_path: Path | None,
        key_type: str,
        key_label: str | None,
        key_id: str | None,
        public_key: str | None = None,
        timeout: float = 1.0,
        where: str = "signing.pkcs11",
    ) -> Pkcs11Settings:
        if key_type not in KEY_TYPES:
            raise ConfigError(f"{where}.key_type must be one of {', '.join(KEY_TYPES)}")
        if not module_path:
            raise ConfigError(f"{where}.module_path is empty")
        if not token_label:
            raise ConfigError(f"{where}.token_label is empty")
        if not key_label and not key_id:
            raise ConfigError(f"{where}: set key_label or key_id")
        kid: bytes | None = None
        if key_id:
            try:
                kid = bytes.fromhex(key_id)
            except ValueError:
                raise ConfigError(f"{where}.key_id must be hex, got {key_id!r}") from None
        pk: bytes | None = None
        if public_key:
            try:
                pk = base64.b64decode(public_key, validate=True)
            except ValueError:
                raise ConfigError(f"{where}.public_key must be base64") from None
            want = 32 if key_type == "ed25519" else 33
            if len(pk) != want:
                raise ConfigError(
                    f"{where}.public_key: a {key_type} public key has {want} bytes, got {len(pk)}"
                )
        if not 0 < timeout < MAX_TIMEOUT:  # NaN too
            raise ConfigError(
                f"{where}.timeout must be in (0, {MAX_TIMEOUT:g}) seconds "
                "(CometBFT gives up after 5 s)"
            )
        if pin_path is None:
            raise ConfigError(f"{where}.pin_path is required (a file holding the user PIN, 0600)")
        try:
            pin = read_private_file(pin_path, what="HSM PIN file").decode("utf-8").strip()
        except UnicodeDecodeError:
            # Never a guess: a wrong PIN sent to the token counts toward locking it.
            raise ConfigError(f"{where}: the PIN file {pin_path} is not UTF-8") from None
        if not pin:
            raise ConfigError(f"{where}: the PIN file {pin_path} is empty")
        return cls(
            module_path=module_path,
            token_label=token_label,
            pin=pin,
            key_type=key_type,
            key_label=key_label or None,
            key_id=kid,
            public_key=pk,
            timeout=float(timeout),
            where=where,
        )

    @property
    def key_name(self) -> str:
        parts = []
        if self.key_label:
            parts.append(f"label {self.key_label!r}")
        if self.key_id:
            parts.append(f"id {self.key_id.hex()}")
        return " and ".join(parts)


# ---- the module and its errors ----------------------------------------------------------

_MODULE_LOCK = threading.Lock()


def load_module(path: str) -> Any:
    """The PKCS#11 module at ``path`` (python-pkcs11 holds one per process)."""
    try:
        import pkcs11
    except ImportError as e:  # a dependency; say which
        raise ConfigError(f"signing_mode = 'pkcs11' needs python-pkcs11: {e}") from None
    if not Path(path).exists():
        raise ConfigError(f"PKCS#11 module {path} does not exist (is the HSM's library installed?)")
    with _MODULE_LOCK:
        try:
            return pkcs11.lib(path)
        except pkcs11.exceptions.AlreadyInitialized:
            raise ConfigError(
                f"another PKCS#11 module is already loaded in this process; {path} cannot be "
                "loaded next to it (one module per Nebula process)"
            ) from None
        except (OSError, RuntimeError, pkcs11.PKCS11Error) as e:
            raise ConfigError(f"cannot load PKCS#11 module {path}: {e}") from None


def _token(lib: Any, s: Pkcs11Settings) -> Any:
    """The token labelled ``s.token_label``.  Slots are read one by one: a slot that
    fails (another token removed, a broken one) is skipped, never an error for a token
    elsewhere (python-pkcs11's get_token gave up on the first failing slot; found in
    review: one removed token stopped every other token's reconnects)."""
    import pkcs11

    try:
        slots = lib.get_slots(token_present=True)
    except pkcs11.PKCS11Error as e:  # e.g. CKR_GENERAL_ERROR while listing the slots
        raise BackendError(
            f"cannot read the slots of PKCS#11 module {s.module_path}: {_describe(e)}"
        ) from None
    found: list[Any] = []
    labels: set[str] = set()
    unreadable: list[str] = []
    for slot in slots:
        try:
            tok = slot.get_token()
            label = tok.label
        except pkcs11.PKCS11Error as e:
            unreadable.append(f"slot {getattr(slot, 'slot_id', '?')}: {_describe(e)}")
            continue
        if label == s.token_label:
            found.append(tok)
        elif label:
            labels.add(label)
    if len(found) > 1:
        raise BackendError(f"more than one token is labelled {s.token_label!r} in {s.module_path}")
    if found:
        return found[0]
    raise BackendError(
        f"no PKCS#11 token labelled {s.token_label!r} in {s.module_path}"
        + (f" (tokens present: {', '.join(sorted(labels))})" if labels else " (no tokens present)")
        + (f"; unreadable: {'; '.join(unreadable)}" if unreadable else "")
    )


# A PKCS#11 login belongs to the application, not to a session: every session of the
# process sees the private objects once one session logged in, and closing the session that
# logged in logs them all out (python-pkcs11's Session.close calls C_Logout).  So the login
# is held by one session per token that is never closed ("the anchor"), and every backend
# and tool works in sessions of its own opened without the PIN: one chain dropping its
# session (its key gone, a reconnect) never logs another chain on the same token out
# (found in review), and a reconnect never opens a session whose login fails with
# "already logged in" (python-pkcs11 leaves such a session open: one leaked per try).
# (module path, token label) -> (the anchor session, the PIN it logged in with)
_LOGINS: dict[tuple[str, str], tuple[Any, str]] = {}
_LOGIN_LOCK = threading.Lock()


def _anchor_alive(anchor: Any) -> bool:
    import pkcs11

    try:  # any call on a closed session (token removed) fails
        next(iter(anchor.get_objects({pkcs11.Attribute.LABEL: "\x00nebula-probe"})), None)
    except pkcs11.PKCS11Error:
        return False
    return True


def _open_session(lib: Any, s: Pkcs11Settings, *, rw: bool = False) -> Any:
    import pkcs11

    tok = _token(lib, s)
    key = (s.module_path, s.token_label)
    try:
        with _LOGIN_LOCK:
            held = _LOGINS.get(key)
            if held is not None and not _anchor_alive(held[0]):
                del _LOGINS[key]
                held = None
            if held is None:
                try:
                    _LOGINS[key] = (tok.open(user_pin=s.pin), s.pin)
                except pkcs11.UserAlreadyLoggedIn:
                    pass  # logged in already, by a session this process does not hold
            elif held[1] != s.pin:
                # One user PIN per token: a backend configured with another cannot be
                # checked while the token is logged in, and is not let in unchecked.
                raise CredentialRejected(
                    f"the PIN was rejected for PKCS#11 token {s.token_label!r}: it is not "
                    "the PIN this process is logged in to the token with (a token has one "
                    "user PIN); check pin_path. Nebula does not retry a rejected PIN"
                )
        return tok.open(rw=rw)
    except pkcs11.PinIncorrect:
        raise CredentialRejected(
            f"the PIN was rejected by PKCS#11 token {s.token_label!r} (CKR_PIN_INCORRECT); "
            "check pin_path. Nebula does not retry a rejected PIN (the token may lock)"
        ) from None
    except pkcs11.PinLocked:
        raise CredentialRejected(
            f"the user PIN of PKCS#11 token {s.token_label!r} is locked (CKR_PIN_LOCKED, too "
            "many wrong PINs): unlock it with the security officer PIN"
        ) from None
    except (pkcs11.PinExpired, pkcs11.PinInvalid, pkcs11.PinLenRange) as e:
        raise CredentialRejected(
            f"the PIN for PKCS#11 token {s.token_label!r} is not usable: {type(e).__name__}"
        ) from None
    except pkcs11.PKCS11Error as e:
        raise BackendError(
            f"cannot open a session on PKCS#11 token {s.token_label!r}: {_describe(e)}"
        ) from None


def _describe(e: BaseException) -> str:
    text = str(e)
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _attrs(s: Pkcs11Settings) -> dict[Any, Any]:
    from pkcs11 import Attribute

    out: dict[Any, Any] = {}
    if s.key_label:
        out[Attribute.LABEL] = s.key_label
    if s.key_id:
        out[Attribute.ID] = s.key_id
    return out


def _find(session: Any, s: Pkcs11Settings, object_class: Any, what: str) -> Any:
    import pkcs11

    try:
        return session.get_key(object_class=object_class, **_lookup(s))
    except pkcs11.NoSuchKey:
        raise BackendError(
            f"no {what} with {s.key_name} on PKCS#11 token {s.token_label!r}"
            + (" (create one with `nebula hsm generate` or `nebula hsm import`)")
        ) from None
    except pkcs11.MultipleObjectsReturned:
        raise BackendError(
            f"more than one {what} with {s.key_name} on PKCS#11 token {s.token_label!r}: "
            "set key_id as well"
        ) from None
    except pkcs11.PKCS11Error as e:
        raise BackendError(
            f"cannot look up the key on PKCS#11 token {s.token_label!r}: {_describe(e)}"
        ) from None


def _lookup(s: Pkcs11Settings) -> dict[str, Any]:
    kw: dict[str, Any] = {}
    if s.key_label:
        kw["label"] = s.key_label
    if s.key_id:
        kw["id"] = s.key_id
    return kw


def _der_octets(point: bytes) -> bytes:
    """The content of a DER OCTET STRING (CKA_EC_POINT); raw bytes are passed through."""
    if len(point) >= 2 and point[0] == 0x04:
        n = point[1]
        if n < 0x80 and len(point) == 2 + n:
            return point[2:]
        if n == 0x81 and len(point) >= 3 and len(point) == 3 + point[2]:
            return point[3:]
    return point


def _public_from_point(key_type: str, point: bytes) -> bytes:
    raw = _der_octets(point)
    if key_type == "ed25519":
        if len(raw) != 32:
            raise BackendError(f"the token's Ed25519 public key has {len(raw)} bytes, not 32")
        return raw
    import coincurve

    try:
        return coincurve.PublicKey(raw).format(compressed=True)
    except (ValueError, TypeError) as e:
        raise BackendError(f"the token's secp256k1 public key is not a valid point: {e}") from None


def read_public_key(session: Any, s: Pkcs11Settings) -> bytes:
    """The key's public key as CometBFT expects it (32 / 33 bytes), from the token."""
    from pkcs11 import Attribute, ObjectClass

    pub = _find(session, s, ObjectClass.PUBLIC_KEY, "public key")
    try:
        point = pub[Attribute.EC_POINT]
    except Exception as e:
        raise BackendError(f"cannot read the public key from the token: {_describe(e)}") from None
    return _public_from_point(s.key_type, bytes(point))


def _raw_ecdsa(sig: bytes) -> tuple[int, int]:
    """(r, s) from a raw ``r || s`` or a DER ``SEQUENCE { r, s }``."""
    if len(sig) == 64:
        return int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big")
    if len(sig) >= 8 and sig[0] == 0x30:
        from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

        try:
            return decode_dss_signature(sig)
        except ValueError:
            pass
    raise BackendError(f"the token returned a {len(sig)}-byte ECDSA signature CometBFT cannot use")


def normalize_secp256k1(sig: bytes) -> bytes:
    """CometBFT's 64-byte ``r || s`` with ``s`` in the lower half of the group order."""
    r, s = _raw_ecdsa(sig)
    try:
        return secp256k1_low_s(_int32(r) + _int32(s))
    except ValueError:
        raise BackendError("the token returned an out-of-range ECDSA signature") from None


def _int32(v: int) -> bytes:
    """``v`` as 32 big-endian bytes (all zeros when it does not fit: out of range)."""
    return v.to_bytes(32, "big") if 0 <= v < 1 << 256 else bytes(32)


# ---- the backend --------------------------------------------------------------------------


class Pkcs11Backend(Backend):
    """Signs in a PKCS#11 token (see the module docstring)."""

    def __init__(self, settings: Pkcs11Settings, lib: Any, session: Any, priv: Any, pub: bytes):
        self.settings = settings
        self.key_type = settings.key_type
        self.public_key = pub
        self._verify = signature_verifier(settings.key_type, pub)
        self._lib = lib
        self._session: Any = session
        self._priv: Any = priv
        self._lock = threading.Lock()  # one call into the module at a time
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="nebula-hsm")
        self._busy: concurrent.futures.Future[bytes] | None = None
        self._next_attempt = 0.0
        self._backoff = BACKOFF_MIN
        self._last_error = ""
        self._fatal: str | None = None
        self._closed = False
        self.reconnects = 0

    # -- start ---------------------------------------------------------------------------

    @classmethod
    def connect(cls, settings: Pkcs11Settings) -> Pkcs11Backend:
        """Load the module, log in, find the key, pin its public key and sign a self-test.

        Every failure is a clear :class:`ConfigError`, :class:`CredentialRejected` or
        :class:`BackendError` naming the token and key."""
        from pkcs11 import ObjectClass

        lib = load_module(settings.module_path)
        session = _open_session(lib, settings)
        try:
            priv = _find(session, settings, ObjectClass.PRIVATE_KEY, "private key")
            pub = read_public_key(session, settings)
            if settings.public_key is not None and pub != settings.public_key:
                raise BackendError(
                    f"the key with {settings.key_name} on token {settings.token_label!r} is "
                    f"not the pinned {settings.where}.public_key "
                    f"({base64.b64encode(pub).decode()} != "
                    f"{base64.b64encode(settings.public_key).decode()})"
                )
            self = cls(settings, lib, session, priv, pub)
            probe = b"nebula pkcs11 self-test"
            self._finish(self._sign_raw(probe), probe)
        except BaseException:
            with contextlib.suppress(Exception):
                session.close()
            raise
        return self

    # -- signing -------------------------------------------------------------------------

    def _sign_raw(self, msg: bytes) -> bytes:
        from pkcs11 import Mechanism

        if self.key_type == "ed25519":
            return bytes(self._priv.sign(msg, mechanism=Mechanism.EDDSA))
        return bytes(self._priv.sign(hashlib.sha256(msg).digest(), mechanism=Mechanism.ECDSA))

    def _finish(self, raw: bytes, msg: bytes) -> bytes:
        sig = normalize_secp256k1(raw) if self.key_type == "secp256k1" else raw
        if not self._verify(msg, sig):
            raise BackendError(
                f"the signature from PKCS#11 token {self.settings.token_label!r} does not "
                "verify against the pinned public key; refused"
            )
        return sig

    def _reconnect(self) -> None:
        """Open a new session and find the key again (on the worker thread)."""
        from pkcs11 import ObjectClass

        s = self.settings
        session = _open_session(self._lib, s)
        try:
            priv = _find(session, s, ObjectClass.PRIVATE_KEY, "private key")
            pub = read_public_key(session, s)
            if pub != self.public_key:
                raise BackendError(
                    f"the key with {s.key_name} on token {s.token_label!r} changed: it is no "
                    "longer the pinned public key; refusing to sign with it"
                )
        except BaseException:
            with contextlib.suppress(Exception):
                session.close()
            raise
        self._session, self._priv = session, priv
        self.reconnects += 1
        log.info("PKCS#11 token %r: session re-opened", s.token_label)

    def _drop_session(self) -> None:
        session, self._session, self._priv = self._session, None, None
        if session is not None:
            with contextlib.suppress(Exception):
                session.close()

    def _sign_blocking(self, msg: bytes) -> bytes:
        """One signature, on the worker thread: reconnect if needed, sign, verify."""
        import pkcs11

        with self._lock:
            if self._closed:
                raise BackendError("the PKCS#11 backend is closed")
            if self._fatal is not None:
                raise BackendError(self._fatal)
            if self._session is None:
                now = time.monotonic()
                if now < self._next_attempt:
                    raise BackendError(
                        f"PKCS#11 token {self.settings.token_label!r} unavailable "
                        f"(next reconnect in {self._next_attempt - now:.2f}s): {self._last_error}"
                    )
                try:
                    self._reconnect()
                except CredentialRejected as e:
                    self._fatal = f"{e} (restart Nebula once it is fixed)"
                    raise BackendError(self._fatal) from None
                except BackendError as e:
                    self._failed(str(e))
                    raise
                self._backoff = BACKOFF_MIN
            try:
                raw = self._sign_raw(msg)
            except pkcs11.PKCS11Error as e:
                # Session, device or key handle trouble: start over on the next request.
                self._drop_session()
                self._failed(_describe(e))
                raise BackendError(
                    f"PKCS#11 token {self.settings.token_label!r} failed to sign: {_describe(e)}"
                ) from None
            return self._finish(raw, msg)

    def _failed(self, text: str) -> None:
        self._last_error = text
        self._next_attempt = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, BACKOFF_MAX)

    async def sign(self, msg: bytes) -> bytes:
        busy = self._busy
        if busy is not None and not busy.done():
            raise BackendError(
                f"PKCS#11 token {self.settings.token_label!r} is still inside a call that "
                "timed out; refusing until it returns"
            )
        fut = self._pool.submit(self._sign_blocking, msg)
        self._busy = fut
        try:
            return await asyncio.wait_for(asyncio.wrap_future(fut), self.settings.timeout)
        except TimeoutError:
            raise BackendError(
                f"PKCS#11 token {self.settings.token_label!r} did not sign within "
                f"{self.settings.timeout:g}s; refused"
            ) from None

    def release(self) -> None:
        """Close the session and the worker thread now (synchronous ``close``)."""
        self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._lock.acquire(timeout=1.0):
            try:
                self._drop_session()
            finally:
                self._lock.release()

    async def close(self) -> None:
        self.release()

    def __repr__(self) -> str:
        return (
            f"<Pkcs11Backend {self.key_type} token={self.settings.token_label!r} "
            f"{self.settings.key_name}>"
        )


# ---- key management (nebula hsm generate | import) -------------------------------------


def _key_templates(s: Pkcs11Settings) -> tuple[Any, bytes]:
    from pkcs11 import KeyType
    from pkcs11.util.ec import encode_named_curve_parameters

    if s.key_type == "ed25519":
        return KeyType.EC_EDWARDS, encode_named_curve_parameters(ED25519_OID)
    return KeyType.EC, encode_named_curve_parameters(SECP256K1_OID)


def _private_key_attrs() -> dict[Any, Any]:
    """A consensus key in a token: stored, private, sensitive, never extractable, signs."""
    from pkcs11 import Attribute

    return {
        Attribute.TOKEN: True,
        Attribute.PRIVATE: True,
        Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: False,
        Attribute.SIGN: True,
    }


def _refuse_existing(session: Any, s: Pkcs11Settings) -> None:
    import pkcs11
    from pkcs11 import ObjectClass

    for oc in (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY):
        try:
            found = list(session.get_objects({pkcs11.Attribute.CLASS: oc, **_attrs(s)}))
        except pkcs11.PKCS11Error:
            found = []
        if found:
            raise BackendError(
                f"token {s.token_label!r} already holds a key with {s.key_name}; "
                "pick another key_label or delete it first"
            )


def generate_key(s: Pkcs11Settings) -> bytes:
    """Generate the key inside the token (sensitive, never extractable); its public key."""
    import pkcs11
    from pkcs11 import Attribute, Mechanism

    lib = load_module(s.module_path)
    session = _open_session(lib, s, rw=True)
    try:
        _refuse_existing(session, s)
        key_type, params = _key_templates(s)
        mech = (
            Mechanism.EC_EDWARDS_KEY_PAIR_GEN
            if s.key_type == "ed25519"
            else Mechanism.EC_KEY_PAIR_GEN
        )
        dp = session.create_domain_parameters(key_type, {Attribute.EC_PARAMS: params}, local=True)
        common = _attrs(s)
        try:
            dp.generate_keypair(
                store=True,
                mechanism=mech,
                public_template={**common, Attribute.TOKEN: True, Attribute.VERIFY: True},
                private_template={**common, **_private_key_attrs()},
            )
        except pkcs11.PKCS11Error as e:
            raise BackendError(
                f"token {s.token_label!r} could not generate a {s.key_type} key: {_describe(e)}"
            ) from None
        return read_public_key(session, s)
    finally:
        session.close()


def import_key(s: Pkcs11Settings, secret: bytes, public_key: bytes) -> bytes:
    """Store an existing key in the token (sensitive, not extractable from now on)."""
    import pkcs11
    from pkcs11 import Attribute, ObjectClass

    lib = load_module(s.module_path)
    session = _open_session(lib, s, rw=True)
    try:
        _refuse_existing(session, s)
        key_type, params = _key_templates(s)
        if s.key_type == "ed25519":
            point = bytes([0x04, len(public_key)]) + public_key
        else:
            import coincurve

            full = coincurve.PublicKey(public_key).format(compressed=False)
            point = bytes([0x04, len(full)]) + full
        common = _attrs(s)
        try:
            session.create_object(
                {
                    Attribute.CLASS: ObjectClass.PRIVATE_KEY,
                    Attribute.KEY_TYPE: key_type,
                    Attribute.EC_PARAMS: params,
                    Attribute.VALUE: secret,
                    **_private_key_attrs(),
                    **common,
                }
            )
            session.create_object(
                {
                    Attribute.CLASS: ObjectClass.PUBLIC_KEY,
                    Attribute.KEY_TYPE: key_type,
                    Attribute.EC_PARAMS: params,
                    Attribute.EC_POINT: point,
                    Attribute.TOKEN: True,
                    Attribute.VERIFY: True,
                    **common,
                }
            )
        except pkcs11.PKCS11Error as e:
            raise BackendError(
                f"token {s.token_label!r} refused to store the {s.key_type} key: {_describe(e)}"
            ) from None
        got = read_public_key(session, s)
    finally:
        session.close()
    if got != public_key:
        raise BackendError("the token holds a different public key than the imported key's")
    return got


def delete_key(s: Pkcs11Settings) -> int:
    """Delete the key pair with the configured label/id (tests, rotation); objects removed."""
    import pkcs11

    lib = load_module(s.module_path)
    session = _open_session(lib, s, rw=True)
    try:
        objs = list(session.get_objects(_attrs(s)))
        for o in objs:
            o.destroy()
        return len(objs)
    except pkcs11.PKCS11Error as e:
        raise BackendError(f"cannot delete the key: {_describe(e)}") from None
    finally:
        session.close()
