"""An evq delivery receiver in FastAPI: verify the Standard Webhooks signature, refuse a stale
owner by its fencing token, then handle the event.

Run: DELIVERY_SECRET=whsec_... uvicorn fastapi_receiver:app --port 9000
"""

import base64
import hashlib
import hmac
import json
import os
import time

from fastapi import FastAPI, HTTPException, Request

KEY = base64.b64decode(os.environ["DELIVERY_SECRET"].removeprefix("whsec_"))
highest_token: dict[int, int] = {}  # keep it beside your data, updated in the same transaction
app = FastAPI()


def signed_by_evq(headers: dict[str, str], body: bytes) -> bool:
    sent_at = int(headers.get("webhook-timestamp", "0"))
    if abs(time.time() - sent_at) > 300:  # a replay of an old request
        return False
    signed = f"{headers.get('webhook-id')}.{sent_at}.".encode() + body
    expected = base64.b64encode(hmac.new(KEY, signed, hashlib.sha256).digest()).decode()
    given = headers.get("webhook-signature", "").split()
    return any(hmac.compare_digest(f"v1,{expected}", signature) for signature in given)


@app.post("/hooks/{account_id}")
async def receive(account_id: int, request: Request) -> dict[str, bool]:
    body = await request.body()
    if not signed_by_evq(dict(request.headers), body):
        raise HTTPException(401, "bad signature")
    token = int(request.headers["evq-token"])
    if token < highest_token.get(account_id, 0):
        raise HTTPException(409, "stale owner: a newer one holds this account")
    highest_token[account_id] = token
    event = json.loads(body)  # account_id, event_id, seq, attempt, payload
    print(event["seq"], event["payload"])  # your work here, idempotent by event_id
    return {"ok": True}
