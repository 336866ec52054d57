"""Analysis tools: linear probes and projections of learned embeddings."""
