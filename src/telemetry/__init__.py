"""Measuring the machine: what the rented GPU, its link, the disk and the bucket deliver.

``nvml``: NVML readings of the GPUs this process may use. ``gpus``: which GPUs there are,
whether they meet a job's requirement, and a status table. ``sampler``: the job's GPU read
once a second while training. ``cost``: the cost arithmetic. ``instance_check``: a rented
machine measured against what it promises.
"""
