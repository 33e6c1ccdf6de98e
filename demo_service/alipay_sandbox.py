"""A simulated Alipay: the open-API gateway, a cashier page, and signed async notifies.

Its own Starlette app (the demo mounts it at ``/sandbox/alipay``):

- ``GET|POST /gateway.do``: Alipay's common params (``method``, ``app_id``, ``charset``,
  ``sign_type``, ``timestamp``, ``version``, ``biz_content``, ``notify_url``, ``return_url``,
  ``sign``) in the query string, the form body, or both, like the real gateway. Requests with
  an unknown ``app_id`` or a bad RSA2 signature are refused with Alipay's codes
  (``isv.invalid-app-id``, ``isv.invalid-signature``, ...). ``alipay.trade.page.pay`` creates the
  trade and redirects (302) to its cashier page, as the real gateway does for a browser;
  ``alipay.trade.query``, ``.close`` and ``.refund`` answer JSON
  ``{"<method>_response": {...}, "sign": "..."}`` signed over the exact text of the inner object.
- ``GET /cashier/{token}``: subject, amount and a Pay button; ``POST`` with ``action=pay`` pays,
  redirects the browser to ``return_url`` (with Alipay's signed return params) and schedules the
  async notify. A paid or closed trade cannot be paid (the page says so; ``POST`` is 409).
- :class:`Notifier` delivers due notifies (form-encoded, RSA2-signed, DEMO-API's parameters) on
  the ``notify_delays`` schedule until an answer's body is exactly ``success``.

Everything lives in Redis, all under one hash tag (``{alipay}``) so every script is
cluster-safe: ``trade:<out_trade_no>`` (hash, amounts in cents), ``cashier:<token>``,
``refund:<out_trade_no>`` (hash ``out_request_no`` -> ``cents:ms``), ``notify:due`` (sorted
set, due time in ms) and ``notify:<notify_id>`` (hash). Each state change is one Lua script
timed by Redis ``TIME``, so any number of workers share one sandbox. A notifier claims a due
notify by pushing its due time one lease ahead (and recording its lease token): a worker killed
mid-delivery loses nothing, the notify is due again when the lease ends, and a late report
from the old lease is ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import secrets
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

import httpx
import jinja2
from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from .alipay_sign import (
    CST,
    TIME_FORMAT,
    AlipayKeys,
    alipay_time,
    load_or_create_keys,
    sign,
    sign_text,
    verify,
)
from .forms import read_form
from .settings import Settings

log = logging.getLogger("demo_service.alipay_sandbox")

WAIT_BUYER_PAY = "WAIT_BUYER_PAY"
TRADE_SUCCESS = "TRADE_SUCCESS"
TRADE_CLOSED = "TRADE_CLOSED"

PAGE_PAY = "alipay.trade.page.pay"
QUERY = "alipay.trade.query"
CLOSE = "alipay.trade.close"
REFUND = "alipay.trade.refund"

#: The sandbox's seller (Alipay PID), sent as ``seller_id``.
DEFAULT_SELLER_ID = "2088000000000000"
#: Trades (and their notifies) are forgotten this long after their last change.
DEFAULT_TRADE_TTL_SECONDS = 30 * 24 * 3600
#: Alipay's own cap on refunds of one trade.
MAX_REFUNDS_PER_TRADE = 50
#: Largest form body the gateway or the cashier reads (client input is bounded).
MAX_BODY_BYTES = 64 * 1024
#: Alipay's limits on a trade: at most 100 million, in cents.
MAX_TOTAL_CENTS = 100_000_000_00

# Injective key parts: none can contain ":" or a brace, so no two inputs share a key.
_OUT_TRADE_NO = re.compile(r"[A-Za-z0-9_\-]{1,64}")
_OUT_REQUEST_NO = re.compile(r"[A-Za-z0-9_\-]{1,64}")
_TOKEN = re.compile(r"[A-Za-z0-9_\-]{16,64}")
_AMOUNT = re.compile(r"\d{1,9}(\.\d{1,2})?")

# -- Lua ------------------------------------------------------------------------------------

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: trade, cashier:<new token>. ARGV: out_trade_no, trade_no, subject, total_cents,
# notify_url, return_url, token, ttl_s.
# Returns {'ok', token} (a new trade, or the unpaid trade asked for again with the same
# subject and amount), {'inconsistent', status} or {'status', status} (paid or closed).
_CREATE = (
    _NOW
    + """
local f = redis.call('HMGET', KEYS[1], 'status', 'total', 'subject', 'token')
if f[1] then
  if f[1] ~= 'WAIT_BUYER_PAY' then return {'status', f[1]} end
  if f[2] ~= ARGV[4] or f[3] ~= ARGV[3] then return {'inconsistent', f[1]} end
  redis.call('HSET', KEYS[1], 'notify_url', ARGV[5], 'return_url', ARGV[6])
  return {'ok', f[4]}
end
redis.call('HSET', KEYS[1], 'out_trade_no', ARGV[1], 'trade_no', ARGV[2], 'subject', ARGV[3],
  'total', ARGV[4], 'refunded', '0', 'status', 'WAIT_BUYER_PAY', 'notify_url', ARGV[5],
  'return_url', ARGV[6], 'token', ARGV[7], 'gmt_create', now)
redis.call('EXPIRE', KEYS[1], ARGV[8])
redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[8])
return {'ok', ARGV[7]}
"""
)

# KEYS: trade, notify:due, notify:<id>. ARGV: notify_id, first_delay_ms, ttl_s.
# Returns {'paid', now} (and schedules the notify if the trade has a notify_url),
# {'missing'} or {'status', status}.
_PAY = (
    _NOW
    + """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {'missing'} end
if status ~= 'WAIT_BUYER_PAY' then return {'status', status} end
redis.call('HSET', KEYS[1], 'status', 'TRADE_SUCCESS', 'gmt_payment', now)
redis.call('EXPIRE', KEYS[1], ARGV[3])
local url = redis.call('HGET', KEYS[1], 'notify_url')
if url and url ~= '' then
  redis.call('HSET', KEYS[3], 'out_trade_no', redis.call('HGET', KEYS[1], 'out_trade_no'),
    'trade_status', 'TRADE_SUCCESS', 'url', url, 'attempts', 0, 'lost', 0, 'state', 'pending')
  redis.call('EXPIRE', KEYS[3], ARGV[3])
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), ARGV[1])
end
return {'paid', now}
"""
)

# KEYS: trade. ARGV: ttl_s. Returns {'closed'} (also for a trade closed before),
# {'missing'} or {'status', status} (paid: Alipay's ACQ.TRADE_STATUS_ERROR).
_CLOSE = (
    _NOW
    + """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {'missing'} end
if status == 'TRADE_CLOSED' then return {'closed'} end
if status ~= 'WAIT_BUYER_PAY' then return {'status', status} end
redis.call('HSET', KEYS[1], 'status', 'TRADE_CLOSED', 'gmt_close', now)
redis.call('EXPIRE', KEYS[1], ARGV[1])
return {'closed'}
"""
)

# KEYS: trade, refund:<out_trade_no>. ARGV: out_request_no, cents, ttl_s, max_refunds.
# Returns {'refunded', refunded_total, now}, {'repeat', 'cents:ms', refunded_total} (that
# out_request_no was refunded before: nothing moves), {'missing'}, {'status', status},
# {'exceeds'} or {'too_many'}. Paying back the whole amount closes the trade, like Alipay.
_REFUND = (
    _NOW
    + """
local f = redis.call('HMGET', KEYS[1], 'status', 'total', 'refunded')
if not f[1] then return {'missing'} end
local prev = redis.call('HGET', KEYS[2], ARGV[1])
if prev then return {'repeat', prev, f[3]} end
if f[1] ~= 'TRADE_SUCCESS' then return {'status', f[1]} end
local refunded = tonumber(f[3]) + tonumber(ARGV[2])
if refunded > tonumber(f[2]) then return {'exceeds'} end
if redis.call('HLEN', KEYS[2]) >= tonumber(ARGV[4]) then return {'too_many'} end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2] .. ':' .. now)
redis.call('EXPIRE', KEYS[2], ARGV[3])
redis.call('HSET', KEYS[1], 'refunded', refunded)
if refunded == tonumber(f[2]) then
  redis.call('HSET', KEYS[1], 'status', 'TRADE_CLOSED', 'gmt_close', now)
end
redis.call('EXPIRE', KEYS[1], ARGV[3])
return {'refunded', tostring(refunded), now}
"""
)

# KEYS: notify:due, notify:<id>. ARGV: notify_id, lease_token, lease_ms, attempts_allowed,
# max_lost. Claims one due notify: its due time moves one lease ahead and the lease token is
# recorded. A lease that ended without a report (its worker died) is a lost delivery: the
# same attempt is made again, but after max_lost losses it counts as a failed attempt.
# Returns {'claimed', out_trade_no, trade_status, url, attempts} or {'skip'} (not due, taken
# by another notifier, or given up now).
_CLAIM = (
    _NOW
    + """
local due = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not due or tonumber(due) > now then return {'skip'} end
local f = redis.call('HMGET', KEYS[2], 'out_trade_no', 'trade_status', 'url', 'attempts',
  'lease', 'lost')
if not f[1] then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return {'skip'}
end
local attempts = tonumber(f[4])
if f[5] and f[5] ~= '' then
  local lost = redis.call('HINCRBY', KEYS[2], 'lost', 1)
  if lost > tonumber(ARGV[5]) then
    attempts = redis.call('HINCRBY', KEYS[2], 'attempts', 1)
    redis.call('HSET', KEYS[2], 'lost', 0)
  end
end
if attempts >= tonumber(ARGV[4]) then
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('HSET', KEYS[2], 'state', 'gave_up', 'lease', '')
  return {'skip'}
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('HSET', KEYS[2], 'lease', ARGV[2])
return {'claimed', f[1], f[2], f[3], tostring(attempts)}
"""
)

# KEYS: notify:due, notify:<id>. ARGV: notify_id, lease_token, delivered (1/0), http status,
# then the schedule in ms (ARGV[5] is the delay before attempt 1). Reports one delivery; a
# report whose lease is no longer the notify's (it ended and another took over) is ignored.
# Returns 'delivered', 'retry', 'gave_up' or 'stale'.
_REPORT = (
    _NOW
    + """
if redis.call('HGET', KEYS[2], 'lease') ~= ARGV[2] then return 'stale' end
redis.call('HSET', KEYS[2], 'lease', '', 'lost', 0, 'last_status', ARGV[4])
if ARGV[3] == '1' then
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('HSET', KEYS[2], 'state', 'delivered')
  redis.call('HINCRBY', KEYS[2], 'attempts', 1)
  return 'delivered'
end
local attempts = redis.call('HINCRBY', KEYS[2], 'attempts', 1)
local allowed = #ARGV - 4
if attempts >= allowed then
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('HSET', KEYS[2], 'state', 'gave_up')
  return 'gave_up'
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[5 + attempts]), ARGV[1])
return 'retry'
"""
)


# -- helpers --------------------------------------------------------------------------------


def _ms_time(ms: str | bytes | None) -> str:
    if not ms:
        return ""
    return alipay_time(datetime.fromtimestamp(int(ms) / 1000, UTC))


def cents(amount: str) -> int:
    """A money string (``"99"``, ``"99.5"``, ``"99.00"``) as cents.

    Raises:
        ValueError: not a positive amount with at most two decimals within Alipay's limit.
    """
    if not _AMOUNT.fullmatch(amount):
        raise ValueError(f"not an amount: {amount!r}")
    try:
        value = int(Decimal(amount) * 100)
    except InvalidOperation:
        raise ValueError(f"not an amount: {amount!r}") from None
    if not 0 < value <= MAX_TOTAL_CENTS:
        raise ValueError(f"amount out of range: {amount!r}")
    return value


def money(value: int | str | bytes) -> str:
    """Cents as Alipay's decimal string (``"99.00"``)."""
    return str((Decimal(int(value)) / 100).quantize(Decimal("0.01")))


def _s(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else value


def _url_ok(url: str) -> bool:
    if not url:
        return True
    parts = urlsplit(url)
    return len(url) <= 512 and parts.scheme in ("http", "https") and bool(parts.netloc)


class _GatewayError(Exception):
    def __init__(self, code: str, msg: str, sub_code: str, sub_msg: str) -> None:
        super().__init__(sub_msg)
        self.body = {"code": code, "msg": msg, "sub_code": sub_code, "sub_msg": sub_msg}


def _missing(what: str, sub_code: str) -> _GatewayError:
    return _GatewayError("40001", "Missing Required Arguments", sub_code, f"missing {what}")


def _invalid(sub_code: str, sub_msg: str) -> _GatewayError:
    return _GatewayError("40002", "Invalid Arguments", sub_code, sub_msg)


def _business(sub_code: str, sub_msg: str) -> _GatewayError:
    return _GatewayError("40004", "Business Failed", sub_code, sub_msg)


# -- the sandbox ----------------------------------------------------------------------------


class AlipaySandbox:
    """The sandbox's state and rules, shared by its routes and its :class:`Notifier`.

    Args:
        keys: ``app_public`` verifies requests; ``alipay_private`` signs answers and notifies.
        app_id: the only app the sandbox knows.
        redis: where trades and notifies live (``decode_responses`` either way).
        notify_delays: seconds before notify attempt 1, 2, ... (one attempt per entry).
        key_prefix: the first part of every key (all keys also share the ``{alipay}`` tag).
        notify_fail_first: fault injection: the first this many attempts of every notify
            fail as if the network lost them (nothing is posted; the schedule goes on).
        notify_slow_seconds: fault injection: every notify is posted this much later than
            its attempt starts (a slow provider); kept below the delivery timeout.
    """

    def __init__(
        self,
        *,
        keys: AlipayKeys,
        app_id: str,
        redis: Redis,
        notify_delays: Sequence[float],
        key_prefix: str = "alipay:",
        seller_id: str = DEFAULT_SELLER_ID,
        trade_ttl_seconds: int = DEFAULT_TRADE_TTL_SECONDS,
        notify_fail_first: int = 0,
        notify_slow_seconds: float = 0.0,
    ) -> None:
        if notify_fail_first < 0 or notify_slow_seconds < 0:
            raise ValueError("notify faults must not be negative")
        if not notify_delays or any(d < 0 for d in notify_delays):
            raise ValueError("notify_delays must be one or more non-negative delays")
        self.keys = keys
        self.app_id = app_id
        self.redis = redis
        self.notify_delays = tuple(notify_delays)
        self.seller_id = seller_id
        self.trade_ttl_seconds = trade_ttl_seconds
        self.notify_fail_first = notify_fail_first
        self.notify_slow_seconds = notify_slow_seconds
        self._base = f"{key_prefix}{{alipay}}:"
        self._create = redis.register_script(_CREATE)
        self._pay = redis.register_script(_PAY)
        self._close = redis.register_script(_CLOSE)
        self._refund = redis.register_script(_REFUND)
        self.claim_script = redis.register_script(_CLAIM)
        self.report_script = redis.register_script(_REPORT)
        #: Set when this process schedules a notify, so its notifier need not wait a poll.
        self.wakeup = asyncio.Event()

    # keys
    def trade_key(self, out_trade_no: str) -> str:
        """The hash of one trade."""
        return f"{self._base}trade:{out_trade_no}"

    def _cashier_key(self, token: str) -> str:
        return f"{self._base}cashier:{token}"

    def _refund_key(self, out_trade_no: str) -> str:
        return f"{self._base}refund:{out_trade_no}"

    @property
    def due_key(self) -> str:
        """The sorted set of notify ids by due time (ms)."""
        return f"{self._base}notify:due"

    def notify_key(self, notify_id: str) -> str:
        """The hash of one notify: its trade, url, attempts and delivery state."""
        return f"{self._base}notify:{notify_id}"

    # reads
    async def trade(self, out_trade_no: str) -> dict[str, str]:
        """The stored fields of a trade (empty if there is none)."""
        if not _OUT_TRADE_NO.fullmatch(out_trade_no):
            return {}
        raw = await self.redis.hgetall(self.trade_key(out_trade_no))
        return {_s(k): _s(v) for k, v in raw.items()}

    async def notify_state(self, notify_id: str) -> dict[str, str]:
        """The stored fields of a notify (``state`` pending/delivered/gave_up, ``attempts``)."""
        raw = await self.redis.hgetall(self.notify_key(notify_id))
        return {_s(k): _s(v) for k, v in raw.items()}

    # the gateway
    def signed_response(self, method: str | None, body: Mapping[str, Any]) -> Response:
        """``{"<method>_response": body, "sign": ...}`` signed over the exact inner JSON."""
        key = f"{method.replace('.', '_')}_response" if method else "error_response"
        inner = json.dumps(body, ensure_ascii=False, separators=(",", ":"))
        signature = sign_text(inner, self.keys.alipay_private)
        text = f'{{"{key}":{inner},"sign":"{signature}"}}'
        return Response(text, media_type="application/json;charset=utf-8")

    def check_request(self, params: Mapping[str, str]) -> tuple[str, dict[str, Any]]:
        """The method and the parsed ``biz_content`` of a request whose common params check out.

        Raises:
            _GatewayError: with Alipay's code for the first thing wrong.
        """
        method = params.get("method", "")
        if not params.get("app_id"):
            raise _missing("app_id", "isv.missing-app-id")
        if params["app_id"] != self.app_id:
            raise _invalid("isv.invalid-app-id", "unknown app_id")
        if not params.get("sign"):
            raise _missing("sign", "isv.missing-signature")
        if not params.get("sign_type"):
            raise _missing("sign_type", "isv.missing-signature-type")
        if params["sign_type"] != "RSA2":
            raise _invalid("isv.invalid-signature-type", "only RSA2 is supported")
        if params.get("charset", "utf-8").lower() != "utf-8":
            raise _invalid("isv.invalid-charset", "only utf-8 is supported")
        if not verify(params, self.keys.app_public, request=True):
            raise _invalid("isv.invalid-signature", "the signature does not verify")
        if not params.get("timestamp"):
            raise _missing("timestamp", "isv.missing-timestamp")
        try:
            datetime.strptime(params["timestamp"], TIME_FORMAT)
        except ValueError:
            raise _invalid(
                "isv.invalid-timestamp", "timestamp is not yyyy-MM-dd HH:mm:ss"
            ) from None
        if not params.get("version"):
            raise _missing("version", "isv.missing-version")
        if params["version"] != "1.0":
            raise _invalid("isv.invalid-parameter", "version must be 1.0")
        try:
            biz = json.loads(params.get("biz_content") or "{}")
        except ValueError:
            biz = None
        if not isinstance(biz, dict):
            raise _invalid("isv.invalid-parameter", "biz_content is not a JSON object")
        return method, biz

    async def page_pay(self, params: Mapping[str, str], biz: Mapping[str, Any]) -> str:
        """Create (or find) the trade and answer its cashier token."""
        out_trade_no = _out_trade_no(biz)
        subject = biz.get("subject")
        if not isinstance(subject, str) or not 0 < len(subject) <= 256:
            raise _business("ACQ.INVALID_PARAMETER", "subject is missing or too long")
        try:
            total = cents(str(biz.get("total_amount", "")))
        except ValueError as exc:
            raise _business("ACQ.INVALID_PARAMETER", f"total_amount: {exc}") from None
        product_code = biz.get("product_code", "FAST_INSTANT_TRADE_PAY")
        if product_code != "FAST_INSTANT_TRADE_PAY":
            raise _business("ACQ.INVALID_PARAMETER", "product_code must be FAST_INSTANT_TRADE_PAY")
        notify_url, return_url = params.get("notify_url", ""), params.get("return_url", "")
        if not (_url_ok(notify_url) and _url_ok(return_url)):
            raise _business("ACQ.INVALID_PARAMETER", "notify_url/return_url must be http(s) URLs")
        token = secrets.token_urlsafe(24)
        trade_no = (
            # Alipay's shape: the date, "22001", then digits.
            f"{datetime.now(CST):%Y%m%d}22001{secrets.randbelow(10**15):015d}"
        )
        answer = await self._create(
            keys=[self.trade_key(out_trade_no), self._cashier_key(token)],
            args=[
                out_trade_no,
                trade_no,
                subject,
                total,
                notify_url,
                return_url,
                token,
                self.trade_ttl_seconds,
            ],
        )
        verdict, value = _s(answer[0]), _s(answer[1])
        if verdict == "ok":
            return value
        if verdict == "inconsistent":
            raise _business("ACQ.CONTEXT_INCONSISTENT", "the trade exists with other details")
        if value == TRADE_SUCCESS:
            raise _business("ACQ.TRADE_HAS_SUCCESS", "the trade is already paid")
        raise _business("ACQ.TRADE_HAS_CLOSE", "the trade is closed")

    async def query(self, biz: Mapping[str, Any]) -> dict[str, str]:
        """``alipay.trade.query``'s answer."""
        out_trade_no = _out_trade_no(biz)
        trade = await self.trade(out_trade_no)
        if not trade:
            raise _business("ACQ.TRADE_NOT_EXIST", "the trade does not exist")
        paid = trade["status"] != WAIT_BUYER_PAY and bool(trade.get("gmt_payment"))
        body = {
            "code": "10000",
            "msg": "Success",
            "trade_no": trade["trade_no"],
            "out_trade_no": out_trade_no,
            "trade_status": trade["status"],
            "total_amount": money(trade["total"]),
        }
        if paid:
            body |= {
                "buyer_pay_amount": money(trade["total"]),
                "receipt_amount": money(trade["total"]),
                "send_pay_date": _ms_time(trade["gmt_payment"]),
                "buyer_logon_id": "buy***@sandbox.com",
            }
        if int(trade.get("refunded") or 0):
            body["refund_fee"] = money(trade["refunded"])
        return body

    async def close(self, biz: Mapping[str, Any]) -> dict[str, str]:
        """``alipay.trade.close``: a paid trade cannot be closed (ACQ.TRADE_STATUS_ERROR)."""
        out_trade_no = _out_trade_no(biz)
        answer = await self._close(
            keys=[self.trade_key(out_trade_no)], args=[self.trade_ttl_seconds]
        )
        verdict = _s(answer[0])
        if verdict == "missing":
            raise _business("ACQ.TRADE_NOT_EXIST", "the trade does not exist")
        if verdict == "status":
            raise _business("ACQ.TRADE_STATUS_ERROR", "the trade is paid and cannot be closed")
        trade = await self.trade(out_trade_no)
        return {
            "code": "10000",
            "msg": "Success",
            "trade_no": trade.get("trade_no", ""),
            "out_trade_no": out_trade_no,
        }

    async def refund(self, biz: Mapping[str, Any]) -> dict[str, str]:
        """``alipay.trade.refund``: idempotent by ``out_request_no``, never above what was paid."""
        out_trade_no = _out_trade_no(biz)
        out_request_no = str(biz.get("out_request_no") or out_trade_no)
        if not _OUT_REQUEST_NO.fullmatch(out_request_no):
            raise _business("ACQ.INVALID_PARAMETER", "out_request_no is not valid")
        try:
            amount = cents(str(biz.get("refund_amount", "")))
        except ValueError as exc:
            raise _business("ACQ.INVALID_PARAMETER", f"refund_amount: {exc}") from None
        answer = await self._refund(
            keys=[self.trade_key(out_trade_no), self._refund_key(out_trade_no)],
            args=[out_request_no, amount, self.trade_ttl_seconds, MAX_REFUNDS_PER_TRADE],
        )
        verdict = _s(answer[0])
        if verdict == "missing":
            raise _business("ACQ.TRADE_NOT_EXIST", "the trade does not exist")
        if verdict == "status":
            raise _business("ACQ.TRADE_STATUS_ERROR", f"the trade is {_s(answer[1])}")
        if verdict == "exceeds":
            raise _business("ACQ.REFUND_AMT_NOT_EQUAL_TOTAL", "refunds would exceed the payment")
        if verdict == "too_many":
            raise _business("ACQ.INVALID_PARAMETER", "too many refunds for one trade")
        if verdict == "repeat":
            before, _, at = _s(answer[1]).partition(":")
            if int(before) != amount:
                raise _business(
                    "ACQ.INVALID_PARAMETER", "out_request_no was used with another amount"
                )
            fund_change, refunded, when = "N", _s(answer[2]), at
        else:
            fund_change, refunded, when = "Y", _s(answer[1]), _s(answer[2])
        trade = await self.trade(out_trade_no)
        return {
            "code": "10000",
            "msg": "Success",
            "trade_no": trade.get("trade_no", ""),
            "out_trade_no": out_trade_no,
            "buyer_logon_id": "buy***@sandbox.com",
            "fund_change": fund_change,
            "refund_fee": money(refunded),
            "gmt_refund_pay": _ms_time(when),
        }

    # the cashier
    async def pay(self, out_trade_no: str) -> tuple[str, str]:
        """The buyer pays: ``("paid", notify_id)``, ``("missing", "")`` or ``("status", s)``."""
        notify_id = uuid.uuid4().hex
        first_delay_ms = round(self.notify_delays[0] * 1000)
        answer = await self._pay(
            keys=[self.trade_key(out_trade_no), self.due_key, self.notify_key(notify_id)],
            args=[notify_id, first_delay_ms, self.trade_ttl_seconds],
        )
        verdict = _s(answer[0])
        if verdict == "paid":
            self.wakeup.set()
            return verdict, notify_id
        return verdict, _s(answer[1]) if len(answer) > 1 else ""

    async def cashier_trade(self, token: str) -> dict[str, str]:
        """The trade a cashier token stands for (empty if none)."""
        if not _TOKEN.fullmatch(token):
            return {}
        out_trade_no = _s(await self.redis.get(self._cashier_key(token)))
        return await self.trade(out_trade_no) if out_trade_no else {}

    def return_params(self, trade: Mapping[str, str]) -> dict[str, str]:
        """The signed params Alipay appends to ``return_url`` after a page payment."""
        params = {
            "charset": "utf-8",
            "out_trade_no": trade["out_trade_no"],
            "method": "alipay.trade.page.pay.return",
            "total_amount": money(trade["total"]),
            "trade_no": trade["trade_no"],
            "auth_app_id": self.app_id,
            "version": "1.0",
            "app_id": self.app_id,
            "sign_type": "RSA2",
            "seller_id": self.seller_id,
            "timestamp": alipay_time(),
        }
        params["sign"] = sign(params, self.keys.alipay_private)
        return params

    def notify_params(
        self, notify_id: str, trade: Mapping[str, str], status: str
    ) -> dict[str, str]:
        """The signed async notify of ``trade`` (DEMO-API's parameter list, none empty)."""
        total = money(trade["total"])
        params = {
            "notify_time": alipay_time(),
            "notify_type": "trade_status_sync",
            "notify_id": notify_id,
            "app_id": self.app_id,
            "charset": "utf-8",
            "version": "1.0",
            "sign_type": "RSA2",
            "trade_no": trade["trade_no"],
            "out_trade_no": trade["out_trade_no"],
            "total_amount": total,
            "receipt_amount": total,
            "buyer_pay_amount": total,
            "subject": trade["subject"],
            "trade_status": status,
            "gmt_create": _ms_time(trade["gmt_create"]),
            "gmt_payment": _ms_time(trade.get("gmt_payment")),
            "seller_id": self.seller_id,
        }
        params = {k: v for k, v in params.items() if v}
        params["sign"] = sign(params, self.keys.alipay_private)
        return params


def _out_trade_no(biz: Mapping[str, Any]) -> str:
    value = biz.get("out_trade_no")
    if not isinstance(value, str) or not _OUT_TRADE_NO.fullmatch(value):
        raise _business("ACQ.INVALID_PARAMETER", "out_trade_no is missing or not valid")
    return value


# -- routes ---------------------------------------------------------------------------------


async def _gateway(request: Request) -> Response:
    sandbox: AlipaySandbox = request.app.state.sandbox
    params: dict[str, str] = {}
    pairs = request.query_params.multi_items()
    if request.method == "POST":
        form = await read_form(request, MAX_BODY_BYTES)
        if form is None:
            return sandbox.signed_response(
                None, _invalid("isv.invalid-parameter", "unreadable form body").body
            )
        pairs += list(form.items())
    for k, v in pairs:
        if k in params:  # a repeated param could mean one thing signed and another acted on
            return sandbox.signed_response(
                None, _invalid("isv.invalid-parameter", f"{k} given twice").body
            )
        params[k] = v
    method = params.get("method")
    if not method:
        return sandbox.signed_response(None, _missing("method", "isv.missing-method").body)
    if method not in (PAGE_PAY, QUERY, CLOSE, REFUND):
        return sandbox.signed_response(None, _invalid("isv.invalid-method", "unknown method").body)
    try:
        method, biz = sandbox.check_request(params)
        if method == PAGE_PAY:
            token = await sandbox.page_pay(params, biz)
            # The cashier sits beside the gateway, wherever the sandbox is mounted.
            where = request.url.path.removesuffix("/gateway.do")
            url = request.url.replace(path=f"{where}/cashier/{token}", query="")
            return RedirectResponse(str(url), status_code=302)
        if method == QUERY:
            return sandbox.signed_response(method, await sandbox.query(biz))
        if method == CLOSE:
            return sandbox.signed_response(method, await sandbox.close(biz))
        return sandbox.signed_response(method, await sandbox.refund(biz))
    except _GatewayError as exc:
        return sandbox.signed_response(method, exc.body)


#: The cashier page (``templates/sandbox/cashier.html``), autoescaped.
_TEMPLATES = jinja2.Environment(
    loader=jinja2.FileSystemLoader(Path(__file__).resolve().parent / "templates" / "sandbox"),
    autoescape=True,
)


def _cashier_page(trade: Mapping[str, str], status_code: int = 200) -> HTMLResponse:
    page = _TEMPLATES.get_template("cashier.html").render(
        subject=trade["subject"],
        amount=money(trade["total"]),
        out_trade_no=trade["out_trade_no"],
        status=trade["status"],
    )
    return HTMLResponse(page, status_code=status_code)


def _not_found() -> HTMLResponse:
    return HTMLResponse("<!doctype html><p>No such cashier page.</p>", status_code=404)


def _with_query(url: str, params: Mapping[str, str]) -> str:
    parts = urlsplit(url)
    query = "&".join(q for q in (parts.query, urlencode(params)) if q)
    return urlunsplit(parts._replace(query=query))


async def _cashier(request: Request) -> Response:
    sandbox: AlipaySandbox = request.app.state.sandbox
    trade = await sandbox.cashier_trade(request.path_params["token"])
    if not trade:
        return _not_found()
    if request.method == "GET":
        return _cashier_page(trade)
    form = await read_form(request, MAX_BODY_BYTES)
    if form is None or form.get("action") != "pay":
        return HTMLResponse("<!doctype html><p>Unknown action.</p>", status_code=400)
    verdict, _ = await sandbox.pay(trade["out_trade_no"])
    trade = await sandbox.trade(trade["out_trade_no"])
    if verdict != "paid":
        return _cashier_page(trade, status_code=409) if trade else _not_found()
    if not trade.get("return_url"):
        return _cashier_page(trade)
    return RedirectResponse(
        _with_query(trade["return_url"], sandbox.return_params(trade)), status_code=303
    )


# -- the notifier ---------------------------------------------------------------------------


class Notifier:
    """Delivers due notifies until each is answered ``success`` or its schedule runs out.

    Any number of notifiers (one per worker) may run on one Redis: a notify is claimed with
    a lease (one Lua script), so no two deliver the same attempt at once, and one whose
    worker died is delivered again when its lease ends.

    Args:
        sandbox: the trades and the schedule.
        http_client_factory: makes the HTTP client notifies are posted with (tests pass one
            with an ``ASGITransport``); it is closed on :meth:`stop`.
        lease_seconds: how long a claim holds a notify; each delivery is cut off well before.
        poll_seconds: the longest wait between looks at the due set.
    """

    def __init__(
        self,
        sandbox: AlipaySandbox,
        http_client_factory: Callable[[], httpx.AsyncClient],
        *,
        lease_seconds: float = 30.0,
        poll_seconds: float = 0.5,
        batch: int = 16,
        max_lost: int = 3,
    ) -> None:
        self.sandbox = sandbox
        self.http_client_factory = http_client_factory
        self.lease_seconds = lease_seconds
        self.delivery_timeout = lease_seconds / 3
        self.poll_seconds = poll_seconds
        self.batch = batch
        self.max_lost = max_lost
        self._id = uuid.uuid4().hex[:12]
        self._claims = 0
        self._task: asyncio.Task[None] | None = None
        self._http: httpx.AsyncClient | None = None
        self._inflight: set[asyncio.Task[str]] = set()
        self._stopping = False

    def start(self) -> Notifier:
        """Start the background task (idempotent)."""
        if self._task is None:
            self._stopping = False
            self._http = self.http_client_factory()
            self._task = asyncio.create_task(self._run(), name="alipay-sandbox-notifier")
        return self

    async def stop(self) -> None:
        """Stop the task and close the HTTP client; a claim in flight is picked up later."""
        task, self._task = self._task, None
        self._stopping = True
        if task is not None:
            self.sandbox.wakeup.set()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        inflight = list(self._inflight)
        for delivery in inflight:  # their leases run out: another notifier takes them
            delivery.cancel()
        await asyncio.gather(*inflight, return_exceptions=True)
        http, self._http = self._http, None
        if http is not None:
            await http.aclose()

    async def _run(self) -> None:
        # The flag, not only cancel(): a cancel that lands inside a library call which
        # swallows it must not leave the loop running (and stop() waiting) for ever.
        while not self._stopping:
            try:
                await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # Redis away for a moment: the next poll tries again
                log.warning("alipay sandbox notifier: polling failed", exc_info=True)
            self.sandbox.wakeup.clear()
            if self._stopping:
                break
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._sleep_seconds()):
                    await self.sandbox.wakeup.wait()

    def _sleep_seconds(self) -> float:
        return min([self.poll_seconds, *[d for d in self.sandbox.notify_delays if d > 0]])

    async def run_once(self) -> int:
        """Claim the notifies due now and start delivering them; the number claimed.

        Deliveries run as tasks (at most ``batch`` at once), so one slow shop endpoint does
        not hold back the notifies behind it.
        """
        room = self.batch - len(self._inflight)
        if room <= 0:
            return 0
        sandbox = self.sandbox
        server_time = await sandbox.redis.time()
        now_ms = int(server_time[0]) * 1000 + int(server_time[1]) // 1000
        due = await sandbox.redis.zrangebyscore(sandbox.due_key, "-inf", now_ms, start=0, num=room)
        ids = [_s(n) for n in due if isinstance(n, bytes | str)]
        claimed = [c for c in await asyncio.gather(*(self.claim(n) for n in ids)) if c]
        for claim in claimed:
            task = asyncio.create_task(self.deliver(*claim))
            self._inflight.add(task)
            task.add_done_callback(self._delivered)
        return len(claimed)

    def _delivered(self, task: asyncio.Task[str]) -> None:
        self._inflight.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # Redis failed the report: the lease runs out and the notify is due again.
            log.warning("alipay sandbox notifier: report failed", exc_info=task.exception())
        self.sandbox.wakeup.set()  # room for more

    async def claim(self, notify_id: str) -> tuple[str, str, list[str]] | None:
        """Lease one due notify: ``(notify_id, lease_token, [out_trade_no, status, url,
        attempts before this one])``."""
        self._claims += 1
        lease = f"{self._id}:{self._claims}"
        answer = await self.sandbox.claim_script(
            keys=[self.sandbox.due_key, self.sandbox.notify_key(notify_id)],
            args=[
                notify_id,
                lease,
                round(self.lease_seconds * 1000),
                len(self.sandbox.notify_delays),
                self.max_lost,
            ],
        )
        if _s(answer[0]) != "claimed":
            return None
        return notify_id, lease, [_s(a) for a in answer[1:5]]

    async def deliver(self, notify_id: str, lease: str, item: list[str]) -> str:
        """Post one claimed notify and report how it went; the report's verdict."""
        out_trade_no, trade_status, url, *rest = item
        trade = await self.sandbox.trade(out_trade_no)
        delivered, status = False, 0
        sandbox = self.sandbox
        if rest and rest[0].isdigit() and int(rest[0]) < sandbox.notify_fail_first:
            log.info(
                "alipay sandbox notify %s: attempt %s fails (fault injection)", notify_id, rest[0]
            )
            trade = {}  # fault injection: this attempt is lost on the way
        elif sandbox.notify_slow_seconds > 0:
            await asyncio.sleep(min(sandbox.notify_slow_seconds, self.delivery_timeout / 2))
        if trade and self._http is not None:
            params = self.sandbox.notify_params(notify_id, trade, trade_status)
            try:
                async with asyncio.timeout(self.delivery_timeout):
                    response = await self._http.post(
                        url,
                        content=urlencode(params).encode(),
                        headers={
                            "content-type": "application/x-www-form-urlencoded; charset=utf-8"
                        },
                    )
                status = response.status_code
                # Alipay's rule: only the exact body "success" ends the retries.
                delivered = 200 <= status < 300 and response.content == b"success"
            except (httpx.HTTPError, TimeoutError) as exc:
                log.info("alipay sandbox notify %s to %s failed: %r", notify_id, url, exc)
        return await self.report(notify_id, lease, delivered=delivered, status=status)

    async def report(self, notify_id: str, lease: str, *, delivered: bool, status: int) -> str:
        """Record one delivery under ``lease``: ``delivered``, ``retry``, ``gave_up`` or
        ``stale`` (the lease ended and the notify is no longer this claim's)."""
        delays_ms = [round(d * 1000) for d in self.sandbox.notify_delays]
        verdict = await self.sandbox.report_script(
            keys=[self.sandbox.due_key, self.sandbox.notify_key(notify_id)],
            args=[notify_id, lease, "1" if delivered else "0", status, *delays_ms],
        )
        return _s(verdict)


# -- the app --------------------------------------------------------------------------------


def create_sandbox_app(
    *,
    keys: AlipayKeys,
    app_id: str,
    redis: Redis,
    notify_delays: Sequence[float],
    http_client_factory: Callable[[], httpx.AsyncClient] | None = None,
    key_prefix: str = "alipay:",
    seller_id: str = DEFAULT_SELLER_ID,
    notify_fail_first: int = 0,
    notify_slow_seconds: float = 0.0,
) -> Starlette:
    """The sandbox as an ASGI app; run its notifier with :func:`start_notifier`.

    ``app.state.sandbox`` is the :class:`AlipaySandbox`; ``app.state.http_client_factory``
    (a plain ``httpx.AsyncClient`` unless given) is what :func:`start_notifier` uses, and
    may be replaced before it is called.
    """
    sandbox = AlipaySandbox(
        keys=keys,
        app_id=app_id,
        redis=redis,
        notify_delays=notify_delays,
        key_prefix=key_prefix,
        seller_id=seller_id,
        notify_fail_first=notify_fail_first,
        notify_slow_seconds=notify_slow_seconds,
    )
    app = Starlette(
        routes=[
            Route("/gateway.do", _gateway, methods=["GET", "POST"], name="gateway"),
            Route("/cashier/{token}", _cashier, methods=["GET", "POST"], name="cashier"),
        ]
    )
    app.state.sandbox = sandbox
    app.state.http_client_factory = http_client_factory or (lambda: httpx.AsyncClient(timeout=10.0))
    return app


def start_notifier(app: Starlette, **options: Any) -> Notifier:
    """Start the notifier of a sandbox app; ``await notifier.stop()`` on shutdown.

    ``options`` go to :class:`Notifier` (``lease_seconds``, ``poll_seconds``, ...).
    """
    return Notifier(app.state.sandbox, app.state.http_client_factory, **options).start()


# -- the demo's wiring ------------------------------------------------------------------------

#: Where the demo mounts the sandbox.
MOUNT_PATH = "/sandbox/alipay"


def install(app: Starlette, settings: Settings, redis_url: str) -> Starlette:
    """Mount the sandbox on the demo ``app`` (``app.state.alipay_sandbox``); run its notifier
    with :func:`start`/:func:`stop` in the app's lifespan.

    The keys are ``settings.alipay_keys_path``'s (written on first start); trades live under
    ``settings.redis_prefix``. Notifies are posted over real HTTP to the ``notify_url`` the
    shop gave; tests may replace ``app.state.alipay_sandbox.state.http_client_factory``
    before the app starts.
    """
    redis = Redis.from_url(redis_url, socket_timeout=1.0, socket_connect_timeout=1.0)
    sandbox = create_sandbox_app(
        keys=load_or_create_keys(settings.alipay_keys_path),
        app_id=settings.alipay_app_id,
        redis=redis,
        notify_delays=settings.alipay_notify_delays,
        key_prefix=f"{settings.redis_prefix}:",
        notify_fail_first=settings.alipay_notify_fail_first,
        notify_slow_seconds=settings.alipay_notify_slow_seconds,
    )
    app.mount(MOUNT_PATH, sandbox)
    app.state.alipay_sandbox = sandbox
    return sandbox


async def start(app: Starlette) -> None:
    """Start this process's notifier (every worker runs one; leases keep them apart)."""
    app.state.alipay_notifier = start_notifier(app.state.alipay_sandbox)


async def stop(app: Starlette) -> None:
    """Stop the notifier and close the sandbox's Redis client."""
    notifier: Notifier | None = getattr(app.state, "alipay_notifier", None)
    if notifier is not None:
        await notifier.stop()
    await app.state.alipay_sandbox.state.sandbox.redis.aclose()


__all__ = [
    "CLOSE",
    "MOUNT_PATH",
    "PAGE_PAY",
    "QUERY",
    "REFUND",
    "TRADE_CLOSED",
    "TRADE_SUCCESS",
    "WAIT_BUYER_PAY",
    "AlipaySandbox",
    "Notifier",
    "cents",
    "create_sandbox_app",
    "install",
    "money",
    "start",
    "start_notifier",
    "stop",
]
