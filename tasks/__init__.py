"""The task library: one module per dataset family. Importing this package registers them."""

from tasks import digits, fashion_mnist, mnist, multi_mnist, tabular

__all__ = ["digits", "fashion_mnist", "mnist", "multi_mnist", "tabular"]
