"""How long an agent that lost its control plane may take to come back: both planes rely on it.

The agent's snapshot-stream and load-report clients retry with full-jitter exponential backoff
capped at RECONNECT_MAX_S (dataplane/client.py `Backoff`); a restarted control plane's container
manager keeps the replica endpoints it inherited for that long (plus two report intervals)
before it judges those nobody reports stale (controlplane/container_manager.py).
"""

from __future__ import annotations

#: Seconds: the longest wait between an agent's attempts to reach a control plane.
RECONNECT_MAX_S = 10.0
