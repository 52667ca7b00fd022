"""The stages of run-all, each resumable: capture (and the features pass), sae, analysis, interventions; pipeline
runs them in order."""
