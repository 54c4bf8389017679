"""Measuring the machine: what the rented GPU, its link, the disk and the bucket deliver."""
