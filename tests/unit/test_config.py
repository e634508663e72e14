"""Config layering (CLI > YAML > env > defaults) and validation, in-process (through the
command line: tests/integration/test_config.py)."""

from __future__ import annotations

import pytest

from ftrain.config import Config, ConfigError, build_parser, load_config
from ftrain.tasks import task_ref


def test_defaults():
    cfg = load_config([], environ={})
    assert cfg == Config()
    assert cfg.checkpoint_dir == "./checkpoints" and cfg.task_options == {}
    # The default task's own options, at their defaults, are its arguments.
    assert task_ref(cfg).args == {"dataset": "synthetic", "model": "cnn",
                                  "synthetic_train_size": 12288, "synthetic_test_size": 2048}


def test_precedence_cli_over_yaml_over_env(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("epochs: 7\nlr: 0.2\nbatch-size: 128\n")
    env = {"FTT_EPOCHS": "9", "FTT_LR": "0.3", "FTT_SEED": "5", "FTT_DETERMINISTIC": "true"}
    cfg = load_config(["--config", str(y), "--epochs", "3"], environ=env)
    assert cfg.epochs == 3  # CLI beats YAML and env
    assert cfg.lr == 0.2  # YAML beats env
    assert cfg.batch_size == 128  # dashes allowed in YAML keys
    assert cfg.seed == 5 and cfg.deterministic is True  # env beats defaults


def test_config_file_from_env(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("epochs: 6\n")
    assert load_config([], environ={"FTT_CONFIG": str(y)}).epochs == 6


def test_all_problems_reported_together(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("bogus: 1\nepochs: many\n")
    with pytest.raises(ConfigError) as e:
        load_config(["--config", str(y), "--batch-size", "0", "--lr", "-1", "--keep-last", "1",
                     "--storage-options", "{nope"], environ={"FTT_SEED": "x"})
    text = "\n".join(e.value.problems)
    for needle in ("unknown option 'bogus'", "--epochs", "--batch-size", "--lr", "--keep-last",
                   "--storage-options", "$FTT_SEED"):
        assert needle in text, needle


def test_bad_choice_names_flag():
    with pytest.raises(SystemExit):
        load_config(["--optimizer", "rmsprop"], environ={})
    with pytest.raises(ConfigError, match="--dataset"):
        load_config([], environ={"FTT_DATASET": "imagenet"})


def test_resnet_needs_cifar():
    with pytest.raises(ConfigError, match="--model: resnet18"):
        load_config(["--model", "resnet18"], environ={})


def test_help_lists_every_option_with_default():
    text = build_parser().format_help()
    for f in Config.__dataclass_fields__.values():
        if f.name != "task_options":  # not a flag: each of the task's options is
            assert "--" + f.name.replace("_", "-") in text
    # The default task's own options, in a group of their own.
    assert "the task's own options (ftrain.tasks:ImageClassification)" in text
    assert "--model" in text and "(default: 'synthetic')" in text
    for section in ("optimization options", "checkpoint options", "monitor options"):
        assert section in text


def test_secret_options_redacted():
    cfg = load_config(["--storage-options", '{"secret": "hunter2"}'], environ={})
    assert cfg.storage_options == {"secret": "hunter2"}
    assert "hunter2" not in str(cfg.to_dict())


def test_yaml_task_section_names_the_task_and_its_arguments(tmp_path):
    """task: {import: ..., <arguments>} in the YAML file; --task-args on the command line
    replaces the file's arguments."""
    cfg_file = tmp_path / "job.yaml"
    cfg_file.write_text("task:\n  import: examples.charlm:CharLM\n  d_model: 32\n  layers: 1\n"
                        "lr: 0.003\n")
    cfg = load_config(["--config", str(cfg_file)], environ={})
    assert cfg.task == "examples.charlm:CharLM" and cfg.lr == 0.003
    assert cfg.task_args == {"d_model": 32, "layers": 1}
    cfg = load_config(["--config", str(cfg_file), "--task-args", '{"layers": 3}'], environ={})
    assert cfg.task_args == {"layers": 3}
    with pytest.raises(ConfigError) as e:
        load_config(["--task", "no_colon", "--task-args", "[1]"], environ={})
    assert any(p.startswith("--task: 'no_colon' is not an import string") for p in e.value.problems)
    assert any(p.startswith("--task-args: must be a JSON object") for p in e.value.problems)
    with pytest.raises(ConfigError, match="--grad-accum: 3 does not divide --batch-size 256"):
        load_config(["--grad-accum", "3"], environ={})


def test_a_prefix_of_a_flag_is_not_taken_for_it(capsys):
    """'--epoch 3' used to be read as --epochs 3: argparse's abbreviations would also turn a
    script's prefix into an error the day a new option shares it."""
    with pytest.raises(SystemExit) as e:
        load_config(["--epoch", "3"], environ={})
    assert e.value.code == 2
    assert "unrecognized arguments: --epoch 3" in capsys.readouterr().err
