"""Moving files off the rented machine: rsync/SSH output sync, its manifest, S3, and the
destroy gate.

``s3``: the one S3 layer (boto3 transfer manager, sha256 in object metadata), used by the
output sync's upload and by the checkpoint mirror. ``checkpoint_mirror``: background S3
mirror of a run's checkpoints and files. ``output_sync`` / ``manifest``: what
``scripts/sync_outputs.sh`` and ``launch_vast.py destroy`` run on. ``destroy_gate``: whether
a machine, given by its SSH addresses, may be destroyed (its outputs proven home).
"""
