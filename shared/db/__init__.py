"""Database models and session handling shared by the API and the worker."""
