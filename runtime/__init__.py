"""The streaming runtime, in layers that import only downwards (docs/DESIGN.md, "The code"; the contract is in
setup.cfg and ``lint-imports`` checks it):

    cli        the command line: parser, the commands' configs, the commands (reads namespaces; nothing else does)
    services   daemon pools from the command line, the pool's server, pool status
    measure    links, the bench and its report, the probe
    engine     typed configs, placement, batching, the KV cache, weight sources, generation, tracing
    pool       the coordinator, a client's attachment, the daemon pool's process
    (workers)  the I/O worker processes (the top-level package workers/)
    ipc        shared memory, records and locks of the pool dir, process helpers, the trace recorder
    format     the image, block devices, packing, staged writes, the embedded model, image tokenizers
    env, progress  environment variables and progress lines
"""
