"""The engine: typed configs (config.py), placement (placement.py) and batching arithmetic (batching.py), weight
sources (weights.py, streamed.py) opened over a pool (source.py), the KV cache and its attention paths (kv.py,
copy2d.py), generation (generate.py), continuous batching (scheduler.py), speculative decoding (speculative.py;
its draft's checks: drafts.py; the probe's pass costs it sizes its trees by: treecosts.py), tensor-parallel ranks
(tensor_parallel.py, ranks.py), the CPU's share of the cores (threads.py), tracing (trace.py) and GPU memory
reports (gpumem.py). config, placement, batching, drafts and source are torch-free at import."""
