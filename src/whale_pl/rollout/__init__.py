"""What a trained world model is used for: ``retracing`` (per-step uncertainty, retracing and the ensemble),
``value`` / ``value_metrics`` (value estimation, its figures, bootstrap intervals and verdicts), ``gif`` (rollout
GIFs, ``whale eval gifs``). Submodules import torch / Meta-World lazily on use."""
