"""The shop's side of Alipay: signed open-API requests, verified answers and notifies.

It speaks Alipay's real protocol (the sandbox is only where it points by default): every
request carries the common params and an RSA2 ``sign`` by the app's private key; every JSON
answer is checked against Alipay's public key over the exact text of its
``<method>_response`` object before anything in it is believed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import httpx

from .alipay_sign import AlipayKeys, alipay_time, sign, verify, verify_text

#: ``code`` of a successful call.
SUCCESS_CODE = "10000"


class AlipayError(Exception):
    """The gateway refused a call (``code``, ``sub_code`` and ``sub_msg`` say why)."""

    def __init__(self, method: str, response: Mapping[str, Any]) -> None:
        self.method = method
        self.response = dict(response)
        self.code = str(response.get("code", ""))
        self.sub_code = str(response.get("sub_code", ""))
        self.sub_msg = str(response.get("sub_msg", ""))
        super().__init__(f"{method}: {self.code} {self.sub_code} {self.sub_msg}".strip())


class AlipayResponseError(Exception):
    """An answer that is not Alipay's: unparseable, unsigned, or signed by someone else."""


class AlipayClient:
    """Calls Alipay's open API as one app.

    Args:
        gateway_url: e.g. ``http://127.0.0.1:8000/sandbox/alipay/gateway.do``.
        app_id: the app the calls are made as (``ALIPAY_APP_ID``).
        keys: ``app_private`` signs requests, ``alipay_public`` verifies answers and notifies.
        http: the client calls go through (its timeouts apply; it is not closed here).

    ``query``, ``close`` and ``refund`` answer the verified ``<method>_response`` object, also
    when Alipay says no (``code`` other than ``"10000"``, e.g. ``sub_code``
    ``ACQ.TRADE_STATUS_ERROR`` when closing a paid trade), like Alipay's SDKs; transport
    errors are httpx's, and an answer that does not verify raises
    :class:`AlipayResponseError`.
    """

    def __init__(
        self, gateway_url: str, app_id: str, keys: AlipayKeys, http: httpx.AsyncClient
    ) -> None:
        self.gateway_url = gateway_url
        self.app_id = app_id
        self.keys = keys
        self.http = http

    def signed_params(
        self, method: str, biz_content: Mapping[str, Any], **extra: str
    ) -> dict[str, str]:
        """The common params of a ``method`` call with ``biz_content``, signed."""
        params = {
            "app_id": self.app_id,
            "method": method,
            "format": "JSON",
            "charset": "utf-8",
            "sign_type": "RSA2",
            "timestamp": alipay_time(),
            "version": "1.0",
            "biz_content": json.dumps(biz_content, ensure_ascii=False, separators=(",", ":")),
        }
        params.update({k: v for k, v in extra.items() if v})
        params["sign"] = sign(params, self.keys.app_private, request=True)
        return params

    async def page_pay(
        self,
        out_trade_no: str,
        total_amount: str,
        subject: str,
        notify_url: str,
        return_url: str,
    ) -> str:
        """Create the trade (``alipay.trade.page.pay``) and answer its cashier page URL.

        The gateway answers a browser's page-pay with a redirect to the cashier; this
        makes the same request and answers where it leads, for the shop to hand on.

        Raises:
            AlipayError: the gateway refused (e.g. ``ACQ.TRADE_HAS_SUCCESS``).
        """
        biz = {
            "out_trade_no": out_trade_no,
            "total_amount": total_amount,
            "subject": subject,
            "product_code": "FAST_INSTANT_TRADE_PAY",
        }
        params = self.signed_params(
            "alipay.trade.page.pay", biz, notify_url=notify_url, return_url=return_url
        )
        response = await self.http.post(self.gateway_url, data=params, follow_redirects=False)
        if response.is_redirect and "location" in response.headers:
            return str(response.headers["location"])
        raise AlipayError("alipay.trade.page.pay", self._verified(response, params["method"]))

    async def query(self, out_trade_no: str) -> dict[str, Any]:
        """``alipay.trade.query``: ``trade_status`` and amounts of one trade."""
        return await self._call("alipay.trade.query", {"out_trade_no": out_trade_no})

    async def close(self, out_trade_no: str) -> dict[str, Any]:
        """``alipay.trade.close``: an unpaid trade can no longer be paid."""
        return await self._call("alipay.trade.close", {"out_trade_no": out_trade_no})

    async def refund(
        self, out_trade_no: str, refund_amount: str, out_request_no: str
    ) -> dict[str, Any]:
        """``alipay.trade.refund``: pays back ``refund_amount``, once per ``out_request_no``."""
        biz = {
            "out_trade_no": out_trade_no,
            "refund_amount": refund_amount,
            "out_request_no": out_request_no,
        }
        return await self._call("alipay.trade.refund", biz)

    def verify_notify(self, form: Mapping[str, str]) -> bool:
        """Whether an async notify is Alipay's (RSA2 ``sign``) and for this app (``app_id``).

        The caller still checks ``out_trade_no`` and ``total_amount`` against its order.
        """
        return form.get("app_id") == self.app_id and verify(form, self.keys.alipay_public)

    async def _call(self, method: str, biz: Mapping[str, Any]) -> dict[str, Any]:
        params = self.signed_params(method, biz)
        response = await self.http.post(self.gateway_url, data=params)
        return self._verified(response, method)

    def _verified(self, response: httpx.Response, method: str) -> dict[str, Any]:
        """The ``<method>_response`` (or ``error_response``) object, once its sign checks out."""
        text = response.text
        try:
            document = json.loads(text)
        except ValueError:
            raise AlipayResponseError(f"{method}: not JSON (HTTP {response.status_code})") from None
        if not isinstance(document, dict):
            raise AlipayResponseError(f"{method}: not a JSON object")
        key = method.replace(".", "_") + "_response"
        if key not in document:
            key = "error_response"
        inner_text = _member_text(text, key)
        signature = document.get("sign")
        if inner_text is None or not isinstance(signature, str):
            raise AlipayResponseError(f"{method}: no signed {key} in the answer")
        # Verify the bytes Alipay signed, not a re-serialisation of what we parsed.
        if not verify_text(inner_text, signature, self.keys.alipay_public):
            raise AlipayResponseError(f"{method}: the answer's signature does not verify")
        inner = json.loads(inner_text)
        if not isinstance(inner, dict):
            raise AlipayResponseError(f"{method}: {key} is not an object")
        return inner


def _member_text(text: str, key: str) -> str | None:
    """The exact JSON text of the top-level member ``key`` of the object in ``text``."""
    decoder = json.JSONDecoder()
    index = text.find("{") + 1
    if index == 0:
        return None
    end = len(text)
    while index < end:
        while index < end and text[index] in " \t\r\n,":
            index += 1
        if index >= end or text[index] == "}":
            return None
        name, index = decoder.raw_decode(text, index)
        while index < end and text[index] in " \t\r\n:":
            index += 1
        start = index
        _, index = decoder.raw_decode(text, index)
        if name == key:
            return text[start:index]
    return None


def is_success(response: Mapping[str, Any]) -> bool:
    """Whether an answer of :class:`AlipayClient` says the call succeeded."""
    return response.get("code") == SUCCESS_CODE


__all__ = [
    "SUCCESS_CODE",
    "AlipayClient",
    "AlipayError",
    "AlipayResponseError",
    "is_success",
]
