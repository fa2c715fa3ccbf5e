"""The streaming runtime: image format, packing, weight sources, generation, and (later) the pool."""
