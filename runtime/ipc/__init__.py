"""What the pool's processes share, torch-free: the shared-memory layout and handles (shm.py), the plain configs
handed to its processes (options.py), the pool dir's records, locks and logs (records.py), process liveness and
start-up (procs.py), and the trace recorder every process writes its spans with (trace.py)."""
