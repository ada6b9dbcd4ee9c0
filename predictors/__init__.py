"""SmartFRZ's attention-based freeze predictor (installed as ``freezebench.predictors``)."""
