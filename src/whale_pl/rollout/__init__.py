"""Retracing-rollout uncertainty, the ensemble baseline, and policy value estimation in imagination.

- ``retracing``: retracing-actions (``ActionSpace.compose`` on normalised actions) and the per-step
  retracing uncertainty of an imagined rollout (K predictions of each frame from K anchors);
- ``ensemble``: the deep-ensemble disagreement on the same rollouts;
- ``uncertainty``: the one scoring rule both use (feature disagreement + predictive entropy);
- ``metrics``: value gap, Spearman / Pearson, regret@1, AUROC / Spearman of uncertainty vs error;
- ``value``: real rollouts in Meta-World vs open- and closed-loop imagination; ``value_cli``: ``whale eval value``.

Submodules import torch / Meta-World lazily on use; import them directly.
"""
