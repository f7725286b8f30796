"""RQ: `python peer_rq.py enqueue W.json`; workers: `rq worker-pool -n N bench`."""

from record import REDIS_URL, jobs
from redis import Redis
from rq import Queue

if __name__ == "__main__":
    queue = Queue("bench", connection=Redis.from_url(REDIS_URL))
    batch = [Queue.prepare_data("record.job", args=job) for job in jobs()]
    for start in range(0, len(batch), 1000):
        queue.enqueue_many(batch[start : start + 1000])
