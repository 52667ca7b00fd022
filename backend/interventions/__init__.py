"""Interventions on a model: steering, SAE feature edits, the concept-steering report, block ablation, deep dream."""
