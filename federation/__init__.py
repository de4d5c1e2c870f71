"""Federation on Ray: a coordinator actor hands out slots and keeps the live concepts; clients train
their concept with Ray Train and upload only the artifact.

registry.py (plain state, no Ray) · auth.py (clients and tokens) · protocol.py (the messages, frozen
dataclasses) · errors.py (the refusals, importable without torch) · store.py (atomic persistence) ·
coordinator.py (the actor) · client.py (the client's steps) · train_func.py (the per-worker Ray Train
function) · procfs.py (process ancestry from /proc). Dev tools (a local cluster, job profiles): devtools/.
"""
