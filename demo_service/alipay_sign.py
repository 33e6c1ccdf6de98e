"""Alipay's RSA2 signatures, and the two key pairs of the shop and the sandbox.

Alipay signs (and wants signed) a *signing string*: the parameters, empty values dropped,
sorted by key, joined as ``k=v`` with ``&``, values raw (not URL-encoded). Which parameters
depends on the direction, as in Alipay's SDKs: an async notify (and the browser return) signs
all but ``sign`` and ``sign_type``; an open-API request signs all but ``sign`` (its
``sign_type`` is signed too; pass ``request=True``). RSA2 is SHA256withRSA with PKCS#1 v1.5
padding; ``sign`` is its standard base64. The gateway's JSON answers are signed the same way
over the exact JSON text of the ``<method>_response`` object (see :func:`sign_text`).

Keys are the DEMO-API's four PEM files: ``app_private.pem``/``app_public.pem`` (the shop signs
its requests, the sandbox verifies them) and ``alipay_private.pem``/``alipay_public.pem`` (the
sandbox signs answers and notifies, the shop verifies them). Private keys are PKCS#8, public
keys SubjectPublicKeyInfo, as Alipay's own tools write them.
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

#: The file names under ``ALIPAY_KEYS_DIR``.
APP_PRIVATE_PEM = "app_private.pem"
APP_PUBLIC_PEM = "app_public.pem"
ALIPAY_PRIVATE_PEM = "alipay_private.pem"
ALIPAY_PUBLIC_PEM = "alipay_public.pem"

#: Alipay's RSA2 keys are 2048 bits.
KEY_BITS = 2048

#: Parameters outside the signing string of a notify or return, and of a request.
UNSIGNED_PARAMS = frozenset({"sign", "sign_type"})
UNSIGNED_REQUEST_PARAMS = frozenset({"sign"})

#: Alipay's clock: China Standard Time (no DST); its params write times in it like this.
CST = timezone(timedelta(hours=8), "CST")
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"


def alipay_time(when: datetime | None = None) -> str:
    """``when`` (now by default) as Alipay writes times: ``YYYY-MM-DD HH:MM:SS`` in CST."""
    return (when or datetime.now(UTC)).astimezone(CST).strftime(TIME_FORMAT)


def signing_string(params: Mapping[str, str | None], *, request: bool = False) -> str:
    """The string Alipay signs: non-empty params but ``sign`` and ``sign_type`` (only ``sign``
    for a ``request``), sorted by key, as ``k=v`` joined with ``&``."""
    left_out = UNSIGNED_REQUEST_PARAMS if request else UNSIGNED_PARAMS
    items = sorted(
        (k, v) for k, v in params.items() if k not in left_out and v is not None and v != ""
    )
    return "&".join(f"{k}={v}" for k, v in items)


def sign_text(text: str, private_key: rsa.RSAPrivateKey) -> str:
    """Base64 of SHA256withRSA (PKCS#1 v1.5) over the UTF-8 bytes of ``text``."""
    signature = private_key.sign(text.encode("utf-8"), padding.PKCS1v15(), hashes.SHA256())
    return base64.b64encode(signature).decode("ascii")


def verify_text(text: str, signature: str, public_key: rsa.RSAPublicKey) -> bool:
    """Whether ``signature`` (base64) is ``text``'s RSA2 signature by ``public_key``'s owner."""
    try:
        raw = base64.b64decode(signature, validate=True)
        public_key.verify(raw, text.encode("utf-8"), padding.PKCS1v15(), hashes.SHA256())
    except (InvalidSignature, binascii.Error, ValueError):
        return False
    return True


def sign(
    params: Mapping[str, str | None], private_key: rsa.RSAPrivateKey, *, request: bool = False
) -> str:
    """The ``sign`` value of ``params`` (RSA2 over :func:`signing_string`)."""
    return sign_text(signing_string(params, request=request), private_key)


def verify(
    params: Mapping[str, str | None], public_key: rsa.RSAPublicKey, *, request: bool = False
) -> bool:
    """Whether ``params["sign"]`` is a valid RSA2 signature of the other params.

    A missing ``sign`` or a ``sign_type`` other than ``RSA2`` (when given) is not valid.
    """
    signature = params.get("sign")
    if not signature:
        return False
    sign_type = params.get("sign_type")
    if sign_type not in (None, "", "RSA2"):
        return False
    return verify_text(signing_string(params, request=request), signature, public_key)


@dataclass(frozen=True)
class AlipayKeys:
    """The two RSA-2048 key pairs: the shop's (``app_*``) and the sandbox's (``alipay_*``)."""

    app_private: rsa.RSAPrivateKey
    app_public: rsa.RSAPublicKey
    alipay_private: rsa.RSAPrivateKey
    alipay_public: rsa.RSAPublicKey

    @classmethod
    def generate(cls) -> AlipayKeys:
        """Two fresh key pairs (nothing written)."""
        app = rsa.generate_private_key(public_exponent=65537, key_size=KEY_BITS)
        alipay = rsa.generate_private_key(public_exponent=65537, key_size=KEY_BITS)
        return cls(app, app.public_key(), alipay, alipay.public_key())


def private_pem(key: rsa.RSAPrivateKey) -> bytes:
    """``key`` as unencrypted PKCS#8 PEM."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def public_pem(key: rsa.RSAPublicKey) -> bytes:
    """``key`` as SubjectPublicKeyInfo PEM."""
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_or_create_keys(directory: Path | str) -> AlipayKeys:
    """The keys under ``directory``, writing whatever pair is missing first.

    Private keys are written 0600 and every file appears whole (written aside, then renamed).
    An exclusive lock on ``directory/.lock`` makes several workers starting at once agree on
    one set of keys: the first creates them, the others read them.

    Raises:
        ValueError: a public key is there without its private key, or does not match it.
    """
    path = Path(directory)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        app_private, app_public = _load_or_create_pair(path, APP_PRIVATE_PEM, APP_PUBLIC_PEM)
        alipay_private, alipay_public = _load_or_create_pair(
            path, ALIPAY_PRIVATE_PEM, ALIPAY_PUBLIC_PEM
        )
    finally:
        os.close(fd)  # closing drops the lock
    return AlipayKeys(app_private, app_public, alipay_private, alipay_public)


def _load_or_create_pair(
    path: Path, private_name: str, public_name: str
) -> tuple[rsa.RSAPrivateKey, rsa.RSAPublicKey]:
    private_file, public_file = path / private_name, path / public_name
    if private_file.exists():
        private = serialization.load_pem_private_key(private_file.read_bytes(), password=None)
        if not isinstance(private, rsa.RSAPrivateKey):
            raise ValueError(f"{private_file} is not an RSA private key")
    elif public_file.exists():
        # Never replace a public key someone gave us: its partner holds the other half.
        raise ValueError(f"{public_file} exists without {private_file}")
    else:
        private = rsa.generate_private_key(public_exponent=65537, key_size=KEY_BITS)
        _write_whole(private_file, private_pem(private), 0o600)
    public = private.public_key()
    if public_file.exists():
        given = serialization.load_pem_public_key(public_file.read_bytes())
        if not isinstance(given, rsa.RSAPublicKey) or given.public_numbers() != (
            public.public_numbers()
        ):
            raise ValueError(f"{public_file} does not match {private_file}")
    else:
        _write_whole(public_file, public_pem(public), 0o644)
    return private, public


def _write_whole(target: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``target`` so that readers see nothing or all of it."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


__all__ = [
    "ALIPAY_PRIVATE_PEM",
    "ALIPAY_PUBLIC_PEM",
    "APP_PRIVATE_PEM",
    "APP_PUBLIC_PEM",
    "CST",
    "TIME_FORMAT",
    "AlipayKeys",
    "alipay_time",
    "load_or_create_keys",
    "private_pem",
    "public_pem",
    "sign",
    "sign_text",
    "signing_string",
    "verify",
    "verify_text",
]
