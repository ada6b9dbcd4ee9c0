"""freezebench: every layer-freezing policy on one trainer, measured the same way, tracked in MLflow."""

__version__ = "0.1.0"
