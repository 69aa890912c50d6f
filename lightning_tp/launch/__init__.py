"""How ``TensorParallelStrategy`` starts its ranks: a script re-run (:mod:`.script`, the default) or
fork (:mod:`.fork`, notebooks). Both run the checks of :mod:`.preflight` in the launching process
first."""

from lightning_tp.launch.fork import ForkLauncher
from lightning_tp.launch.script import EXIT_WAIT_S, FAILURES_ENV, ScriptLauncher, record_failure

__all__ = ["EXIT_WAIT_S", "FAILURES_ENV", "ForkLauncher", "ScriptLauncher", "record_failure"]
