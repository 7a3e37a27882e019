"""Pulling the model files a job needs from the shared model store (issue 19)."""
