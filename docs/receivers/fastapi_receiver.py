"""An evq delivery receiver in FastAPI: verify the Standard Webhooks signature, refuse a stale
owner by its fencing token, then handle the event.

Run beside evq_signature.py: DELIVERY_SECRET=whsec_... uvicorn fastapi_receiver:app --port 9000
"""

import json

from evq_signature import signed_by_evq
from fastapi import FastAPI, HTTPException, Request

highest_token: dict[int, int] = {}  # keep it beside your data, updated in the same transaction
app = FastAPI()


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
