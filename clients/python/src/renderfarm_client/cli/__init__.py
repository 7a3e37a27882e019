"""The `renderfarm` command line, built on the client (needs the ``cli`` extra: rich)."""
