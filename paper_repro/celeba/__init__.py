"""CelebA as 40 binary tasks with the published settings of the FAMO benchmark (see README.md)."""
