"""Policy evaluation: pragmatics (BIG-bench), side effects (hhh_alignment, generated replies) and
factuality (TruthfulQA MC1/MC2, BIG-bench truthful_qa, known_unknowns), with bootstrap CIs, and paired
comparison of trained policies against their base.

    from karma.eval import run_eval, compare
    run_eval("smollm2", "pragmatics,factuality", limit=50, out="runs/eval/base")
    compare("runs/eval/base", "runs/eval/ppo_full", out="runs/eval/compare")

Importing this package is light (numpy, no torch); models load inside `run_eval`.
"""

from karma.eval.comparison import compare
from karma.eval.prompts import is_heldout
from karma.eval.run import run_eval

__all__ = ["compare", "is_heldout", "run_eval"]
