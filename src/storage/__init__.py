"""Moving files off the rented machine: rsync/SSH output sync, its manifest, and S3.

``s3``: the one S3 layer (boto3 transfer manager, sha256 in object metadata), used by the
output sync's upload and by the checkpoint mirror. ``checkpoint_mirror``: background S3
mirror of a run's checkpoints and files. ``output_sync`` / ``manifest``: what
``scripts/sync_outputs.sh`` and ``launch_vast.py destroy`` run on.
"""
