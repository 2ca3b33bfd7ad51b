"""A local fake of the part of Stripe's API Hearth uses, for tests and the demo.

A real HTTP server on a loopback port speaking Stripe's wire format (form-encoded
requests with bracketed keys, JSON objects with `id` and `object`, errors as
`{"error": {...}}` with Stripe's status codes, `Idempotency-Key` honoured: the
same key and body replay the first response, a different body is a 400), so the
real `stripe` client talks to it unchanged:

    fake = FakeStripe().start()     # fake.api_base → HEARTH_STRIPE_API_BASE
    ...
    fake.pay_session(session_id)   # what a buyer paying the Checkout page does
    payload, signature = fake.signed(fake.events[-1], secret)

Resources: checkout sessions (create, retrieve, list by payment_intent), payment
intents and charges (made by paying a session), refunds, accounts, account links,
transfers. Every change a real Stripe would announce appends an event to
`fake.events`. Tests deliver them themselves, in any order, any number of times;
with `webhook_url` set, the fake also delivers each one once, signed, as Stripe
does (retrying while the endpoint fails). `fake.hold_transfer_responses(n, seconds)`
makes the next n transfer creations happen but answer only after `seconds` (the
client has timed out by then).

A session's `url` is the fake's Checkout page: opening it pays the session, then a
browser is redirected to the session's success_url (an API client gets the JSON).
Opening an account link's `url` finishes Connect onboarding the same way.

    python -m marketplace.billing.fake_stripe [--port 12111] [--webhook-url URL --webhook-secret S]
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import hmac
import itertools
import json
import logging
import queue
import secrets
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

Obj = dict[str, Any]

API_VERSION = "2025-10-29.clover"


class StripeFault(Exception):
    def __init__(self, status: int, type_: str, message: str, *, code: str = "", param: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.body: Obj = {"error": {"type": type_, "message": message}}
        if code:
            self.body["error"]["code"] = code
        if param:
            self.body["error"]["param"] = param


def _missing(kind: str, object_id: str) -> StripeFault:
    return StripeFault(
        404, "invalid_request_error", f"No such {kind}: '{object_id}'", code="resource_missing", param="id"
    )


def decode_form(body: str) -> Obj:
    """Stripe's form encoding (`a[b][0][c]=1`) as nested dicts and lists."""
    root: Obj = {}
    for key, value in parse_qsl(body, keep_blank_values=True):
        parts = key.replace("]", "").split("[")
        node = root
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return _lists(root)


def _lists(node: Any) -> Any:
    """Dicts keyed 0, 1, 2, … (how lists travel in the form encoding) back into lists."""
    if not isinstance(node, dict):
        return node
    converted = {k: _lists(v) for k, v in node.items()}
    if converted and all(k.isdigit() for k in converted):
        return [converted[k] for k in sorted(converted, key=int)]
    return converted


def sign_webhook_payload(payload: str, secret: str, *, timestamp: int | None = None) -> str:
    """The `Stripe-Signature` header Stripe would send: `t=<unix>,v1=<HMAC-SHA256(secret, "t.payload")>`."""
    stamp = int(time.time()) if timestamp is None else timestamp
    digest = hmac.new(secret.encode(), f"{stamp}.{payload}".encode(), hashlib.sha256).hexdigest()
    return f"t={stamp},v1={digest}"


def _int(params: Obj, name: str) -> int:
    raw = params.get(name)
    try:
        value = int(str(raw))
    except ValueError:
        raise StripeFault(400, "invalid_request_error", f"Invalid integer: {raw}", param=name) from None
    return value


logger = logging.getLogger(__name__)


class FakeStripe:
    def __init__(
        self, *, api_key_prefix: str = "sk_test_", webhook_url: str = "", webhook_secret: str = ""
    ) -> None:
        self.api_key_prefix = api_key_prefix
        self.webhook_url = webhook_url
        self.webhook_secret = webhook_secret
        self._outbox: queue.Queue[Obj] = queue.Queue()
        self.objects: dict[str, Obj] = {}
        self.events: list[Obj] = []
        self.requests: list[tuple[str, str]] = []
        self._idempotency: dict[tuple[str, str], tuple[str, int, bytes]] = {}
        self._lock = threading.RLock()
        self._sequence = itertools.count(1)
        self._held_transfers = 0
        self._hold_seconds = 0.0
        self.refusing_destinations: set[str] = set()
        self._server: ThreadingHTTPServer | None = None
        self.api_base = ""

    # ---- lifecycle ---------------------------------------------------------

    def start(self, port: int = 0) -> FakeStripe:
        fake = self

        class Handler(_Handler):
            stripe = fake

        self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._server.daemon_threads = True
        self.api_base = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, name="fake-stripe", daemon=True).start()
        if self.webhook_url:
            threading.Thread(target=self._deliver_forever, name="fake-stripe-webhooks", daemon=True).start()
        return self

    def _deliver_forever(self) -> None:
        """Send each event once, signed; retry a failing endpoint with backoff (as Stripe does, faster)."""
        while True:
            event = self._outbox.get()
            for attempt in range(12):
                payload, signature = self.signed(event, self.webhook_secret)
                request = urllib.request.Request(
                    self.webhook_url,
                    data=payload,
                    method="POST",
                    headers={"Content-Type": "application/json", "Stripe-Signature": signature},
                )
                try:
                    with urllib.request.urlopen(request, timeout=30) as response:
                        if 200 <= response.status < 300:
                            break
                except (urllib.error.URLError, OSError) as exc:
                    logger.info("webhook %s attempt %d failed: %s", event["id"], attempt + 1, exc)
                time.sleep(min(0.2 * 2**attempt, 10))

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    # ---- test hooks ----------------------------------------------------------

    def hold_transfer_responses(self, count: int, seconds: float) -> None:
        """The next `count` transfer creations are carried out, but answered after `seconds`."""
        with self._lock:
            self._held_transfers = count
            self._hold_seconds = seconds

    def of_type(self, object_type: str) -> list[Obj]:
        with self._lock:
            return [copy.deepcopy(o) for o in self.objects.values() if o["object"] == object_type]

    def pay_session(self, session_id: str) -> Obj:
        """The buyer pays on the Checkout page: a payment intent and a charge, the session completes."""
        with self._lock:
            session = self._get("checkout.session", session_id)
            if session["payment_status"] == "paid":
                return copy.deepcopy(session)
            metadata = session.get("_payment_intent_metadata", {})
            intent = self._create(
                "pi",
                "payment_intent",
                amount=session["amount_total"],
                currency=session["currency"],
                status="succeeded",
                metadata=metadata,
                latest_charge=None,
            )
            charge = self._create(
                "ch",
                "charge",
                amount=session["amount_total"],
                amount_refunded=0,
                currency=session["currency"],
                paid=True,
                refunded=False,
                status="succeeded",
                payment_intent=intent["id"],
                metadata=metadata,
            )
            intent["latest_charge"] = charge["id"]
            session.update(status="complete", payment_status="paid", payment_intent=intent["id"])
            self._emit("checkout.session.completed", session)
            return copy.deepcopy(session)

    def refund(self, payment_intent: str, amount: int | None = None) -> Obj:
        """A refund made in the Stripe dashboard (or by the API): the money goes back to the card."""
        with self._lock:
            return copy.deepcopy(self._refund_create({"payment_intent": payment_intent, "amount": amount}))

    def enable_payouts(self, account_id: str) -> Obj:
        """The host owner finishes onboarding; Stripe enables payouts and says so in account.updated."""
        with self._lock:
            account = self._get("account", account_id)
            account.update(payouts_enabled=True, charges_enabled=True, details_submitted=True)
            account["capabilities"] = {"transfers": "active"}
            self._emit("account.updated", account)
            return copy.deepcopy(account)

    def signed(self, event: Obj, secret: str, *, timestamp: int | None = None) -> tuple[bytes, str]:
        """An event as Stripe delivers it: the JSON body and its `Stripe-Signature` header."""
        payload = json.dumps(event, indent=2)
        return payload.encode(), sign_webhook_payload(payload, secret, timestamp=timestamp)

    # ---- the store -------------------------------------------------------------

    def _new_id(self, prefix: str) -> str:
        # Sequence first: ids sort in creation order, as a test may rely on.
        return f"{prefix}_{next(self._sequence):08d}{secrets.token_hex(6)}"

    def _create(self, prefix: str, object_type: str, **fields: Any) -> Obj:
        obj: Obj = {"id": self._new_id(prefix), "object": object_type, "created": int(time.time()), **fields}
        obj.setdefault("livemode", False)
        self.objects[obj["id"]] = obj
        return obj

    def _get(self, object_type: str, object_id: str) -> Obj:
        obj = self.objects.get(object_id)
        if obj is None or obj["object"] != object_type:
            raise _missing(object_type.replace("checkout.", ""), object_id)
        return obj

    def _emit(self, event_type: str, obj: Obj) -> None:
        public = {k: v for k, v in copy.deepcopy(obj).items() if not k.startswith("_")}
        event: Obj = {
            "id": self._new_id("evt"),
            "object": "event",
            "api_version": API_VERSION,
            "created": int(time.time()),
            "data": {"object": public},
            "livemode": False,
            "pending_webhooks": 1,
            "request": {"id": None, "idempotency_key": None},
            "type": event_type,
        }
        self.events.append(event)
        if self.webhook_url:
            self._outbox.put(copy.deepcopy(event))

    def _list(self, object_type: str, url: str, **match: str) -> Obj:
        data = [
            {k: v for k, v in o.items() if not k.startswith("_")}
            for o in self.objects.values()
            if o["object"] == object_type and all(o.get(k) == v for k, v in match.items() if v)
        ]
        data.sort(key=lambda o: o["id"], reverse=True)  # newest first, as Stripe lists
        return {"object": "list", "data": data, "has_more": False, "url": url}

    # ---- resources ---------------------------------------------------------------

    def _session_create(self, params: Obj) -> Obj:
        if params.get("mode") != "payment":
            raise StripeFault(400, "invalid_request_error", "Only mode=payment is faked", param="mode")
        items = params.get("line_items") or []
        if not items:
            raise StripeFault(400, "invalid_request_error", "line_items is required", param="line_items")
        total, currency = 0, ""
        for item in items:
            price = item.get("price_data") or {}
            total += _int(price, "unit_amount") * _int(item, "quantity")
            currency = str(price.get("currency", "")).lower()
        for name in ("success_url", "cancel_url"):
            if not params.get(name):
                raise StripeFault(
                    400, "invalid_request_error", f"Missing required param: {name}.", param=name
                )
        session = self._create(
            "cs_test",
            "checkout.session",
            mode="payment",
            status="open",
            payment_status="unpaid",
            amount_total=total,
            currency=currency,
            client_reference_id=params.get("client_reference_id"),
            customer_email=params.get("customer_email"),
            metadata=params.get("metadata") or {},
            success_url=params["success_url"],
            cancel_url=params["cancel_url"],
            payment_intent=None,
            url="",
            _payment_intent_metadata=(params.get("payment_intent_data") or {}).get("metadata") or {},
        )
        session["url"] = f"{self.api_base}/_fake/pay/{session['id']}"
        return session

    def _refund_create(self, params: Obj) -> Obj:
        intent_id = params.get("payment_intent") or ""
        charge: Obj | None = None
        if params.get("charge"):
            charge = self._get("charge", str(params["charge"]))
        elif intent_id:
            charge_id = self._get("payment_intent", str(intent_id)).get("latest_charge")
            charge = self.objects.get(str(charge_id)) if charge_id else None
        if charge is None:
            raise StripeFault(400, "invalid_request_error", "Nothing to refund", param="payment_intent")
        left = charge["amount"] - charge["amount_refunded"]
        amount = left if params.get("amount") in (None, "") else _int(params, "amount")
        if left <= 0:
            raise StripeFault(
                400,
                "invalid_request_error",
                "Charge has already been refunded.",
                code="charge_already_refunded",
            )
        if not 0 < amount <= left:
            raise StripeFault(
                400,
                "invalid_request_error",
                f"Refund amount ({amount}) is greater than unrefunded amount on charge ({left})",
                param="amount",
            )
        refund = self._create(
            "re",
            "refund",
            amount=amount,
            currency=charge["currency"],
            charge=charge["id"],
            payment_intent=charge["payment_intent"],
            status="succeeded",
            metadata=params.get("metadata") or {},
        )
        charge["amount_refunded"] += amount
        charge["refunded"] = charge["amount_refunded"] == charge["amount"]
        self._emit("charge.refunded", charge)
        self._emit("refund.created", refund)
        return refund

    def _transfer_create(self, params: Obj) -> Obj:
        amount = _int(params, "amount")
        if amount <= 0:
            raise StripeFault(400, "invalid_request_error", "Amount must be positive", param="amount")
        destination = str(params.get("destination", ""))
        account = self.objects.get(destination)
        if account is None or account["object"] != "account":
            raise StripeFault(
                400,
                "invalid_request_error",
                f"No such destination: '{destination}'",
                code="resource_missing",
                param="destination",
            )
        if destination in self.refusing_destinations or not account.get("payouts_enabled"):
            raise StripeFault(
                400,
                "invalid_request_error",
                "Your destination account needs to have at least one of the following capabilities enabled: transfers",
                code="insufficient_capabilities_for_transfer",
                param="destination",
            )
        return self._create(
            "tr",
            "transfer",
            amount=amount,
            amount_reversed=0,
            reversed=False,
            currency=str(params.get("currency", "")).lower(),
            destination=destination,
            transfer_group=params.get("transfer_group"),
            metadata=params.get("metadata") or {},
        )

    def handle(self, method: str, path: str, query: Obj, params: Obj) -> tuple[int, Obj]:
        """One API request (under the store's lock) → (status, JSON body)."""
        parts = [p for p in path.split("/") if p]
        self.requests.append((method, path))
        if method == "POST" and path == "/v1/checkout/sessions":
            return 200, self._session_create(params)
        if method == "GET" and path == "/v1/checkout/sessions":
            return 200, self._list("checkout.session", path, payment_intent=query.get("payment_intent", ""))
        if method == "GET" and parts[:3] == ["v1", "checkout", "sessions"] and len(parts) == 4:
            return 200, self._get("checkout.session", parts[3])
        if method == "POST" and path == "/v1/accounts":
            return 200, self._create(
                "acct",
                "account",
                type=params.get("type", "express"),
                email=params.get("email"),
                charges_enabled=False,
                payouts_enabled=False,
                details_submitted=False,
                capabilities={"transfers": "inactive"},
                metadata=params.get("metadata") or {},
            )
        if method == "GET" and parts[:2] == ["v1", "accounts"] and len(parts) == 3:
            return 200, self._get("account", parts[2])
        if method == "POST" and path == "/v1/account_links":
            account = self._get("account", str(params.get("account", "")))
            account["_return_url"] = params.get("return_url", "")
            return 200, {
                "object": "account_link",
                "created": int(time.time()),
                "expires_at": int(time.time()) + 300,
                "url": f"{self.api_base}/_fake/onboard/{account['id']}",
            }
        if method == "POST" and path == "/v1/transfers":
            return 200, self._transfer_create(params)
        if method == "GET" and path == "/v1/transfers":
            return 200, self._list("transfer", path, transfer_group=query.get("transfer_group", ""))
        if method == "GET" and parts[:2] == ["v1", "transfers"] and len(parts) == 3:
            return 200, self._get("transfer", parts[2])
        if method == "POST" and path == "/v1/refunds":
            return 200, self._refund_create(params)
        if method == "GET" and path == "/v1/refunds":
            return 200, self._list("refund", path, payment_intent=query.get("payment_intent", ""))
        if method == "GET" and parts[:2] == ["v1", "refunds"] and len(parts) == 3:
            return 200, self._get("refund", parts[2])
        if method == "GET" and parts[:2] == ["v1", "charges"] and len(parts) == 3:
            return 200, self._get("charge", parts[2])
        if method == "GET" and parts[:2] == ["v1", "payment_intents"] and len(parts) == 3:
            return 200, self._get("payment_intent", parts[2])
        if parts[:2] == ["_fake", "pay"] and len(parts) == 3:
            return 200, self.pay_session(parts[2])
        if parts[:2] == ["_fake", "onboard"] and len(parts) == 3:
            return 200, self.enable_payouts(parts[2])
        raise StripeFault(404, "invalid_request_error", f"Unrecognized request URL ({method}: {path}).")


def _page_return(obj: Obj) -> str:
    """Where Stripe sends the browser after its hosted page: the session's success_url, or the
    account link's return_url."""
    if obj.get("object") == "checkout.session":
        return str(obj.get("success_url", "")).replace("{CHECKOUT_SESSION_ID}", str(obj["id"]))
    if obj.get("object") == "account":
        return str(obj.get("_return_url", ""))
    return ""


class _Handler(BaseHTTPRequestHandler):
    stripe: FakeStripe
    protocol_version = "HTTP/1.1"
    # Headers and body in one segment: two small writes meet the client's delayed ACK (40 ms each).
    wbufsize = 1 << 16
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    def _serve(self, method: str) -> None:
        fake = self.stripe
        url = urlsplit(self.path)
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
        query = dict(parse_qsl(url.query))
        hook = url.path.startswith("/_fake/")
        auth = self.headers.get("Authorization", "")
        if not hook and not auth.startswith(f"Bearer {fake.api_key_prefix}"):
            self._send(
                401, {"error": {"type": "invalid_request_error", "message": "Invalid API Key provided"}}
            )
            return
        key = self.headers.get("Idempotency-Key") if method == "POST" else None
        fingerprint = f"{method} {url.path} {body}"
        held = 0.0
        with fake._lock:
            if key is not None and (auth, key) in fake._idempotency:
                seen, status, stored = fake._idempotency[(auth, key)]
                if seen != fingerprint:
                    self._send(
                        400,
                        {
                            "error": {
                                "type": "idempotency_error",
                                "message": "Keys for idempotent requests can only be used with the same parameters they were first used with.",
                            }
                        },
                    )
                    return
                self._send(status, stored, replayed=True)
                return
            location = ""
            try:
                status, obj = fake.handle(method, url.path, query, decode_form(body))
                payload: Obj = {k: v for k, v in obj.items() if not k.startswith("_")}
                if hook and "text/html" in self.headers.get("Accept", ""):
                    location = _page_return(obj)
            except StripeFault as fault:
                status, payload = fault.status, fault.body
            encoded = json.dumps(payload).encode()
            if key is not None and status < 500:
                fake._idempotency[(auth, key)] = (fingerprint, status, encoded)
            if method == "POST" and url.path == "/v1/transfers" and status == 200 and fake._held_transfers:
                fake._held_transfers -= 1
                held = fake._hold_seconds
        if held:
            time.sleep(held)  # done and recorded; the client gave up waiting meanwhile
        if location:
            self._redirect(location)
            return
        self._send(status, encoded)

    def _redirect(self, location: str) -> None:
        """A browser on the fake's Checkout or onboarding page goes back to the site, as on Stripe's."""
        self.send_response(303)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _send(self, status: int, body: Obj | bytes, *, replayed: bool = False) -> None:
        encoded = body if isinstance(body, bytes) else json.dumps(body).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(encoded)))
            self.send_header("Request-Id", f"req_{secrets.token_hex(8)}")
            if replayed:
                self.send_header("Idempotent-Replayed", "true")
            self.end_headers()
            self.wfile.write(encoded)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client timed out and closed the socket


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--port", type=int, default=12111)
    parser.add_argument("--webhook-url", default="", help="deliver every event here, signed")
    parser.add_argument("--webhook-secret", default="", help="the endpoint's signing secret (whsec_…)")
    args = parser.parse_args()
    if args.webhook_url and not args.webhook_secret:
        parser.error("--webhook-url needs --webhook-secret")
    fake = FakeStripe(webhook_url=args.webhook_url, webhook_secret=args.webhook_secret).start(args.port)
    print(f"HEARTH_STRIPE_API_BASE={fake.api_base}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        fake.stop()


if __name__ == "__main__":
    main()
