"""The agent's side of a session: listening on conversation channels.

A conversation channel is a session that outlives every connection and every process.
The worker serves the channels in `LISTEN_CHANNELS` and every channel a job was enqueued
for, until it has been idle `SESSION_IDLE_SECONDS`; one process holds each session at a
time (`store`: a lease in Redis with a heartbeat, and the channel's checkpoint); on taking
one it runs the resume routine (`resume`) and then turns users' `prompt` and `cancel`
messages into jobs and cancellations (`session`, `manager`).
"""
