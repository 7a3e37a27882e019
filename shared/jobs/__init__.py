"""The job domain: states, request schemas and the repository every state change goes through."""
