"""The check both example receivers make: is this request signed by evq (Standard Webhooks,
with the secret in DELIVERY_SECRET) and recent?"""

import base64
import hashlib
import hmac
import os
import time

KEY = base64.b64decode(os.environ["DELIVERY_SECRET"].removeprefix("whsec_"))


def signed_by_evq(headers: dict[str, str], body: bytes) -> bool:
    sent_at = int(headers.get("webhook-timestamp", "0"))
    if abs(time.time() - sent_at) > 300:  # a replay of an old request
        return False
    signed = f"{headers.get('webhook-id')}.{sent_at}.".encode() + body
    expected = base64.b64encode(hmac.new(KEY, signed, hashlib.sha256).digest()).decode()
    given = headers.get("webhook-signature", "").split()
    return any(hmac.compare_digest(f"v1,{expected}", signature) for signature in given)
