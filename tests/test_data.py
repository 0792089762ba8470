"""Training-data preparation: filters before the split, split sizes and seeds, errors."""

from __future__ import annotations

import pytest
import torch

from aenet_fn import Structure
from aenet_fn.core.splits import filter_structures, referenced_energies_per_atom, split_structures


def _structure(name, energy, n=2, force=0.1):
    return Structure(
        [[0.0, 0, 0], [1.5, 0, 0], [0, 1.5, 0]][:n],
        ["Ti", "O", "O"][:n],
        energy=energy,
        forces=torch.full((n, 3), force),
        name=name,
    )


E_ATOM = {"Ti": -10.0, "O": -5.0}


def test_referenced_energy_per_atom():
    value = referenced_energies_per_atom([_structure("a", -16.0)], E_ATOM)
    assert value.tolist() == [(-16.0 + 15.0) / 2]


def test_filters_remove_high_energies_and_large_forces():
    structures = [
        _structure("low", -16.0),
        _structure("high", -10.0),
        _structure("hot", -16.0, force=9.0),
    ]
    kept, removed = filter_structures(structures, E_ATOM, max_energy=0.0, max_forces=5.0)
    assert [s.name for s in kept] == ["low"]
    assert [s.name for s in removed] == ["high", "hot"]
    assert filter_structures(structures, E_ATOM)[0] == structures


def test_split_sizes_order_and_seed():
    structures = [_structure(str(i), -16.0 + 0.01 * i) for i in range(20)]
    train, test = split_structures(structures, 25, split_seed=3)
    assert len(test) == 5 and len(train) == 15
    assert [int(s.name) for s in train] == sorted(int(s.name) for s in train)
    again, _ = split_structures(structures, 25, split_seed=3)
    other, _ = split_structures(structures, 25, split_seed=4)
    assert [s.name for s in again] == [s.name for s in train]
    assert [s.name for s in other] != [s.name for s in train]


@pytest.mark.parametrize("percent", [-1, 100, 150])
def test_testpercent_outside_range_is_rejected(percent):
    with pytest.raises(ValueError, match=r"testpercent must lie in \[0, 100\)"):
        split_structures([_structure("a", -1.0)], percent, 0)


def test_empty_training_split_is_rejected():
    with pytest.raises(ValueError, match="training split is empty"):
        split_structures([], 10, 0)


def test_missing_energy_is_named_by_the_energy_filter():
    with pytest.raises(ValueError, match="'nolabel' has no energy"):
        filter_structures(
            [Structure([[0.0, 0, 0]], ["Ti"], name="nolabel")], E_ATOM, max_energy=1.0
        )
