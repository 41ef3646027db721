"""The foundations every stage and feature stands on: the config schema, errors, the stage contract and its
freshness, sources of models and text, tokens as bytes, the token map, metrics, safetensors I/O, file writes.
Nothing here imports a feature (headfit, teacher, plan) or a stage package (tests/test_layout.py)."""
