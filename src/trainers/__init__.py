"""The trainer and its small helpers.

``interruptible_trainer``: ``InterruptibleTrainer``, the loop (wiring, ``fit``, the epoch, the
step, ``evaluate``, ``test``). Beside it, each helper holds one piece the loop uses: ``steps``
(the step contract and its defaults), ``train_state`` (counters, ``Outcome``, ``FitResult``),
``snapshot`` (what a checkpoint holds), ``lr_schedule``, ``cost_meter``, ``early_stopping``,
``evaluation_hooks`` (after-evaluation hooks a search registers; one may stop the run, pruned),
``progress`` (bar, logs, printed lines), ``device`` (device and precision), ``batch_size``
(``data.batch_size=auto``), ``distributed`` (torchrun ranks), ``fsdp`` (FSDP2 sharding,
``trainer.strategy=fsdp``), ``final_upload`` (the last S3 uploads).
"""
