"""settings: the run's config overrides from the pipeline's typed parameters and ``overrides``."""
