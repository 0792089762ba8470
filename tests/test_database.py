"""HDF5 structure databases: the driver (aenet_fn.io.database) and the facade
(HDF5StructureDataset): round trips, persisted features and local derivatives, parallel builds,
training through the dataset protocol, the build-time energy filter, the LRU cache, pickling and
bad input."""

from __future__ import annotations

import pickle
import warnings
from functools import partial

import ase
import ase.io
import attrs
import h5py
import numpy as np
import pytest
import torch
from ase.calculators.singlepoint import SinglePointCalculator
from torch.utils.data import DataLoader

import aenet_fn as af
from aenet_fn.core.featurized import featurize_structures, select_structures
from aenet_fn.core.local_derivatives import LocalDerivatives
from aenet_fn.core.splits import filter_structures
from aenet_fn.driver.cache import lru_evictions
from aenet_fn.examples import TIO2_STRUCTURES
from aenet_fn.io import database
from aenet_fn.io.database import DatabaseError, build_database, entry_identifier, open_database
from aenet_fn.io.database import build as database_build
from aenet_fn.io.database.write import BATCH_COLUMNS, Writer, batch_column
from aenet_fn.torch_featurize import ChebyshevDescriptor
from aenet_fn.torch_training import TorchANNPotential
from aenet_fn.torch_training.dataset import train_test_split_dataset
from aenet_fn.torch_training.hdf5_dataset import HDF5StructureDataset
from tests.conftest import assert_same_featurized, facade_config

REFERENCES = {"Ti": -1604.604515075, "O": -432.503149303}
ARCH = {"Ti": [(4, "tanh")], "O": [(4, "tanh")]}
PARAMS = af.ChebyshevParams(
    species=["Ti", "O"], rad_order=4, rad_cutoff=4.0, ang_order=2, ang_cutoff=3.0, min_cutoff=0.5
)


@pytest.fixture(scope="module")
def tio2_files():
    return [str(TIO2_STRUCTURES / f"structure-{i:03d}.xsf") for i in range(1, 13)]


@pytest.fixture(scope="module")
def structures(tio2_files):
    return af.read_structures(tio2_files)


@pytest.fixture(scope="module")
def reference(structures):
    """The featurized set (with derivatives) that the databases must reproduce."""
    return featurize_structures(PARAMS, structures, with_derivatives=True)


@pytest.fixture(scope="module")
def descriptor():
    return ChebyshevDescriptor.from_params(PARAMS)


@pytest.fixture(scope="module")
def persisted(tio2_files, tmp_path_factory):
    """A database of 12 TiO2 files with persisted features and derivatives."""
    path = tmp_path_factory.mktemp("db") / "tio2.h5"
    build_database(
        path,
        tio2_files,
        descriptor_params=PARAMS,
        persist_features=True,
        persist_force_derivatives=True,
        show_progress=False,
    )
    return path


# FeaturizedSets equal to 1e-14 (exactly, in practice; same dtypes, NaN where the other has NaN)
_same_sets = partial(assert_same_featurized, rtol=0, atol=1e-14)


def _same_structure(a: af.Structure, b: af.Structure) -> None:
    assert torch.equal(a.positions, b.positions)
    assert a.species == b.species and a.pbc == b.pbc and a.name == b.name
    assert a.energy == b.energy
    for x, y in ((a.forces, b.forces), (a.cell, b.cell)):
        assert (x is None) == (y is None)
        if x is not None:
            assert torch.equal(x, y)


# ---------------------------------------------------------------------------------------------
# Round trips


def test_tio2_round_trip_and_metadata(persisted, tio2_files, structures):
    expected = structures
    with open_database(persisted) as db:
        assert len(db) == 12 and db.n_atoms.sum() == sum(s.n_atoms for s in expected)
        for i, structure in enumerate(expected):
            _same_structure(db.structure(i), structure)
        for a, b in zip(db.structures(), expected):
            _same_structure(a, b)
        meta = db.metadata(3)
        assert meta == database.EntryMetadata(
            source_id=tio2_files[3],
            source_kind="file",
            display_name=tio2_files[3],
            frame=0,
            n_frames=1,
            name=tio2_files[3],
            has_forces=True,
            n_atoms=expected[3].n_atoms,
            energy=expected[3].energy,
        )
        assert db.identifier(-1) == tio2_files[-1]
        assert db.descriptor_params == PARAMS and db.has_features and db.has_local_derivatives
        assert db.max_energy is None and db.atomic_energies is None
        with pytest.raises(IndexError, match="out of range"):
            db.structure(12)
    with h5py.File(persisted) as raw:  # typed arrays only: nothing pickled, object or opaque
        kinds = []
        raw.visititems(lambda _, item: kinds.append(getattr(item, "dtype", None)))
        assert all(k is None or k.kind in "fiub" or h5py.check_string_dtype(k) for k in kinds)
        assert raw["structures/cell"].compression == "gzip"
        batch = [c for c in raw["local_derivatives"] if batch_column(f"local_derivatives/{c}")]
        assert len(batch) == len(attrs.fields(LocalDerivatives))  # not the offsets
        for column in (*BATCH_COLUMNS, *(f"local_derivatives/{c}" for c in batch)):
            assert raw[column].chunks is None and raw[column].compression is None
    plain = persisted.parent / "plain"  # the rename keeps the usual permissions (not mkstemp's)
    plain.touch()
    assert persisted.stat().st_mode == plain.stat().st_mode


def _frame(k: int) -> ase.Atoms:
    """Frame ``k`` of a small TiO2 trajectory with energy and forces; frame 1 is periodic in
    two directions only."""
    pbc = (True, True, k != 1)
    positions = [[0, 0, 0], [1.9, 0, 0], [0, 1.9, 0.2 * k]]
    atoms = ase.Atoms("TiO2", positions=positions, cell=[5, 5, 6 + k], pbc=pbc)
    forces = np.random.default_rng(k).normal(size=(3, 3))
    atoms.calc = SinglePointCalculator(atoms, energy=-100.0 - k, forces=forces)
    return atoms


def test_multiframe_extxyz_molecules_and_records(tmp_path):
    frames = [_frame(k) for k in range(3)]
    xyz = tmp_path / "frames.extxyz"
    ase.io.write(xyz, frames, format="extxyz")
    water = ase.Atoms("H2O", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])
    water.info["name"] = "water"
    record = af.Structure([[0, 0, 0], [1.2, 0, 0]], ["C", "O"], energy=-7.5)  # no name
    path = tmp_path / "mixed.h5"
    summary = build_database(path, [xyz, water, record], show_progress=False, compression="lzf")
    assert (summary.n_sources, summary.n_structures, summary.n_removed) == (3, 5, 0)
    expected = [*af.read_structures(xyz), af.io.ase_io.from_ase(water), record]
    with open_database(path) as db:
        for i, structure in enumerate(expected):
            _same_structure(db.structure(i), structure)
        assert db.structure(1).pbc == (True, True, False) and db.structure(3).cell is None
        assert [db.identifier(i) for i in range(5)] == [
            f"{xyz}#frame=0",
            f"{xyz}#frame=1",
            f"{xyz}#frame=2",
            "water",
            "structure_000004",
        ]
        assert [db.metadata(i).source_kind for i in range(5)] == ["file"] * 3 + [
            "atoms",
            "structure",
        ]
        assert [db.metadata(i).frame for i in range(5)] == [0, 1, 2, 0, 0]
        assert db.metadata(3).energy is None and not db.metadata(3).has_forces
        assert db.has_forces.tolist() == [True, True, True, False, False]
        assert db.descriptor_params is None and not db.has_features


def test_entry_identifier():
    assert entry_identifier(7, "a.xyz", "id", "n", 2, 3) == "a.xyz#frame=2"
    assert entry_identifier(7, "", "id", "n", 0, 1) == "id"
    assert entry_identifier(7, "", "", "n#frame=2", 2, 3) == "n#frame=2"
    assert entry_identifier(7, "", "", None, 0, 1) == "structure_000007"


# ---------------------------------------------------------------------------------------------
# Persisted features and local derivatives


def test_persisted_features_and_derivatives_rebuild_the_featurized_set(
    persisted, structures, reference
):
    with open_database(persisted) as db:
        _same_sets(db.featurized(PARAMS, with_derivatives=True, dtype=torch.float64), reference)
        _same_sets(  # stored in float64, cast on read
            db.featurized(PARAMS, with_derivatives=True, dtype=torch.float32),
            _cast(reference, torch.float32),
        )
        _same_sets(
            db.featurized(PARAMS, with_derivatives=False, dtype=torch.float64),
            featurize_structures(PARAMS, structures, with_derivatives=False),
        )
        on_meta = db.featurized(PARAMS, with_derivatives=True, dtype=torch.float64, device="meta")
        assert on_meta.device.type == "meta" and on_meta.local.radial.device.type == "meta"
        assert torch.equal(on_meta.layout.n_atoms, reference.layout.n_atoms)  # on the host
        reference = featurize_structures(PARAMS, structures[5:6], with_derivatives=True)
        assert torch.equal(db.features(5, PARAMS), reference.features)
        local = db.local_derivatives(5, PARAMS)
        for g in attrs.fields(LocalDerivatives):
            assert torch.equal(getattr(local, g.name), getattr(reference.local, g.name))


def _cast(data, dtype):
    cast = {
        f.name: getattr(data, f.name).to(dtype)
        for f in attrs.fields(type(data))
        if isinstance(getattr(data, f.name), torch.Tensor)
        and getattr(data, f.name).is_floating_point()
    }
    local = data.local
    if local is not None:
        local = attrs.evolve(
            local,
            **{
                g.name: getattr(local, g.name).to(dtype)
                for g in attrs.fields(LocalDerivatives)
                if getattr(local, g.name).is_floating_point()
            },
        )
    return attrs.evolve(data, local=local, **cast)


def test_derivatives_only_for_labelled_structures_and_without_persisted_features(
    structures, reference, tmp_path
):
    unlabelled = attrs.evolve(structures[2], forces=None)
    path = tmp_path / "mixed.h5"
    build_database(
        path,
        [*structures[:2], unlabelled, *structures[3:5]],
        descriptor_params=PARAMS,
        persist_force_derivatives=True,
        show_progress=False,
    )
    with open_database(path) as db:
        assert not db.has_features and db.has_local_derivatives
        rebuilt = db.featurized(PARAMS, with_derivatives=True, dtype=torch.float64)
        assert db.local_derivatives(2, PARAMS) is None
    # the structure without forces has no derivative entries; all else is as featurized
    assert rebuilt.radial_count[2] == 0 and rebuilt.triplet_count[2] == 0
    assert torch.isnan(rebuilt.forces[rebuilt.atom_start[2]]).all()
    labelled = [0, 1, 3, 4]
    _same_sets(select_structures(rebuilt, labelled), select_structures(reference, labelled))
    first_five = select_structures(reference, range(5))
    assert rebuilt.names == first_five.names
    for field in ("features", "energies", "species_index", "species_counts"):
        assert torch.equal(getattr(rebuilt, field), getattr(first_five, field)), field


def test_parallel_build_writes_the_same_arrays(
    persisted, tio2_files, structures, tmp_path, monkeypatch
):
    monkeypatch.setattr(database_build, "_SOURCES_PER_TASK", 5)  # three tasks, the last one short
    parallel = tmp_path / "parallel.h5"
    build_database(
        parallel,
        tio2_files,
        descriptor_params=PARAMS,
        persist_features=True,
        persist_force_derivatives=True,
        build_workers=2,
        show_progress=False,
    )
    _same_files(persisted, parallel)
    records = {workers: tmp_path / f"records-{workers}.h5" for workers in (0, 2)}
    for workers, path in records.items():
        build_database(path, structures, build_workers=workers, show_progress=False)
    _same_files(records[0], records[2])


def _same_files(first, second) -> None:
    """The two files hold the same groups, attributes and arrays (dtype, shape, bytes)."""
    with h5py.File(first) as a, h5py.File(second) as b:
        names_a, names_b = [], []
        a.visit(names_a.append)
        b.visit(names_b.append)
        assert names_a == names_b and _attributes(a) == _attributes(b)
        for name in names_a:
            assert _attributes(a[name]) == _attributes(b[name])
            if isinstance(a[name], h5py.Dataset):
                x, y = a[name][()], b[name][()]
                assert x.dtype == y.dtype and x.shape == y.shape
                same = x.tolist() == y.tolist() if x.dtype == object else x.tobytes() == y.tobytes()
                assert same, name


def _attributes(item) -> dict[str, bytes]:
    return {k: np.asarray(v).tobytes() for k, v in item.attrs.items()}


# ---------------------------------------------------------------------------------------------
# The facade


@pytest.mark.parametrize(
    ("persist", "force_weight"), [(True, 0.1), (False, 0.0)], ids=["persisted", "computed"]
)
def test_training_from_hdf5_equals_training_from_structures(
    persist, force_weight, persisted, tio2_files, structures, descriptor, tmp_path
):
    if persist:  # features and derivatives read from the file, the descriptor too
        dataset = HDF5StructureDataset(None, persisted, mode="load", atomic_energies=REFERENCES)
        assert dataset.descriptor.params == PARAMS
    else:
        dataset = HDF5StructureDataset(
            descriptor, tmp_path / "plain.h5", tio2_files, mode="build", atomic_energies=REFERENCES
        )
        assert len(dataset) == 0
        dataset.build_database(show_progress=False)
        assert not dataset.has_persisted_features()
    direct = TorchANNPotential(ARCH, descriptor)
    config = facade_config(atomic_energies=REFERENCES, force_weight=force_weight)
    direct.train(structures=structures, config=config)
    from_dataset = TorchANNPotential(ARCH, descriptor)
    from_dataset.train(dataset=dataset, config=facade_config(force_weight=force_weight))
    assert torch.equal(from_dataset.model.network.values, direct.model.network.values)
    assert from_dataset.history[-1]["RMSE_train"] == direct.history[-1]["RMSE_train"]
    by_dataset = from_dataset.predict_dataset(dataset)
    by_structures = from_dataset.predict(structures)
    np.testing.assert_allclose(by_dataset.total_energy, by_structures.total_energy, rtol=1e-13)
    assert by_dataset.structure_paths == by_structures.structure_paths
    _, test = train_test_split_dataset(dataset, 0.5, seed=3)  # torch-style shuffled subsets
    subset = from_dataset.predict_dataset(test)
    np.testing.assert_allclose(
        subset.total_energy, [by_structures.total_energy[i] for i in test.indices], rtol=1e-13
    )
    dataset.close()


def test_dataset_protocol_and_samples(persisted, tio2_files, structures, descriptor):
    with HDF5StructureDataset(descriptor, persisted, mode="auto") as dataset:
        assert len(dataset) == 12 and dataset.get_force_indices() == list(range(12))
        sample = dataset[4]
        assert sample["name"] == tio2_files[4] and sample["n_atoms"] == structures[4].n_atoms
        assert torch.equal(sample["features"], descriptor.featurize(structures[4]))
        assert dataset.get_entry_metadata(4)["frame_idx"] == 0
        assert dataset.get_structure_identifier(4) == tio2_files[4]
        assert dataset.has_persisted_descriptor() and dataset.has_persisted_force_derivatives()
        local = dataset.load_persisted_force_derivatives(4)
        assert local.radial.dtype == torch.float64
        assert local.radial_centre.max() < structures[4].n_atoms
        assert dataset.featurized(True) is dataset.featurized(True, torch.float64)
        energy_only = dataset.featurized(False)
        assert energy_only.local is None


def test_energy_filter_at_build_time(tio2_files, structures, descriptor, tmp_path):
    per_atom = sorted(
        (s.energy - sum(REFERENCES[x] for x in s.species)) / s.n_atoms for s in structures
    )
    max_energy = per_atom[8]  # keeps 9 of 12
    kept, removed = filter_structures(structures, REFERENCES, max_energy)
    assert len(removed) == 3
    path = tmp_path / "filtered.h5"
    dataset = HDF5StructureDataset(
        descriptor, path, tio2_files, max_energy=max_energy, atomic_energies=REFERENCES
    )
    with pytest.warns(UserWarning, match="3 of 12 structures removed"):
        dataset.build_database(show_progress=False)
    assert [dataset.get_structure(i).name for i in range(len(dataset))] == [s.name for s in kept]
    reloaded = HDF5StructureDataset(descriptor, path, mode="load")
    assert reloaded.max_energy == max_energy and reloaded.atomic_energies == REFERENCES
    with pytest.raises(ValueError, match="built with atomic_energies"):
        HDF5StructureDataset(descriptor, path, mode="load", atomic_energies={"Ti": 0.0, "O": 0.0})


def test_lru_eviction_and_bounded_cache(persisted, descriptor):
    assert lru_evictions(["a", "b", "c", "d"], 2) == ["a", "b"]
    assert lru_evictions(["a"], 2) == [] and lru_evictions(["a", "b"], 0) == ["a", "b"]
    dataset = HDF5StructureDataset(descriptor, persisted, mode="load", in_memory_cache_size=3)
    first = dataset.get_structure(0)
    for i in (1, 2, 0, 3, 4):
        dataset.get_structure(i)
    assert list(dataset._cache) == [0, 3, 4]  # 0 was used again, 1 and 2 went
    assert dataset.get_structure(0) is first
    uncached = HDF5StructureDataset(descriptor, persisted, mode="load", in_memory_cache_size=0)
    uncached.get_structure(0)
    assert not uncached._cache
    with pytest.raises(ValueError, match="in_memory_cache_size"):
        HDF5StructureDataset(descriptor, persisted, in_memory_cache_size=-1)


def test_pickled_dataset_reopens_its_own_handle(persisted, descriptor):
    dataset = HDF5StructureDataset(descriptor, persisted, mode="load")
    expected = dataset.get_structure(2)
    copy = pickle.loads(pickle.dumps(dataset))
    assert copy._handle is None and not copy._cache
    _same_structure(copy.get_structure(2), expected)
    assert copy._handle is not dataset._handle and len(copy) == 12
    dataset.close()
    assert dataset._handle is None
    _same_structure(dataset.get_structure(2), expected)  # reopened on use
    # DataLoader workers (forked: they inherit the open handle and must open their own)
    loader = DataLoader(dataset, batch_size=4, num_workers=1, collate_fn=_names)
    assert [name for batch in loader for name in batch] == [
        dataset.get_structure_identifier(i) for i in range(12)
    ]
    dataset.close()
    copy.close()


def _names(samples: list[dict]) -> list[str]:
    return [sample["name"] for sample in samples]


# ---------------------------------------------------------------------------------------------
# Bad input and faults


def test_missing_foreign_truncated_and_non_hdf5_files(persisted, descriptor, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"absent.h5"):
        HDF5StructureDataset(descriptor, tmp_path / "absent.h5", mode="load")
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(persisted.read_bytes()[: persisted.stat().st_size // 2])
    with pytest.raises(DatabaseError, match=r"truncated.h5: not a readable HDF5 file"):
        open_database(truncated)
    text = tmp_path / "text.h5"
    text.write_text("not an HDF5 file\n")
    with pytest.raises(DatabaseError, match=r"text.h5: not a readable HDF5 file"):
        HDF5StructureDataset(descriptor, text, mode="load")
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["data"] = np.arange(3)
    with pytest.raises(DatabaseError, match=r"foreign.h5: not an aenet_fn structure database"):
        open_database(foreign)
    reference = tmp_path / "reference.h5"
    with h5py.File(reference, "w") as f:
        f.create_group("entries")["structures"] = np.zeros(2, dtype=np.uint8)
    with pytest.raises(DatabaseError, match=r"reference ænet tools .* never unpickles"):
        open_database(reference)
    damaged = tmp_path / "damaged.h5"
    damaged.write_bytes(persisted.read_bytes())
    with h5py.File(damaged, "a") as f:
        del f["structures/forces"]
    with pytest.raises(DatabaseError, match=r"missing \['structures/forces'\]"):
        open_database(damaged)
    with h5py.File(damaged, "a") as f:
        f.attrs["schema_version"] = 99
    with pytest.raises(DatabaseError, match="schema version 99"):
        open_database(damaged)


def test_another_descriptor_is_refused(persisted):
    other = af.ChebyshevParams(
        species=["Ti", "O"], rad_order=5, rad_cutoff=4.0, ang_order=2, ang_cutoff=3.0
    )
    with pytest.raises(ValueError, match="was built with descriptor"):
        HDF5StructureDataset(ChebyshevDescriptor.from_params(other), persisted, mode="load")
    with open_database(persisted) as db, pytest.raises(DatabaseError, match="another descriptor"):
        db.features(0, other)
    swapped = attrs.evolve(PARAMS, species=("O", "Ti"))
    assert database.descriptor_fingerprint(swapped) != database.descriptor_fingerprint(PARAMS)
    same = ChebyshevDescriptor.from_params(PARAMS, dtype=torch.float32).params
    assert database.descriptor_fingerprint(same) == database.descriptor_fingerprint(PARAMS)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_failing_build_leaves_the_old_database(workers, tio2_files, tmp_path):
    corrupt = tmp_path / "corrupt.xsf"
    corrupt.write_text("CRYSTAL\nPRIMVEC\n1 0 0\n")
    path = tmp_path / "db.h5"
    build_database(path, tio2_files[:2], show_progress=False)
    before = path.read_bytes()
    sources = [*tio2_files, corrupt, *tio2_files]  # the corrupt file sits in the second task
    with pytest.raises(RuntimeError, match=r"failed to load build source .*corrupt.xsf"):
        build_database(path, sources, build_workers=workers, show_progress=False)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt.xsf", "db.h5"]
    fresh = tmp_path / "fresh.h5"
    with pytest.raises(RuntimeError, match=r"corrupt.xsf"):
        build_database(fresh, [corrupt], build_workers=workers, show_progress=False)
    assert not fresh.exists()


def test_an_interrupted_build_leaves_no_file(tio2_files, tmp_path, monkeypatch):
    def interrupt(self, chunk):
        raise KeyboardInterrupt

    monkeypatch.setattr(Writer, "append", interrupt)
    with pytest.raises(KeyboardInterrupt):
        build_database(tmp_path / "db.h5", tio2_files[:2], show_progress=False)
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments(tio2_files, descriptor, tmp_path):
    with pytest.raises(ValueError, match="mode must be one of"):
        HDF5StructureDataset(descriptor, tmp_path / "x.h5", mode="append")
    with pytest.raises(ValueError, match="no sources given"):
        HDF5StructureDataset(descriptor, tmp_path / "x.h5", [], mode="build").build_database()
    with pytest.raises(ValueError, match="created without sources"):
        HDF5StructureDataset(descriptor, tmp_path / "x.h5", mode="build").build_database()
    with pytest.raises(FileNotFoundError, match=r"nothere.xsf"):
        build_database(tmp_path / "x.h5", [tmp_path / "nothere.xsf"], show_progress=False)
    with pytest.raises(TypeError, match="cannot use a int as a source"):
        build_database(tmp_path / "x.h5", [3], show_progress=False)
    with pytest.raises(ValueError, match="build_workers"):
        build_database(tmp_path / "x.h5", tio2_files, build_workers=-1)
    with pytest.raises(ValueError, match="compression"):
        HDF5StructureDataset(descriptor, tmp_path / "x.h5", compression="bz2")
    with pytest.raises(ValueError, match="needs a descriptor"):
        build_database(tmp_path / "x.h5", tio2_files, persist_features=True)
    copper = af.Structure([[0, 0, 0], [2.5, 0, 0]], ["Cu", "Cu"], name="copper")
    with pytest.raises(ValueError, match=r"'copper'.*\['Cu'\] are not in the descriptor"):
        build_database(tmp_path / "x.h5", [copper], descriptor_params=PARAMS, show_progress=False)
    with pytest.raises(RuntimeError, match="requires a descriptor"):
        HDF5StructureDataset(None, tmp_path / "x.h5", tio2_files).build_database(
            persist_features=True
        )
    assert not (tmp_path / "x.h5").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        HDF5StructureDataset(descriptor, tmp_path / "zlib.h5", tio2_files[:1], compression="zlib")


def test_training_from_hdf5_in_workers_equals_training_in_memory(persisted, descriptor):
    """With ``num_workers > 0`` and ``cache_features=False`` the split stays on disk: worker
    processes read and featurize each drawn batch (memory bounded by the batches)."""
    runs = []
    for workers in (0, 2):
        dataset = HDF5StructureDataset(None, persisted, mode="load", atomic_energies=REFERENCES)
        potential = TorchANNPotential(ARCH, descriptor)
        potential.train(
            dataset=dataset, config=facade_config(force_weight=0.1, num_workers=workers)
        )
        runs.append(potential)
        dataset.close()
    # the lazy split fits its feature statistics from streamed moments: equal to round-off
    torch.testing.assert_close(
        runs[1].model.network.values, runs[0].model.network.values, rtol=0, atol=1e-10
    )
    assert runs[1].history[-1]["RMSE_test"] == pytest.approx(runs[0].history[-1]["RMSE_test"])


def test_a_database_is_never_written_over_one_of_its_sources(tio2_files, tmp_path):
    """Through the function and the dataset, named directly or through its folder (and a
    hard link to it): the source is refused as the output and left unchanged."""
    import os
    import shutil

    for name in tio2_files[:3]:
        shutil.copy(name, tmp_path)
    source = tmp_path / "structure-001.xsf"
    before = source.read_bytes()
    os.link(source, tmp_path / "linked.h5")
    for sources, output in (
        ([source], source),
        ([tmp_path], source),
        ([source], tmp_path / "linked.h5"),
    ):
        with pytest.raises(ValueError, match="is one of its sources"):
            build_database(output, sources, show_progress=False)
    dataset = HDF5StructureDataset(None, source, sources=[tmp_path], mode="build")
    with pytest.raises(ValueError, match="is one of its sources"):
        dataset.build_database(show_progress=False)
    assert source.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "linked.h5",
        "structure-001.xsf",
        "structure-002.xsf",
        "structure-003.xsf",
    ]


@pytest.mark.parametrize(
    ("dataset", "row", "value", "message"),
    [
        ("local_derivatives/radial_neighbour", 3, 10**6, "radial_neighbour row 3 indexes atom"),
        ("local_derivatives/triplet_second", 7, -1, "triplet_second row 7 indexes atom -1"),
        ("local_derivatives/angular_first", 5, np.nan, "angular_first: non-finite value in row 5"),
        ("features/values", 2, np.inf, "features: non-finite value in row 2"),
        ("structures/energy", 4, -np.inf, "structures/energy: infinite value in row 4"),
        ("structures/forces", 9, np.inf, "structures/forces: infinite value in row 9"),
    ],
)
def test_persisted_indices_and_values_are_checked_when_read(
    persisted, tmp_path, dataset, row, value, message
):
    """Every persisted atom index points into its own structure and every persisted value is
    finite: a damaged file is refused naming the dataset and row, never left to an IndexError
    or a NaN mid-training."""
    import shutil

    damaged = tmp_path / "damaged.h5"
    shutil.copy(persisted, damaged)
    with h5py.File(damaged, "r+") as file:
        file[dataset][row] = value
    with open_database(damaged) as db:
        with pytest.raises(DatabaseError, match=message.replace("[", r"\[")):
            db.featurized(PARAMS, with_derivatives=True, dtype=torch.float64)
        if dataset.startswith("structures"):
            return  # labels: read with the whole set
        first = "features" if dataset.startswith("features") else "local_derivatives"
        read = db.features if first == "features" else db.local_derivatives
        with pytest.raises(DatabaseError):
            for index in range(len(db)):
                read(index, PARAMS)
