"""Sweeps: many runs of one program, one subprocess each (see docs/sweeps.md).

``hparam`` (grid/random search and the sweep file), ``runner`` (the subprocesses both sweeps
share), ``optuna_space`` / ``optuna_study`` / ``optuna_trial`` / ``optuna_report`` (an Optuna
study: space, sampler and pruner; the worker; inside a trial; the end report),
``residual_compare``.
"""
