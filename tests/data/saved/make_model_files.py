"""Write the model-file and committee fixtures of tests/data/saved/ with the checked-out
version of aenet_fn, and the predictions they must keep giving (``predictions-<commit>.json``).

Run from the project root with that version first on ``PYTHONPATH``:
``python tests/data/saved/make_model_files.py tests/data/saved <commit>``.
"""

import json
import sys
from pathlib import Path

from aenet_fn.examples import TIO2_STRUCTURES
from aenet_fn.torch_featurize import ChebyshevDescriptor
from aenet_fn.torch_training import (
    Adam,
    TorchANNPotential,
    TorchCommitteeConfig,
    TorchCommitteePotential,
    TorchTrainingConfig,
)

folder, commit = Path(sys.argv[1]), sys.argv[2]
structures = sorted(TIO2_STRUCTURES.glob("*.xsf"))
descriptor = ChebyshevDescriptor(["Ti", "O"], 4, 4.0, 2, 3.0, min_cutoff=0.5)
arch = {"Ti": [(4, "tanh")], "O": [(4, "tanh")]}
config = TorchTrainingConfig(
    iterations=2,
    method=Adam(batchsize=3),
    force_weight=0.2,
    testpercent=0,
    seed=3,
    split_seed=1,
    atomic_energies={"Ti": -1604.604515075, "O": -432.503149303},
    checkpoint_dir=None,
    show_progress=False,
)
single = TorchANNPotential(arch, descriptor)
single.train(structures=[str(p) for p in structures[:6]], config=config)
single.save(folder / f"model-{commit}.pt")
committee = TorchCommitteePotential(arch, descriptor)
committee.train(
    structures=[str(p) for p in structures[:6]],
    config=config,
    committee_config=TorchCommitteeConfig(
        num_members=2, base_seed=5, output_dir=str(folder / f"committee-{commit}")
    ),
)
probe = [str(p) for p in structures[90:92]]
predicted = single.predict(probe, eval_forces=True)
together = committee.predict(probe, eval_forces=True)
expected = {
    "structures": [Path(p).name for p in probe],
    "model": {
        "energies": [float(e) for e in predicted.total_energy],
        "forces": [f.tolist() for f in predicted.forces],
    },
    "committee": {
        "energy_mean": together.energy_mean.tolist(),
        "energy_std": together.energy_std.tolist(),
    },
}
(folder / f"predictions-{commit}.json").write_text(json.dumps(expected, indent=1) + "\n")
