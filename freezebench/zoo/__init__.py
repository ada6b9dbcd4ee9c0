"""The built-in models and datasets (registered in :data:`freezebench.registry.MODELS` / ``DATASETS``)."""
