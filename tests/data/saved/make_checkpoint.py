import sys

import aenet_fn as af
from aenet_fn.examples import TIO2_STRUCTURES

P = af.ChebyshevParams(
    species=["Ti", "O"], rad_order=4, rad_cutoff=4.0, ang_order=2, ang_cutoff=3.0, min_cutoff=0.5
)
A = {"Ti": [(4, "tanh")], "O": [(4, "tanh")]}
s = af.read_structures(sorted(TIO2_STRUCTURES.glob("*.xsf"))[:6])
train = af.featurize_structures(P, s, with_derivatives=True)
model = af.init_model(
    P, A, train, seed=1, atomic_energies={"Ti": -1604.604515075, "O": -432.503149303}
)
c = af.TrainConfig(
    epochs=2, batch_size=3, force_weight=0.2, sampling_policy="error_weighted", seed=3
)
st = af.fit(af.init_train_state(model, train, c), train, None, c)
af.save_checkpoint(sys.argv[1], st, c)
print(af.__file__)
