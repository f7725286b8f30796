"""An evq delivery receiver with no framework (the standard library only): verify the
Standard Webhooks signature, refuse a stale owner by its fencing token, handle the event.

Run beside evq_signature.py: DELIVERY_SECRET=whsec_... python plain_receiver.py
(listens on 127.0.0.1:9000)
"""

import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from threading import Lock

from evq_signature import signed_by_evq

highest_token: dict[int, int] = {}  # keep it beside your data, updated in the same transaction
lock = Lock()


class Hooks(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["content-length"]))
        headers = {name.lower(): value for name, value in self.headers.items()}
        self.send_response(self.status_for(headers, body))
        self.end_headers()

    def status_for(self, headers: dict[str, str], body: bytes) -> int:
        if not signed_by_evq(headers, body):
            return 401
        account, token = int(headers["evq-account"]), int(headers["evq-token"])
        with lock:
            if token < highest_token.get(account, 0):
                return 409  # a stale owner: a newer one holds this account
            highest_token[account] = token
            event = json.loads(body)  # account_id, event_id, seq, attempt, payload
            print(event["seq"], event["payload"])  # your work here, idempotent by event_id
        return 200


if __name__ == "__main__":
    ThreadingHTTPServer(("127.0.0.1", 9000), Hooks).serve_forever()
