"""Sener & Koltun 2018, Table 3: Multi-LeNet on MultiMNIST and MultiFashion (see README.md)."""
