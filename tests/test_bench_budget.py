"""scripts/bench_budget.py: the power law through the budget points and the run's own figures at scale 1."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_budget.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_budget", _SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_power_law_is_recovered_and_gives_the_minutes_for_a_target():
    bb = _load()
    pts = [(m, 0.3 * m**-0.4) for m in (4.0, 9.0, 18.0)]
    a, b = bb.power_law(pts)
    assert a == pytest.approx(0.3) and b == pytest.approx(0.4)
    assert bb.power_law(pts[:1]) is None  # one point says nothing about a slope
    assert bb.power_law([(5.0, 0.1), (5.0, 0.2)]) is None  # nor do two at the same minutes


def test_scale_one_is_read_from_the_run_only_where_it_scored_the_same_bytes(tmp_path):
    bb = _load()
    run = tmp_path / "run"
    (run / "model-trained").mkdir(parents=True)
    (run / "eval").mkdir()
    cfg = "train:\n  max_steps: 180\nfit:\n  bytes: 240000\neval:\n  max_bytes: 8000\n"
    (run / "model-trained" / "retok_config.yaml").write_text(cfg)
    (run / "model-trained" / "retok_stage.json").write_text(json.dumps({"seconds": 540.0}))
    (run / "eval" / "report.json").write_text(
        json.dumps({"domains": {"zh": {"bpb_ratio": 1.108}, "en": {"bpb_ratio": 1.0004}}})
    )
    got = bb.from_run(run, 8000)
    assert got["steps"] == 180 and got["fit_bytes"] == 240000 and got["minutes"] == 9.0
    assert got["ratios"] == {"zh": 1.108, "en": 1.0004}
    assert bb.from_run(run, 4000) is None  # another slice: run it again instead
