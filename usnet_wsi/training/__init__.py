"""Training: annotated images -> samples (data.py), the optimisation loop (loop.py)."""
