"""The public path of committees trained together: init, step, epoch, fit, evaluate, predict; the
code lives in :mod:`aenet_fn.driver.committee`."""

from aenet_fn.driver.committee import (
    CommitteePrediction,
    check_shared_parts,
    committee_epoch,
    committee_evaluate,
    committee_fit,
    committee_predict,
    committee_step,
    init_committee,
    member_seeds,
    stack_members,
    unstack_members,
)

__all__ = [
    "CommitteePrediction",
    "check_shared_parts",
    "committee_epoch",
    "committee_evaluate",
    "committee_fit",
    "committee_predict",
    "committee_step",
    "init_committee",
    "member_seeds",
    "stack_members",
    "unstack_members",
]
