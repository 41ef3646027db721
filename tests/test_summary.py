"""The run summary: every column from the right report, BPB columns on one slice of text."""

from __future__ import annotations

import json
from pathlib import Path

from retok.core.config import validate_dict
from retok.core.stages import ORDER, mark_stage, stage_dir
from retok.summary import collect, markdown_table


def _write(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _mark_all(cfg) -> None:
    """Mark every folder there as made by ``cfg``, in pipeline order (as a run would have)."""
    for key in ORDER:
        if stage_dir(cfg, key).is_dir():
            mark_stage(stage_dir(cfg, key), cfg, key)


def _config(out: Path, init_bytes: int = 8000):
    return validate_dict(
        {
            "output_dir": str(out),
            "model": {"path": str(out / "model")},
            "data": {"train": [{"name": "zh", "path": str(out / "t.jsonl")}]},
            "init": {"eval_max_bytes": init_bytes},
            "eval": {"max_bytes": 8000},
        }
    )


def test_bpb_columns_come_from_one_slice(tmp_path: Path):
    cfg = _config(tmp_path)
    _write(
        stage_dir(cfg, "tokenizer") / "compression.json",
        {"domains": {"zh": {"old_bytes_per_token": 2.0, "new_bytes_per_token": 4.0, "ratio": 2.0}}},
    )
    # init-embeddings and eval-speed score eval.max_bytes; train-io's figures come from a smaller slice
    _write(
        stage_dir(cfg, "model-init") / "init_report.json", {"bpb": {"zh": {"original": 1.80, "init": 2.40}}}
    )
    _write(
        stage_dir(cfg, "model-trained") / "train_report.json",
        {"bpb": {"zh": {"original": 1.70, "init": 2.50, "final": 2.35}}},
    )
    ev = {
        "candidate": {"folder": str(stage_dir(cfg, "model-trained"))},
        "domains": {
            "zh": {
                "old": {"bpb": 1.80, "bytes_per_s": 30.0},
                "new": {"bpb": 2.25, "bytes_per_s": 75.0},
                "speedup_bytes_per_s": 2.5,
            }
        },
    }
    _write(stage_dir(cfg, "eval") / "report.json", ev)
    _mark_all(cfg)
    row = collect(cfg)["domains"]["zh"]
    assert (row["bpb_original"], row["bpb_init"], row["bpb_trained"]) == (1.80, 2.40, 2.25)
    assert row["speedup_bytes_per_s"] == 2.5 and row["compression_ratio"] == 2.0
    assert "| zh | 2.00 | 4.00 | 2.00x | 1.800 | 2.400 | 2.250 | 30.0 | 75.0 | 2.50x |" in markdown_table(
        collect(cfg)
    )

    # eval-speed measured some other model: the trained BPB comes from train-io's report
    ev["candidate"]["folder"] = str(tmp_path / "peer-tool-output")
    _write(stage_dir(cfg, "eval") / "report.json", ev)
    assert collect(cfg)["domains"]["zh"]["bpb_trained"] == 2.35


def test_init_bpb_of_another_slice_is_left_out(tmp_path: Path):
    """init.eval_max_bytes != eval.max_bytes: the init report scored other text, so its figures do not sit
    beside eval-speed's (the original comes from eval-speed, the init column stays empty)."""
    cfg = _config(tmp_path, init_bytes=4000)
    _write(
        stage_dir(cfg, "model-init") / "init_report.json", {"bpb": {"zh": {"original": 1.90, "init": 2.60}}}
    )
    _write(
        stage_dir(cfg, "model-trained") / "train_report.json",
        {"bpb": {"zh": {"original": 1.70, "init": 2.50, "final": 2.35}}},
    )
    ev = {
        "candidate": {"folder": str(stage_dir(cfg, "model-trained"))},
        "domains": {"zh": {"old": {"bpb": 1.80}, "new": {"bpb": 2.25}}},
    }
    _write(stage_dir(cfg, "eval") / "report.json", ev)
    _mark_all(cfg)
    row = collect(cfg)["domains"]["zh"]
    assert (row["bpb_original"], row["bpb_init"], row["bpb_trained"]) == (1.80, None, 2.25)


def test_figures_of_a_stale_stage_are_left_out(tmp_path: Path):
    """eval-speed measured model-init, then train-io made model-trained: eval's figures are of another model,
    so the summary leaves them out (the bug: "BPB trained" printed beside model-init's figures) and names eval
    under stale with the reason; train-io's own figure fills the trained column."""
    cfg = _config(tmp_path)
    _write(stage_dir(cfg, "tokenizer") / "compression.json", {"domains": {"zh": {"ratio": 2.0}}})
    _write(stage_dir(cfg, "model-init") / "init_report.json", {"bpb": {"zh": {"original": 1.8, "init": 2.4}}})
    ev = {
        "candidate": {"folder": str(stage_dir(cfg, "model-init"))},
        "domains": {"zh": {"old": {"bpb": 1.8}, "new": {"bpb": 2.4}, "speedup_bytes_per_s": 2.0}},
    }
    _write(stage_dir(cfg, "eval") / "report.json", ev)
    _mark_all(cfg)
    assert collect(cfg)["domains"]["zh"]["speedup_bytes_per_s"] == 2.0 and collect(cfg)["stale"] == {}
    _write(stage_dir(cfg, "model-trained") / "train_report.json", {"bpb": {"zh": {"final": 2.1}}})
    mark_stage(stage_dir(cfg, "model-trained"), cfg, "model-trained")
    got = collect(cfg)
    assert got["stale"] == {"eval": "it read model-init/, and would now read model-trained/"}
    row = got["domains"]["zh"]
    assert row["speedup_bytes_per_s"] is None and row["bpb_trained"] == 2.1 and row["bpb_eval_new"] is None
