"""What a trained world model is used for: ``retracing`` / ``ensemble`` (per-step uncertainty), ``value`` /
``value_metrics`` (value estimation and its figures), ``stats`` (bootstrap intervals and verdicts of the headline
experiment), ``gif`` (rollout GIFs, ``whale eval gifs``). Submodules import torch / Meta-World lazily on use."""
