"""What a trained world model is used for, one job per group of modules.

- retracing uncertainty: ``retracing`` (retracing-actions, the per-step retracing-rollout uncertainty of
  an imagined rollout, and the scoring rule ``combine_predictions``) and ``ensemble`` (the deep-ensemble
  baseline, scored by the same rule);
- value evaluation: ``value`` (the dynamics stage as a simulator of token frames, real rollouts in
  Meta-World against open- and closed-loop imagination), ``value_metrics`` (value gap, Spearman /
  Pearson, regret@1, AUROC / Spearman of uncertainty against error) and ``value_cli`` (``whale eval value``);
- GIF rendering: ``gif`` (drawing real against imagined frames with the uncertainty curve) and
  ``gif_cli`` (``whale eval gifs``).

Submodules import torch / Meta-World lazily on use; import them directly.
"""
