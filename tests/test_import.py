"""`import fedjax_sim` loads jax, flax, optax and numpy, and none of the libraries that
only one feature needs: those are imported where the feature runs (TFDS by name,
checkpoints, TFF HDF5 files, ε accounting, the built-in scikit-learn data, pretrained
weights, encrypted sums). Checked on a fresh interpreter's sys.modules, which does not
depend on the machine's speed as a time limit would."""

import json
import os
import subprocess
import sys

import dp_accounting

import fedjax_sim
from fedjax_sim.privacy import accounting

# Each of these takes from a tenth of a second to seconds to import.
FEATURE_ONLY = ["tensorflow_datasets", "orbax", "h5py", "dp_accounting", "scipy", "sklearn",
                "tenseal", "safetensors", "PIL", "tqdm", "ml_collections", "matplotlib", "jax_privacy",
                "tensorflow"]

# The package's own import, then the command line's (which needs ml_collections for its
# configs, but nothing else from the list until a command runs).
SCRIPT = """
import json, sys
import fedjax_sim
loaded = [sys.modules.get(m) is not None for m in {names!r}]
import fedjax_sim.cli.main
print(json.dumps([loaded, [sys.modules.get(m) is not None for m in {names!r}],
                  fedjax_sim.__file__]))
"""


def _fresh_imports():
    root = os.path.dirname(os.path.dirname(os.path.abspath(fedjax_sim.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    # -P: not the working directory's copy, the one this test imported.
    out = subprocess.run([sys.executable, "-P", "-c", SCRIPT.format(names=FEATURE_ONLY)],
                         env=env, capture_output=True, text=True, timeout=120, check=True)
    package, cli, imported = json.loads(out.stdout.strip().splitlines()[-1])
    assert os.path.samefile(imported, fedjax_sim.__file__)
    return ({m for m, hit in zip(FEATURE_ONLY, package) if hit},
            {m for m, hit in zip(FEATURE_ONLY, cli) if hit})


def test_import_loads_no_feature_only_library():
    package, cli = _fresh_imports()
    assert package == set(), f"import fedjax_sim loaded {sorted(package)}"
    assert cli <= {"ml_collections"}, f"import fedjax_sim.cli.main loaded {sorted(cli)}"


def test_lazily_loaded_names_are_the_libraries_own():
    # Module attributes that used to be bound at import still resolve, to the same objects.
    assert accounting.NeighboringRelation is dp_accounting.NeighboringRelation
    assert fedjax_sim.privacy.Accountant is accounting.Accountant
    mech = accounting.SampledGaussian(1.0, "fixed", 100, sample_size=10)
    assert mech.neighboring_relation is dp_accounting.NeighboringRelation.REPLACE_ONE
    try:
        accounting.NoSuchName  # noqa: B018
    except AttributeError as e:
        assert "NoSuchName" in str(e)
    else:
        raise AssertionError("an unknown attribute must raise AttributeError")
