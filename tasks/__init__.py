"""The task library: one module per dataset family. Importing this package registers them."""

from tasks import digits, mnist

__all__ = ["digits", "mnist"]
