"""What a trained world model is used for: ``retracing`` / ``ensemble`` (per-step uncertainty), ``value`` /
``value_metrics`` / ``value_cli`` (value estimation, ``whale eval value``), ``stats`` (bootstrap intervals and
verdicts of the headline experiment), ``gif`` / ``gif_cli`` (rollout GIFs, ``whale eval gifs``). Submodules import torch / Meta-World lazily on use; import them directly."""
