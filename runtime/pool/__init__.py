"""The pool: a coordinator that owns the ring and its I/O workers (coordinator.py), the detached daemon form of it
(daemon.py), a client's side of the protocol (client.py) and attaching to a daemon pool (attach.py). Torch-free."""
