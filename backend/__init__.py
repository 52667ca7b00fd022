"""difflens backend: models, hooks, capture, analysis and interventions."""

__version__ = "0.1.0"
