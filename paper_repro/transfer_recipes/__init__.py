"""Transfer recipes side by side on MNIST -> digits: both tasks, trainable parameters, checkpoint bytes (see README.md)."""
