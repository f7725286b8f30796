"""Dramatiq with the Redis broker: `python peer_dramatiq.py enqueue W.json`;
workers: `dramatiq peer_dramatiq`."""

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from record import REDIS_URL, job, jobs

dramatiq.set_broker(RedisBroker(url=REDIS_URL))
handle = dramatiq.actor(job, actor_name="handle", max_retries=0)

if __name__ == "__main__":
    for account, seq in jobs():
        handle.send(account, seq)
