"""Every architecture on MultiFashion: accuracy, Δm% against single-task and hard sharing, rank, size and time (see README.md)."""
