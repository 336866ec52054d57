"""What a trained world model is used for: ``retracing`` (per-step uncertainty), ``value`` / ``value_metrics``
(value estimation, its figures, intervals and verdicts), ``gif`` (rollout GIFs, ``whale eval gifs``)."""
