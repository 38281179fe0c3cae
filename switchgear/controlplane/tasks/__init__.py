"""Task scheduler and resource allocator: durable long-running jobs run by agents as workers.

Pure decision core: `model` (data), `allocator` (requirements, pools, utilisation), `queue`
(aging, ordering, which tasks to lease), `lifecycle` (state transitions, retry backoff,
dead-lettering, lease expiry). I/O edges: `store` (SQLite tables in the control plane's file),
`scheduler` (applies the decisions through the store, wakes waiters and watchers), `convert`
and `service` (the gRPC TasksService).
"""
