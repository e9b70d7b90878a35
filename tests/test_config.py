"""Config loading: yaml keys are CLI options, and every bad value gets one clear error."""
import glob
import os

import pytest
import yaml

from advvit.config import (ConfigError, FIELDS, build_parser, config_from_dict, config_to_dict,
                           load_config, parse_eps, save_args_yaml)

CONFIGS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "configs", "*.yaml")))


def _write(tmp_path, **values):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def test_yaml_keys_and_cli_options_are_the_same_and_cli_wins(tmp_path):
    path = _write(tmp_path, eps="8/255", batch_size=32, model="resnet18_gelu")
    cfg = load_config(["--config", path, "--batch-size", "16"])
    assert cfg.attack.eps == pytest.approx(8 / 255)
    assert cfg.data.batch_size == 16 and cfg.model.model == "resnet18_gelu"
    # Every dataclass field is an option of the parser under its own name.
    dests = {a.dest for a in build_parser()._actions}
    assert set(FIELDS) <= dests


@pytest.mark.parametrize("text, value", [("4/255", 4 / 255), ("0.0157", 0.0157), (0.5, 0.5),
                                         ("8 / 255", 8 / 255)])
def test_eps_as_fraction_or_number(text, value):
    assert parse_eps(text) == pytest.approx(value)


@pytest.mark.parametrize("argv, key", [
    (["--eps=-1/255"], "eps"), (["--eps", "1.5"], "eps"), (["--eps", "four"], "eps"),
    (["--attack-steps", "0"], "attack_steps"), (["--lr=-0.1"], "lr"), (["--lr", "0"], "lr"),
    (["--loss", "madry"], "loss"), (["--batch-size", "2.5"], "batch_size"),
    (["--finetune", "/no/such.pth"], "finetune"), (["--loss", "fgsm", "--attack-steps", "3"],
                                                   "attack_steps"),
    (["--scale", "0.9", "0.1"], "scale"), (["--device", "tpu"], "device"),
])
def test_bad_values_name_the_key(argv, key):
    with pytest.raises(ConfigError) as err:
        load_config(argv)
    assert err.value.key == key and f"'{key}'" in str(err.value)


def test_unknown_yaml_key_suggests_the_near_one(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'weight_decay'"):
        load_config(["--config", _write(tmp_path, weight_dacay=0.5)])


def test_wrong_yaml_types_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="'random_init': expected true or false"):
        load_config(["--config", _write(tmp_path, random_init="maybe")])
    with pytest.raises(ConfigError, match="'epochs': expected an integer"):
        load_config(["--config", _write(tmp_path, epochs="many")])


def test_missing_or_broken_config_file(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(["--config", str(tmp_path / "nope.yaml")])
    bad = tmp_path / "bad.yaml"
    bad.write_text("eps: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid yaml"):
        load_config(["--config", str(bad)])


def test_args_yaml_round_trips(tmp_path):
    cfg = load_config(["--eps", "2/255", "--scale", "0.5", "1.0", "--no-random-init"])
    path = tmp_path / "args.yaml"
    save_args_yaml(cfg, str(path))
    again = load_config(["--config", str(path)])
    assert config_to_dict(again) == config_to_dict(cfg)
    assert config_from_dict(config_to_dict(cfg)) == cfg


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_shipped_config_parses(path):
    cfg = load_config(["--config", path])
    assert cfg.attack.eps <= 0.5 and cfg.optim.epochs >= 1


def test_help_documents_every_key(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    text = capsys.readouterr().out
    for key in FIELDS:
        assert "--" + key.replace("_", "-") in text
