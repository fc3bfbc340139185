"""Typed config: YAML + dotted overrides, unknown keys and wrong types as one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llmtrain.config import JobConfig, load_config, write_resolved_config
from llmtrain.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def test_every_shipped_config_validates():
    configs = sorted((REPO / "configs").glob("*.yaml"))
    assert configs, "configs/ holds presets"
    for path in configs:
        assert isinstance(load_config(path), JobConfig)


def test_every_shipped_prepare_preset_validates():
    """configs/prepare/*.yaml: `llmtrain prepare --stages` files (quality / pii / minhash)."""
    import yaml

    from llmtrain.data.prepare import stage_settings

    presets = sorted((REPO / "configs" / "prepare").glob("*.yaml"))
    assert presets
    for path in presets:
        stages = yaml.safe_load(path.read_text())
        s = stage_settings("text", 16, 0.01, stages["quality"], stages["pii"], stages["minhash"])
        assert s.quality.enabled and s.pii.enabled and s.minhash.enabled


def test_overrides_are_typed_and_nested(tmp_path):
    cfg = load_config(
        REPO / "configs" / "tiny-pretrain.yaml",
        ["train.max_steps=7", "zero.stage=3", "run.dir=" + str(tmp_path / "r"), "cluster.address=ray://h:10001", "model.from=/x"],
    )
    assert cfg.train.max_steps == 7 and isinstance(cfg.train.max_steps, int)
    assert cfg.zero.stage == 3
    assert cfg.run.dir == tmp_path / "r"
    assert cfg.cluster.address == "ray://h:10001"
    assert cfg.model.from_ == "/x"


def test_contract_keys_exist():
    """Scripts outside the project rely on these names (issue 3, section 7)."""
    cfg = load_config(
        None, ["run.dir=d", "data.path=p", "train.max_steps=3", "cluster.num_workers=1", "zero.stage=1", "checkpoint.every=2"]
    )
    assert (cfg.run.dir, cfg.data.path, cfg.train.max_steps) == (Path("d"), Path("p"), 3)
    assert (cfg.cluster.num_workers, cfg.zero.stage, cfg.checkpoint.every) == (1, 1, 2)


def test_unknown_key_names_file_key_and_suggestion(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"train": {"max_stpes": 3}}))
    with pytest.raises(UserError) as err:
        load_config(path)
    msg = str(err.value)
    assert str(path) in msg and "train.max_stpes" in msg and "did you mean 'max_steps'" in msg
    assert "\n" not in msg


def test_unknown_override_section_and_key():
    with pytest.raises(UserError, match=r"trian: unknown key \(did you mean 'train'\?\)"):
        load_config(None, ["trian.max_steps=3"])
    with pytest.raises(UserError, match="zero.stag: unknown key"):
        load_config(None, ["zero.stag=2"])


def test_wrong_type_and_range():
    with pytest.raises(UserError, match=r"train.max_steps: .*integer.*\(got 'many'\)"):
        load_config(None, ["train.max_steps=many"])
    with pytest.raises(UserError, match=r"zero.stage: .*less than or equal to 3"):
        load_config(None, ["zero.stage=4"])
    with pytest.raises(UserError, match="offload_params needs stage 3"):
        load_config(None, ["zero.offload_params=true"])


def test_mixture_weight_must_be_positive():
    with pytest.raises(UserError, match=r"data.mixture.0.weight: mixture weight must be > 0"):
        load_config(None, ["data.mixture=[{path: a, weight: 0}]"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(UserError, match="invalid YAML"):
        load_config(bad)
    with pytest.raises(UserError, match="expected key.sub=value"):
        load_config(None, ["train.max_steps"])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(REPO / "configs" / "tiny-pretrain.yaml", ["train.lr=0.01", "model.from=/base"])
    written = write_resolved_config(cfg, tmp_path / "run")
    assert written == tmp_path / "run" / "config.yaml"
    again = load_config(written)
    assert again == cfg
    assert not list((tmp_path / "run").glob("*.tmp*"))


def test_cli_prints_one_line_and_exits_2(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  max_stpes: 3\n")
    proc = subprocess.run(
        [sys.executable, "-m", "llmtrain.cli", "pretrain", str(path)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("llmtrain: error: ") and "max_stpes" in proc.stderr


def test_help_lists_commands_and_each_has_help():
    from llmtrain.cli import _COMMANDS, build_parser

    text = build_parser().format_help()
    names = [name for name, *_ in _COMMANDS]
    for name in ("tokenizer", "prepare", "verify", "pretrain", "export"):
        assert name in names and name in text
    for name in names:
        with pytest.raises(SystemExit) as exit_info:
            build_parser().parse_args([name, "--help"])
        assert exit_info.value.code == 0


def test_text_overrides_are_taken_as_they_are():
    """A prompt with ': ', '{...}' or '#' is text, not YAML; \\n in a prompt is a newline."""
    cfg = load_config(
        None,
        [
            "data.template=Review: {text}\\nSentiment:",
            "data.system_prompt=Note: be nice # really",
            "model.from=[not, a, list]",
            "train.resume=auto",
            "data.chat_template=plain",
        ],
    )
    assert cfg.data.template == "Review: {text}\nSentiment:"
    assert cfg.data.system_prompt == "Note: be nice # really"
    assert cfg.model.from_ == "[not, a, list]"
    # quoted on purpose: YAML's rules; null or nothing clears an optional text field
    assert load_config(None, ["data.template='{text} It was'"]).data.template == "{text} It was"
    assert load_config(None, ['data.template="a\\tb"']).data.template == "a\tb"
    assert load_config(None, ["model.from=x", "model.from=null"]).model.from_ is None
    # structured fields still read YAML
    cfg = load_config(None, ["lora.target_modules=[q_proj, v_proj]", "data.label_words={pos: ' good'}", "cluster.use_gpu=false"])
    assert cfg.lora.target_modules == ["q_proj", "v_proj"] and cfg.data.label_words == {"pos": " good"}
    assert cfg.cluster.use_gpu is False


def test_errors_name_the_override_not_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  max_steps: 5\n")
    with pytest.raises(UserError) as err:
        load_config(path, ["train.lr=fast"])
    assert str(err.value).startswith("override train.lr=fast: train.lr:") and str(path) not in str(err.value)
    with pytest.raises(UserError, match=r"^override data.label_words=\{a:: not a valid value"):
        load_config(path, ["data.label_words={a:"])
    path.write_text("train:\n  lr: fast\n")
    with pytest.raises(UserError, match=f"^{path}: train.lr:"):
        load_config(path, ["train.max_steps=3"])


def test_empty_config_file_is_refused(tmp_path):
    for text in ("", "# nothing here\n"):
        (tmp_path / "c.yaml").write_text(text)
        with pytest.raises(UserError, match="the config file is empty"):
            load_config(tmp_path / "c.yaml")


def test_stop_at_step_must_be_within_max_steps():
    with pytest.raises(UserError, match="stop_at_step=30 is beyond max_steps=20"):
        load_config(None, ["train.max_steps=20", "train.stop_at_step=30"])
    assert load_config(None, ["train.max_steps=20", "train.stop_at_step=20"]).train.stop_at_step == 20
