"""What both planes share of the wire: the small shared package of issue 20's layering.

`checks`: what both planes check of a snapshot message. `stats`: one load-report row (the
agent's reporter writes it, the control plane's collector sums it); `loadreport` converts it;
`reconnect`: how long an agent may take to come back to a restarted control plane.

Why a package of its own. An agent decides, per service, whether it can apply a snapshot's
content with `checks`; the control plane runs the very same checks on the snapshot a change
would produce, before it commits the change, and refuses the change with INVALID_ARGUMENT
naming the field (instead of committing it and letting every agent NACK it). The control plane
may not import the data plane, nor the data plane the control plane; both import this package.

What it may import: the generated `switchgear.v1` messages, `switchgear.adapters.base` (for
`OptionsError`; no I/O), orjson and the standard library. Adapters' option parsers are passed
in as a protocol -> parser mapping, never imported here, so the package stays pure and small.
"""
