"""The one config schema: unknown keys, types, overrides, the generated template, every shipped config."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from retok.core.config import apply_overrides, load_config, validate_dict
from retok.core.config_doc import commented_yaml, markdown_reference
from retok.core.errors import RetokError
from retok.core.stages import fingerprint, stage_dir

ROOT = Path(__file__).resolve().parents[1]


def base() -> dict:
    return {
        "output_dir": "runs/x",
        "model": {"path": "some/model"},
        "data": {"train": [{"name": "zh", "path": "a.txt"}], "eval": [{"name": "zh", "path": "b.txt"}]},
    }


def test_minimal_config_gets_defaults():
    cfg = validate_dict(base())
    assert cfg.tokenizer.mode == "extend"
    assert cfg.tokenizer.new_tokens == 16000
    # the measured recipe: input rows leaning on the last piece, head rows from the mean, the head fitted after
    # train-io on the trained input rows' states (not at init)
    assert (cfg.init.method, cfg.init.weighted_decay, cfg.init.head_method) == ("weighted", 0.3, None)
    assert cfg.fit.at_init is False and cfg.fit.after_train is True
    assert cfg.model.trust_remote_code is False
    assert cfg.model.allow_pickle is False
    assert stage_dir(cfg, "model-init") == Path("runs/x/model-init")


@pytest.mark.parametrize(
    ("overrides", "lr"),
    [
        ([], 2.5e-4),  # the shared map (the default): its rows' residuals learn slower
        (["fit.shared_map=false"], 1e-3),  # every row free
        (["fit.shared_map=false", "fit.lr=0.02"], 0.02),  # given: kept
        (["fit.lr=0.02"], 0.02),
    ],
)
def test_head_fit_lr_defaults_to_the_measured_best_with_and_without_the_shared_map(overrides, lr):
    cfg = validate_dict(apply_overrides(base(), overrides))
    assert cfg.fit.lr == lr and cfg.fit.map_lr == 5e-4
    assert cfg.fit.shared_map is ("fit.shared_map=false" not in overrides)


@pytest.mark.parametrize(
    ("patch", "needle"),
    [
        ({"tokenizer": {"new_tokns": 5}}, "tokenizer.new_tokns: unknown key"),
        ({"tokenizer": {"new_tokens": 0}}, "tokenizer.new_tokens:"),
        ({"tokenizer": {"new_tokens": "many"}}, "tokenizer.new_tokens:"),
        ({"tokenizer": {"mode": "merge"}}, "tokenizer.mode:"),
        ({"train": {"lr": -1}}, "train.lr:"),
        ({"init": {"method": "omp"}}, "init.method:"),
        ({"bogus": 1}, "bogus: unknown key"),
        ({"data": {"train": [{"name": "zh"}]}}, "data.train.0: Value error"),
        # rules that need only the config are checked before any stage runs
        ({"export": {"max_shard_size": "big"}}, "export.max_shard_size: 'big' is not a size"),
        ({"export": {"max_shard_size": "0MB"}}, "export.max_shard_size: must be positive"),
        ({"init": {"head_shift_outside": 2.0}}, "init.head_shift_outside needs tokenizer.domains"),
        ({"eval": {"domains": ["fr"]}}, "eval.domains names ['fr'], which no data.eval source has"),
        ({"eval": {"speed_domains": ["fr"]}}, "eval.speed_domains names ['fr']"),
        (
            {"compute": {"device": "tpu"}},
            "compute.device: unknown device 'tpu'; use auto, cpu, cuda, cuda:N or mps",
        ),
        ({"compute": {"device": "cuda:x"}}, "compute.device: unknown device 'cuda:x'"),
        ({"init": {"pad_to_multiple_of": 20_000_000}}, "init.pad_to_multiple_of:"),
        ({"seed": 2**64}, "seed:"),
        ({"seed": -1}, "seed:"),
        ({"tokenizer": {"new_tokens": 10**9}}, "tokenizer.new_tokens:"),
        # names that become files must stay inside export/; .inf is a typo, not a size
        (
            {"export": {"model_name": "../../escaped"}},
            "export.model_name: '../../escaped' is not a plain name",
        ),
        ({"export": {"model_name": "a/b"}}, "export.model_name: 'a/b' is not a plain name"),
        ({"export": {"model_name": "x" * 300}}, "export.model_name: 'xxxx"),
        (
            {"export": {"gguf_pre": "smolm"}},
            "export.gguf_pre: llama.cpp knows no pre-tokenizer 'smolm' (near: smollm",
        ),
        ({"compute": {"memory_gb": float("inf")}}, "compute.memory_gb: Input should be a finite number"),
        ({"train": {"lr": float("nan")}}, "train.lr: Input should be a finite number"),
        # keys that moved say where to
        ({"model": {"path": "m/x", "device": "cpu"}}, "model.device: this key is now compute.device"),
        ({"eval": {"threads": 2}}, "eval.threads: this key is now compute.threads"),
        ({"init": {"fit_head": True}}, "init.fit_head: this key is now fit.at_init"),
        ({"train": {"fit_head": False}}, "train.fit_head: this key is now fit.after_train"),
        ({"init": {"fit_teacher_weight": 1}}, "init.fit_teacher_weight: this key is now fit.teacher_weight"),
        (
            {"train": {"max_train_bytes": 5}},
            "train.max_train_bytes: this key is now train.max_bytes_per_source",
        ),
    ],
)
def test_bad_keys_name_the_key(patch, needle):
    data = base()
    for k, v in patch.items():
        if isinstance(v, dict) and isinstance(data.get(k), dict):
            data[k].update(v)
        else:
            data[k] = v
    with pytest.raises(RetokError) as e:
        validate_dict(data, "c.yaml")
    msg = str(e.value)
    assert "\n" not in msg
    assert needle.split(": Value error")[0] in msg, msg


def test_missing_required_key():
    data = base()
    del data["model"]
    with pytest.raises(RetokError, match=r"model: required key is missing"):
        validate_dict(data)


def test_source_needs_exactly_one_location():
    data = base()
    data["data"]["train"] = [{"name": "zh", "path": "a.txt", "hub": "x/y"}]
    with pytest.raises(RetokError, match=r"data\.train\.0: give exactly one of"):
        validate_dict(data)


def test_overrides_nested_lists_and_yaml_values():
    data = apply_overrides(
        base(),
        [
            "train.max_steps=7",
            "data.train.0.max_bytes=100",
            "init.compare_methods=[first, last]",
            "eval.domains=null",
        ],
    )
    cfg = validate_dict(data)
    assert cfg.train.max_steps == 7
    assert cfg.data.train[0].max_bytes == 100
    assert cfg.init.compare_methods == ["first", "last"]
    assert cfg.eval.domains is None


@pytest.mark.parametrize(
    ("item", "needle"),
    [
        ("train.max_steps", "expected KEY=VALUE"),
        ("data.train.5.path=x", "is not an item of a list of 1"),
        ("output_dir.x=1", "output_dir is a value, not a section"),
        ("train..lr=1", "dotted names"),
    ],
)
def test_bad_overrides(item, needle):
    with pytest.raises(RetokError, match=needle):
        apply_overrides(base(), [item])


def test_yaml_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("output_dir: x\nmodel: [unclosed\n")
    with pytest.raises(RetokError, match=r"invalid YAML at line"):
        load_config(bad)
    with pytest.raises(RetokError, match=r"not found; `retok init-config"):
        load_config(tmp_path / "missing.yaml")
    # yaml.safe_load only: python tags are refused, not executed
    evil = tmp_path / "evil.yaml"
    evil.write_text("output_dir: !!python/object/apply:os.system ['echo hi']\nmodel: {path: x}\n")
    with pytest.raises(RetokError, match="invalid YAML"):
        load_config(evil)


def test_env_expansion(monkeypatch, tmp_path):
    monkeypatch.setenv("RETOK_CACHE", str(tmp_path))
    cfg = validate_dict({**base(), "output_dir": "${RETOK_CACHE}/out"})
    assert cfg.out == tmp_path / "out"
    cfg = validate_dict({**base(), "output_dir": "${NOPE_NOT_SET:-fallback}/o"})
    assert cfg.out == Path("fallback/o")
    cfg = validate_dict({**base(), "output_dir": "${NOPE_NOT_SET}/o"})
    with pytest.raises(RetokError, match=r"NOPE_NOT_SET"):
        _ = cfg.out


def test_duplicate_yaml_keys_are_an_error(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("output_dir: a\nmodel:\n  path: m/x\noutput_dir: b\n")
    with pytest.raises(RetokError, match=r"key 'output_dir' appears twice \(lines 1 and 4\); keep one"):
        load_config(p)
    p.write_text("output_dir: a\nmodel:\n  path: m/x\n  path: m/y\n")
    with pytest.raises(RetokError, match=r"key 'path' appears twice \(lines 3 and 4\)"):
        load_config(p)
    p.write_text(
        "output_dir: a\nmodel:\n  path: m/x\ndata:\n  train:\n    - {name: a, path: x}\n    - {name: a, path: y}\n"
    )
    assert [s.path for s in load_config(p).data.train] == ["x", "y"]  # the same key in two list items is fine


def test_fingerprint_depends_only_on_upstream_sections():
    a = validate_dict(base())
    b = validate_dict(apply_overrides(base(), ["eval.repeats=9"]))
    c = validate_dict(apply_overrides(base(), ["tokenizer.new_tokens=10"]))
    assert fingerprint(a, "tokenizer") == fingerprint(b, "tokenizer")
    assert fingerprint(a, "model-trained") == fingerprint(b, "model-trained")
    assert fingerprint(a, "eval") != fingerprint(b, "eval")
    assert fingerprint(a, "tokenizer") != fingerprint(c, "tokenizer")
    assert fingerprint(a, "model-init") != fingerprint(c, "model-init")


def test_commented_template_has_every_key_and_validates():
    text = commented_yaml(model_path="org/m")
    data = yaml.safe_load(text)
    cfg = validate_dict(data)
    assert cfg.model.path == "org/m"
    dumped = cfg.model_dump()
    for section in ("tokenizer", "init", "train", "eval", "export", "model"):
        assert set(data[section]) == set(dumped[section]), section
    assert "# Longest new token" in text


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path, monkeypatch, tmp_path):
    monkeypatch.setenv("RETOK_CACHE", str(tmp_path))
    text = path.read_text()
    assert text.startswith("#"), "a shipped config opens with what it is for"
    assert "retok " in text.split("\n\n")[0], "and the command that runs it"
    cfg = load_config(path)
    assert cfg.output_dir


def test_shipped_configs_exist():
    assert len(list((ROOT / "configs").glob("*.yaml"))) >= 4


def test_readme_config_reference_is_current():
    readme = (ROOT / "README.md").read_text()
    assert markdown_reference() in readme, (
        "README's config reference is stale: run `python scripts/gen_readme_reference.py`"
    )


def test_defaults_resolved_from_another_key_follow_it_on_assignment():
    """The bug: assigning train.objective after loading kept the other objective's lr and trainable rows (and
    fit.shared_map its fit.lr). A key the user set stays set."""
    cfg = validate_dict(base())
    assert (cfg.train.lr, cfg.train.trainable, cfg.fit.lr) == (1e-2, "io_new_rows", 2.5e-4)
    cfg.train.objective = "lm"
    cfg.fit.shared_map = False
    assert (cfg.train.lr, cfg.train.trainable, cfg.fit.lr) == (5e-5, "io", 1e-3)
    cfg.train.objective = "distill"
    assert (cfg.train.lr, cfg.train.trainable) == (1e-2, "io_new_rows")
    mine = validate_dict({**base(), "train": {"lr": 0.5}})
    mine.train.objective = "lm"
    assert (mine.train.lr, mine.train.trainable) == (0.5, "io")
    mine.train.trainable = "io_new_rows"
    mine.train.objective = "distill"
    mine.train.objective = "lm"
    assert (mine.train.lr, mine.train.trainable) == (0.5, "io_new_rows")
