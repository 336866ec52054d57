"""Data: episodes and their shards, Meta-World behavior datasets, Open X-Embodiment conversion (``oxe``),
clip DataModules. Submodules are imported on demand; nothing heavy here."""
