"""Offline model-based control in imagination: CEM model-predictive control on a trained world model,
penalised by retracing or ensemble uncertainty, with baselines and a real-simulator evaluation."""
