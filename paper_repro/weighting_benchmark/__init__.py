"""Every weighting method on MultiFashion: accuracy, Δm%, mean rank and step time (see README.md)."""
