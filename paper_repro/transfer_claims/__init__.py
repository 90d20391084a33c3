"""The four claims of the transfer-learning literature, measured (see README.md)."""
