"""The task library: one module per dataset family. Importing this package registers them."""

from tasks import celeba, cifar, digits, fashion_mnist, mnist, multi_mnist, nyuv2, office, tabular, text

__all__ = ["celeba", "cifar", "digits", "fashion_mnist", "mnist", "multi_mnist", "nyuv2", "office", "tabular", "text"]
