"""``aenet_fn.mlip``: committee (ensemble) result types with the ænet tools' names."""

from aenet_fn.mlip.ensemble import (
    AenetEnsembleResult,
    normalize_ensemble_members,
    validate_aggregation_mode,
)

__all__ = ["AenetEnsembleResult", "normalize_ensemble_members", "validate_aggregation_mode"]
