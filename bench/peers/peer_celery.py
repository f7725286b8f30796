"""Celery with the Redis broker: `python peer_celery.py enqueue W.json`;
workers: `celery -A peer_celery worker`."""

from celery import Celery
from record import REDIS_URL, job, jobs

app = Celery("peer_celery", broker=REDIS_URL)
app.conf.task_ignore_result = True
app.conf.worker_hijack_root_logger = False
handle = app.task(name="peer_celery.handle")(job)

if __name__ == "__main__":
    with app.producer_pool.acquire(block=True) as producer:
        for account, seq in jobs():
            handle.apply_async((account, seq), producer=producer)
