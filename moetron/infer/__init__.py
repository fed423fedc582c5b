"""The serving engine: paged KV cache, continuous batching, batch-invariant sampling."""
