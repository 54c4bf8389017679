"""User-facing faces: ``CheckpointManager`` (src/utils/checkpoint_manager.py) and the GPU
monitor (src/utils/gpu_monitor.py), each built on the rooms below (checkpoints, storage,
telemetry, cloud)."""
