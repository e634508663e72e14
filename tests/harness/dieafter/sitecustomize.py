"""Test-only, for a subprocess whose PYTHONPATH starts with this folder (stores.die_after_env):
the worker of rank $FTT_TEST_DIE_RANK SIGKILLs itself right after it has logged step
$FTT_TEST_DIE_AFTER_LOGGED_STEP (its figures made, the next step not begun), or as it starts
the evaluation inside the epoch after step $FTT_TEST_DIE_IN_EVAL_STEP, so that a peer's death
lands at an exact point of a fast run. Without the variables nothing is changed."""

import os
import signal

_STEP = int(os.environ.get("FTT_TEST_DIE_AFTER_LOGGED_STEP") or 0)
_RANK = os.environ.get("FTT_TEST_DIE_RANK") or ""
_EVAL_STEP = int(os.environ.get("FTT_TEST_DIE_IN_EVAL_STEP") or 0)

if _STEP and _RANK and os.environ.get("RANK") == _RANK:
    from ftrain.runtime.monitor import Monitor

    _logged = Monitor.logged

    def _logged_then_die(self, step, *args, **kwargs):
        _logged(self, step, *args, **kwargs)
        if step == _STEP:
            os.kill(os.getpid(), signal.SIGKILL)

    Monitor.logged = _logged_then_die

if _EVAL_STEP and _RANK and os.environ.get("RANK") == _RANK:
    from ftrain.core.loop import Trainer

    _evaluate_mid_epoch = Trainer._evaluate_mid_epoch

    def _die_in_evaluation(self, *args, **kwargs):
        if self.state.step == _EVAL_STEP:
            os.kill(os.getpid(), signal.SIGKILL)
        return _evaluate_mid_epoch(self, *args, **kwargs)

    Trainer._evaluate_mid_epoch = _die_in_evaluation
