"""Long-lived services on a pool: ``pool start/stop/list/cleanup`` (pools.py), the pool's server (server.py) and its
OpenAI-compatible HTTP front (http.py),
``pool status`` (monitor.py)."""
