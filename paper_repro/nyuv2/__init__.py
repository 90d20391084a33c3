"""NYUv2 with the published settings of the MTL weighting benchmark (see README.md)."""
