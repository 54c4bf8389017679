"""One command from the laptop: sync the code, install, train in tmux, retrieve, verify, stop.

``scripts/remote_train.py`` is the thin command line; the pieces:

Laptop side (reuses ``src.storage.output_sync``'s ControlMaster SSH session and rsync, the
manifest and its hash cache, the destroy gate, and ``src.cloud``'s providers):
  ``cli``        ``main``: arguments in, the pipeline run, errors as one line and an exit code
  ``args``       the arguments, the experiments they name, the command that attaches again
  ``pipeline``   the stages in order, each one line at its start and end, with its duration
  ``stages``     that reporting, the stage names and their exit codes
  ``status_table`` ``--status``'s table of the host's runs
  ``connection`` opening the SSH master, and one clear line per kind of SSH failure
  ``code_sync``  what rsync sends (and never sends: .git, venvs, outputs, .env...)
  ``host``       calling the agent on the host over the open connection
  ``provider_link`` the rented machine behind the SSH address, through its provider: price,
                 stop, destroy through the gate
  ``rent``       ``--rent QUERY``: offers, create, boot, check, train, failover, budget, Ctrl-C;
                 ``--rented``
  ``rent_state`` its state file: every machine created until destroyed, and bad hosts

Host side (run with the remote interpreter inside the synced repo, standard library only
except ``plan`` and ``monitor``):
  ``agent``   ``python -m src.remote.agent plan|start|run|follow|status|monitor``
  ``runs``    the run registry (``<repo>/.remote_runs/``) and what a state or exit code means
  ``runner``  the process inside tmux: runs the experiments in order, tees their output
  ``plan``    run name and run directory of an experiment command, without running it
  ``tmux``    the few tmux commands used
"""
