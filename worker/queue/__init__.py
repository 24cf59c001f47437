"""The job queue: the interface (`base`) and its Redis Streams implementation."""

from worker.queue.base import Delivery, JobState, Queue, QueueStats
from worker.queue.redis_streams import RedisStreamsQueue

__all__ = ["Delivery", "JobState", "Queue", "QueueStats", "RedisStreamsQueue"]
