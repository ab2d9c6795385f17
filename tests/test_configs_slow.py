"""Every shipped config, run in full, reaches the result its docstring states.

Marked slow (about 2 minutes on a 2-core CPU): run with `pytest -m slow`.
`python benchmarks/config_results.py --update` regenerates the documented numbers (the
configs' docstrings and the "Shipped configs" table of docs/configs-and-cli.md).

Tolerance: XLA:CPU's float results differ in the last bits between CPU models (vector
width, fused multiply-add), and 200 rounds of training turn that into a different
prediction on an occasional test example: one digits test example is 1/360 = 0.0028 of
accuracy. A documented number holds within one such example (plus rounding), 0.004.
"""

import os
import re

import pytest

from helpers import EXTERNAL_DATA_CONFIGS

from fedjax_sim.cli.config import load_config
from fedjax_sim.cli.experiment import run

TOLERANCE = 0.004
CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def _claims():
    for name in sorted(os.listdir(CONFIGS)):
        if name.endswith(".py") and name not in EXTERNAL_DATA_CONFIGS:
            text = open(os.path.join(CONFIGS, name)).read()
            m = re.search(r"Reaches (personal )?test (accuracy|MSE) ([0-9.]+)", text)
            assert m, f"{name} docstring states no result"
            yield name, ("personal " if m.group(1) else "") + m.group(2), float(m.group(3))


@pytest.mark.slow
@pytest.mark.parametrize("name,metric,value", list(_claims()))
def test_config_reaches_documented_result(name, metric, value):
    result = run(load_config(os.path.join(CONFIGS, name)), None, progress=False)
    final = result.summary["final"]
    if metric == "personal accuracy":  # mean over clients of their own models' accuracy
        assert final["client_personal_accuracy_mean"] == pytest.approx(value, abs=TOLERANCE)
    elif metric == "accuracy":
        assert final["test_accuracy"] == pytest.approx(value, abs=TOLERANCE)
    else:
        assert final["test_mse"] == pytest.approx(value, abs=TOLERANCE)
