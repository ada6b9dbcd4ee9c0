"""Optuna sweeps over freezebench runs (installed as ``freezebench.sweeps``)."""
