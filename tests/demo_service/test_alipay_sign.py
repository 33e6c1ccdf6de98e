"""RSA2 signing as Alipay does it, checked against an independent implementation and the
``python-alipay-sdk`` package; the four PEM files, written once even by racing workers."""

from __future__ import annotations

import base64
import multiprocessing
import stat
from pathlib import Path
from urllib.parse import parse_qsl

import pytest
from alipay import AliPay  # type: ignore[import-untyped]  # python-alipay-sdk
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from demo_service.alipay_sign import (
    ALIPAY_PRIVATE_PEM,
    ALIPAY_PUBLIC_PEM,
    APP_PRIVATE_PEM,
    APP_PUBLIC_PEM,
    AlipayKeys,
    load_or_create_keys,
    private_pem,
    public_pem,
    sign,
    signing_string,
    verify,
)

NOTIFY = {
    "notify_time": "2026-11-30 18:00:00",
    "notify_type": "trade_status_sync",
    "notify_id": "ac05099524730693a8b330c5ecf72da9786",
    "app_id": "2021000000000000",
    "charset": "utf-8",
    "version": "1.0",
    "sign_type": "RSA2",
    "trade_no": "2026113022001400000000000001",
    "out_trade_no": "O20261130000001",
    "total_amount": "99.00",
    "receipt_amount": "99.00",
    "buyer_pay_amount": "99.00",
    "subject": "Python 高并发实战 & more=1",
    "trade_status": "TRADE_SUCCESS",
    "gmt_create": "2026-11-30 17:59:00",
    "gmt_payment": "2026-11-30 17:59:30",
    "seller_id": "2088000000000000",
}


@pytest.fixture(scope="module")
def keys() -> AlipayKeys:
    return AlipayKeys.generate()


def test_signing_string_drops_sign_sign_type_and_empty_values_and_sorts_by_key() -> None:
    params = {"b": "2", "a": "1", "sign": "x", "sign_type": "RSA2", "empty": "", "none": None}
    assert signing_string(params) == "a=1&b=2"
    assert signing_string({"k": "a=b&c", "j": "中文"}) == "j=中文&k=a=b&c"  # values raw
    # An open-API request signs its sign_type too (Alipay's SDKs leave out only sign).
    assert signing_string(params, request=True) == "a=1&b=2&sign_type=RSA2"


def test_sign_verify_round_trip_and_tampering(keys: AlipayKeys) -> None:
    signed = dict(NOTIFY, sign=sign(NOTIFY, keys.alipay_private))
    assert verify(signed, keys.alipay_public)

    assert not verify(dict(signed, total_amount="0.01"), keys.alipay_public)
    assert not verify(dict(signed, extra="1"), keys.alipay_public)
    assert not verify({k: v for k, v in signed.items() if k != "seller_id"}, keys.alipay_public)
    assert not verify(signed, keys.app_public)  # someone else's key
    assert not verify(dict(signed, sign="not base64!"), keys.alipay_public)
    assert not verify(dict(signed, sign=""), keys.alipay_public)
    assert not verify(dict(signed, sign_type="RSA"), keys.alipay_public)
    # sign_type is not signed (Alipay's rule), so only its value is checked.
    assert verify({k: v for k, v in signed.items() if k != "sign_type"}, keys.alipay_public)


def test_signature_matches_an_independent_implementation(keys: AlipayKeys) -> None:
    # The documented recipe, spelled out with cryptography's primitives only.
    text = "&".join(
        f"{k}={NOTIFY[k]}" for k in sorted(NOTIFY) if k not in ("sign", "sign_type") and NOTIFY[k]
    )
    expected = base64.b64encode(
        keys.alipay_private.sign(text.encode(), padding.PKCS1v15(), hashes.SHA256())
    ).decode()
    assert sign(NOTIFY, keys.alipay_private) == expected  # PKCS#1 v1.5 is deterministic
    keys.alipay_public.verify(
        base64.b64decode(sign(NOTIFY, keys.alipay_private)),
        text.encode(),
        padding.PKCS1v15(),
        hashes.SHA256(),
    )


def test_python_alipay_sdk_verifies_our_notify_and_we_verify_its_requests(
    keys: AlipayKeys,
) -> None:
    shop = AliPay(
        appid=NOTIFY["app_id"],
        app_private_key_string=private_pem(keys.app_private).decode(),
        alipay_public_key_string=public_pem(keys.alipay_public).decode(),
        sign_type="RSA2",
    )
    signature = sign(NOTIFY, keys.alipay_private)
    assert shop.verify(dict(NOTIFY), signature)
    assert not shop.verify(dict(NOTIFY, total_amount="1.00"), signature)

    # And the other way round: a request the SDK signs verifies with the app's public key.
    body = shop.build_body("alipay.trade.query", {"out_trade_no": "O1"}, notify_url="http://x/n")
    query = shop.sign_data(body)
    params = dict(parse_qsl(query))
    assert verify(params, keys.app_public, request=True)  # a request signs its sign_type too
    assert not verify(params, keys.app_public)
    assert not verify(params, keys.alipay_public, request=True)


def test_load_or_create_keys_writes_the_four_pems_once(tmp_path: Path) -> None:
    directory = tmp_path / "alipay"
    first = load_or_create_keys(directory)
    names = sorted(p.name for p in directory.iterdir() if not p.name.startswith("."))
    assert names == sorted([APP_PRIVATE_PEM, APP_PUBLIC_PEM, ALIPAY_PRIVATE_PEM, ALIPAY_PUBLIC_PEM])
    for private in (APP_PRIVATE_PEM, ALIPAY_PRIVATE_PEM):
        assert stat.S_IMODE((directory / private).stat().st_mode) == 0o600
        assert (directory / private).read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    for public in (APP_PUBLIC_PEM, ALIPAY_PUBLIC_PEM):
        assert (directory / public).read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
        loaded = serialization.load_pem_public_key((directory / public).read_bytes())
        assert isinstance(loaded, rsa.RSAPublicKey) and loaded.key_size == 2048

    again = load_or_create_keys(directory)
    assert again.app_public.public_numbers() == first.app_public.public_numbers()
    assert again.alipay_public.public_numbers() == first.alipay_public.public_numbers()
    assert first.app_public.public_numbers() != first.alipay_public.public_numbers()


def test_load_or_create_keys_refuses_a_public_key_without_its_private_key(
    tmp_path: Path, keys: AlipayKeys
) -> None:
    (tmp_path / ALIPAY_PUBLIC_PEM).write_bytes(public_pem(keys.alipay_public))
    with pytest.raises(ValueError, match="exists without"):
        load_or_create_keys(tmp_path)
    assert (tmp_path / ALIPAY_PUBLIC_PEM).read_bytes() == public_pem(keys.alipay_public)


def _app_public_modulus(directory: str) -> tuple[int, int]:
    loaded = load_or_create_keys(directory)
    return loaded.app_public.public_numbers().n, loaded.alipay_public.public_numbers().n


def test_workers_starting_at_once_agree_on_one_set_of_keys(tmp_path: Path) -> None:
    directory = str(tmp_path / "alipay")
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        moduli = pool.map(_app_public_modulus, [directory] * 3, chunksize=1)
    assert len(set(moduli)) == 1
    assert moduli[0] == _app_public_modulus(directory)
