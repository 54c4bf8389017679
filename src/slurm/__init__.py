"""Slurm: what a batch job runs (``batch_job``) and several runs as separate jobs (``launcher``).

The templates in scripts/slurm/ stay thin shells; everything they decide is here and tested
against a real one-node Slurm (tests/test_slurm.py). See docs/slurm.md.
"""
