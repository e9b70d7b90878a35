"""Config loading: yaml keys are CLI options, and every bad value gets one clear error."""
import glob
import os
import re

import pytest
import yaml

from advvit.config import (ConfigError, FIELDS, build_parser, check_lr, config_from_dict,
                           config_to_dict, effective_lr, load_config, parse_eps, save_args_yaml)

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
    (["--loss", "fgsm", "--attack-steps", "3"], "attack_steps"),
    (["--scale", "0.9", "0.1"], "scale"), (["--device", "tpu"], "device"),
    (["--threads", "0"], "threads"), (["--threads", "two"], "threads"),
])
def test_bad_values_name_the_key(argv, key):
    with pytest.raises(ConfigError) as err:
        load_config(argv)
    assert err.value.key == key and f"'{key}'" in str(err.value)


def test_threads_key_is_auto_or_a_positive_integer_and_reaches_torch(tmp_path):
    import torch
    from advvit import accel
    assert load_config([]).run.threads == "auto"
    cfg = load_config(["--config", _write(tmp_path, threads=2), "--threads", "1"])
    assert cfg.run.threads == 1
    assert config_from_dict(config_to_dict(cfg)).run.threads == 1
    assert load_config(["--config", _write(tmp_path, threads="auto")]).run.threads == "auto"
    for bad in (True, 1.5, -2):
        with pytest.raises(ConfigError, match="'threads': expected auto or a positive integer"):
            load_config(["--config", _write(tmp_path, threads=bad)])
    before = torch.get_num_threads()
    try:
        assert accel.apply_threads(cfg.run.threads) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_unknown_yaml_key_suggests_the_near_one(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'weight_decay'"):
        load_config(["--config", _write(tmp_path, weight_dacay=0.5)])


def test_wrong_yaml_types_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="'random_init': expected true or false"):
        load_config(["--config", _write(tmp_path, random_init="maybe")])
    with pytest.raises(ConfigError, match="'epochs': expected an integer"):
        load_config(["--config", _write(tmp_path, epochs="many")])


def test_a_folder_given_as_the_config_file_is_named_a_folder(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(["--config", str(tmp_path)])
    assert f"{tmp_path} is a folder, not a file" in str(e.value)
    assert str(tmp_path / "config.yaml") in str(e.value)


def test_missing_or_broken_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
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


@pytest.mark.parametrize("argv, key", [
    (["--lr", "nan"], "lr"), (["--lr", "inf"], "lr"), (["--lr=-inf"], "lr"),
    (["--weight-decay", "inf"], "weight_decay"), (["--eps", "nan"], "eps"),
    (["--eps", "inf"], "eps"), (["--eps", "1/0"], "eps"), (["--eps", "1e400"], "eps"),
    (["--scale", "nan", "1.0"], "scale"), (["--eval-eps", "nan"], "eval_eps"),
    (["--attack-step-size", "inf"], "attack_step_size"), (["--min-lr", "nan"], "min_lr"),
])
def test_non_finite_numbers_are_refused_for_every_float_key(argv, key):
    with pytest.raises(ConfigError) as err:
        load_config(argv)
    assert err.value.key == key and f"'{key}'" in str(err.value)


@pytest.mark.parametrize("text, key", [("eps: .nan", "eps"), ("lr: .inf", "lr"),
                                       ("eps_warmup_epochs: .nan", "eps_warmup_epochs"),
                                       ("momentum: -.inf", "momentum"), ("eps: 4/0", "eps")])
def test_non_finite_yaml_values_are_refused(tmp_path, text, key):
    path = tmp_path / "c.yaml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError) as err:
        load_config(["--config", str(path)])
    assert err.value.key == key


@pytest.mark.parametrize("argv, key, words", [
    (["--loss", "adversarial"], "loss", "not one of"),
    (["--lr", "1e-5", "--min-lr", "1e-4"], "min_lr", "above the learning rate"),
    (["--epochs", "5", "--warmup-epochs", "6", "--cooldown-epochs", "0"], "warmup_epochs",
     "more than the run's 5"),
    (["--epochs", "5", "--eps-warmup-epochs", "6"], "eps_warmup_epochs", "never reach"),
    (["--epochs", "5", "--eps-warmup-epochs", "3", "--zero-eps-epochs", "2.5"],
     "eps_warmup_epochs", "longer than the run"),
    (["--epochs", "5", "--zero-eps-epochs", "6"], "zero_eps_epochs", "never reach"),
])
def test_silently_accepted_combinations_are_refused(argv, key, words):
    with pytest.raises(ConfigError, match=words) as err:
        load_config(argv)
    assert err.value.key == key


def test_warmups_that_fit_the_run_are_accepted():
    cfg = load_config(["--epochs", "5", "--warmup-epochs", "5", "--eps-warmup-epochs", "3",
                       "--zero-eps-epochs", "2"])
    assert cfg.attack.eps_warmup_epochs + cfg.attack.zero_eps_epochs == cfg.optim.epochs


@pytest.mark.parametrize("scale, batch, lr", [("linear", 128, 5e-5), ("sqrt", 128, 1e-4),
                                              ("none", 128, 2e-4), ("linear", 2048, 8e-4),
                                              ("sqrt", 2048, 4e-4)])
def test_effective_lr_scales_lr_base_by_the_rule(scale, batch, lr):
    o = load_config(["--lr-base", "2e-4", "--lr-base-size", "512", "--lr-scale", scale,
                     "--min-lr", "0"]).optim
    assert effective_lr(o, batch) == pytest.approx(lr)
    assert effective_lr(load_config(["--lr", "3e-4"]).optim, batch) == 3e-4


def test_min_lr_is_checked_against_the_scaled_learning_rate():
    # lr_base 5e-4 at 512, linearly scaled to a global batch of 16: 1.5625e-5 < min_lr 5e-5.
    o = load_config(["--lr-base", "5e-4", "--min-lr", "5e-5"]).optim
    with pytest.raises(ConfigError, match=r"lr_base 0.0005 scaled linear .* global batch 16") \
            as err:
        check_lr(o, global_batch=16)
    assert err.value.key == "min_lr"
    assert check_lr(o, global_batch=512) == pytest.approx(5e-4)


def test_attack_steps_default_is_the_losses_default():
    assert load_config([]).attack.attack_steps is None
    assert "fgsm 1, pgd 10, trades 10" in FIELDS["attack_steps"][1].metadata["help"]
    load_config(["--loss", "fgsm", "--attack-steps", "1"])  # the one count fgsm takes


def _validate(*argv, world_size=1):
    from advvit.train import validate
    return validate(load_config(["--dataset", "cifar10", "--model", "xcit_nano_12_p8_32",
                                 "--lr", "1e-3", *argv]), world_size)


@pytest.mark.parametrize("argv, key, words", [
    (["--model", "xcit_nano_12_p8_23"], "model", "did you mean xcit_nano_12_p8_32"),
    (["--model", "resnet50gelu"], "model", "resnet50_gelu"),
    (["--opt", "adamww"], "opt", "did you mean adamw"),
    (["--opt", "warp_adamw"], "opt", "unknown optimizer"),
    (["--sched", "cosnie"], "sched", "Unknown scheduler 'cosnie'"),
    (["--sched", "plateau"], "sched", "only supports step per epoch"),  # advvit steps per update
    (["--sched", "none"], "sched", "builds no scheduler"),
    (["--dataset", "cifar11"], "dataset", "did you mean cifar10"),
    (["--num-classes", "5"], "num_classes", "fewer than the 10 classes of cifar10"),
    (["--img-size", "36"], "img_size", "not a multiple of xcit_nano_12_p8_32's patch size 8x8"),
    # timm's XCiT asserts when built at a size its patch does not divide: still the img_size.
    (["--model", "xcit_nano_12_p16_224", "--img-size", "40"], "img_size", "patch size 16x16"),
    (["--model", "deit_tiny_patch16_224", "--img-size", "40"], "img_size", "16x16"),
    # An L2 radius above the 3x32x32 box's diagonal (55.4) means nothing.
    (["--attack-norm", "l2", "--eps", "60"], "eps", "L2 diagonal of a 3x32x32 input"),
    (["--attack-norm", "l2", "--eps", "1", "--eval-eps", "56"], "eval_eps", "3x32x32"),
    # L1: the 3x32x32 box's L1 diagonal is 3072.
    (["--attack-norm", "l1", "--eps", "3100"], "eps", "L1 diagonal of a 3x32x32 input"),
])
def test_validate_refuses_what_needs_registries_data_or_model(argv, key, words):
    with pytest.raises(ConfigError, match=words) as err:
        _validate(*argv)
    assert err.value.key == key


def test_validate_accepts_good_runs_and_returns_the_spec():
    info, spec = _validate("--num-classes", "12", "--opt", "lookahead_adamw", "--sched", "step")
    assert info.num_classes == 10 and spec.num_classes == 12 and spec.img_size == 32
    # The usual ImageNet L2 radius on a 224x224 input; a CNN takes any size.
    _validate("--attack-norm", "l2", "--eps", "3.0", "--img-size", "224")
    _validate("--attack-norm", "l1", "--eps", "75", "--img-size", "224")
    _validate("--model", "resnet18_gelu", "--img-size", "33")


def test_validate_checks_min_lr_against_this_world_size():
    argv = ["--lr", "none", "--lr-base", "5e-4", "--min-lr", "1e-5", "--batch-size", "8"]
    with pytest.raises(ConfigError) as err:
        _validate(*argv, world_size=1)  # 5e-4 * 8 / 512 = 7.8e-6 < 1e-5
    assert err.value.key == "min_lr"
    _validate(*argv, world_size=8)      # 6.25e-5
    _validate(*argv, world_size=None)   # before an XLA launch: not known yet


def test_train_cli_exits_2_before_any_work_on_a_registry_error(tmp_path, capsys):
    from advvit.train import main
    out = tmp_path / "runs"
    assert main(["--dataset", "cifar10", "--data-dir", str(tmp_path / "none"), "--model",
                 "xcit_nano_12_p8_23", "--output", str(out), "--no-tensorboard"]) == 2
    err = capsys.readouterr().err
    assert "config key 'model'" in err and "Traceback" not in err
    assert not out.exists()


def test_trades_alone_trains_trades_10_and_the_step_rule_is_applied():
    from advvit import accel
    from advvit.trainer import _build_loss, _eval_attack
    rt = accel.setup("cpu")
    loss = _build_loss(load_config(["--loss", "trades", "--eps", "8/255"]), rt)
    assert loss.steps == 10 and loss.step_size is None
    assert _eval_attack(load_config(["--loss", "trades"]))["steps"] == 10
    assert _build_loss(load_config(["--loss", "pgd"]), rt).steps == 10
    # The thesis's rule: the step stays at 1.5 x the target eps / steps through the warm-up.
    final = _build_loss(load_config(["--loss", "pgd", "--attack-steps", "2", "--eps", "8/255",
                                     "--attack-step-size-rule", "final"]), rt)
    assert final.step_size == pytest.approx(1.5 * (8 / 255) / 2)
    final.eps = 1 / 255  # what the warm-up sets early on: the step does not follow
    assert final.step_size == pytest.approx(1.5 * (8 / 255) / 2)
    given = _build_loss(load_config(["--attack-step-size", "0.01",
                                     "--attack-step-size-rule", "final"]), rt)
    assert given.step_size == 0.01


@pytest.mark.parametrize("content, words", [
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "is a binary file (a NUL byte at offset 8)"),
    (b"eps: 4/255\nmodel: r\xe9snet\n", "is not UTF-8 text (byte 0xe9 at offset 19)"),
    (b"# padding\n" * 110_000, "larger than the 1 MiB a config file may be"),
])
def test_a_config_file_that_is_not_a_small_text_file_is_one_message(tmp_path, content, words):
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=re.escape(words)) as err:
        load_config(["--config", str(path)])
    assert err.value.key == "config" and "give the yaml file of config keys" in str(err.value)


def _billion_laughs(key):
    """Nine nested lists of nine aliases: 9**9 strings once built, a few hundred bytes as yaml."""
    levels = ["&l0 [" + ", ".join(["lol"] * 9) + "]"]
    levels += [f"&l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 9)]
    return f"{key}: [{', '.join(levels)}]\n"


@pytest.mark.parametrize("text", [_billion_laughs("model"), "scale: &me [1, *me]\n"],
                         ids=["aliases", "self-reference"])
def test_a_value_that_expands_past_the_node_limit_is_refused_at_once(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="more than 10,000 yaml values") as err:
        load_config(["--config", str(path)])
    assert err.value.key == text.split(":")[0]


def test_messages_print_a_shortened_value(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: [" + ", ".join(["resnet"] * 5000) + "]\n"
                    "experiment: " + "x" * 400 + "\n")
    with pytest.raises(ConfigError, match=r"expected a string, got \['resnet', .*\.\.\.\]") as err:
        load_config(["--config", str(path)])
    assert len(str(err.value)) < 200
    with pytest.raises(ConfigError, match="400 bytes long") as err:
        load_config(["--experiment", "x" * 400])
    assert len(str(err.value)) < 300


def test_a_key_given_twice_in_a_file_names_both_lines(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("eps: 4/255\nbatch_size: 8\n\neps: 8/255\n")
    with pytest.raises(ConfigError, match=r"given twice in .*c.yaml \(lines 1 and 4\)") as err:
        load_config(["--config", str(path)])
    assert err.value.key == "eps" and "keep one of them" in str(err.value)


@pytest.mark.parametrize("key, pair", [("ratio", [-1, 2]), ("ratio", [0, 1]), ("ratio", [2, 1]),
                                       ("scale", [-0.5, 1]), ("scale", [0, 1]),
                                       ("scale", [0.5, 1.5]), ("scale", [0.5]),
                                       ("ratio", [0.5, 1, 2])])
def test_crop_ranges_are_positive_increasing_pairs(tmp_path, key, pair):
    with pytest.raises(ConfigError, match=r"expected \[min, max\] of the crop's") as err:
        load_config(["--config", _write(tmp_path, **{key: pair})])
    assert err.value.key == key
    assert getattr(load_config([f"--{key}", "0.5", "0.5"]).data, key) == [0.5, 0.5]


@pytest.mark.parametrize("name, words", [
    ("../elsewhere", "is a path"), ("a/b", "is a path"), ("/tmp/run", "is a path"),
    (".", "output itself or its parent"), ("..", "output itself or its parent"),
    ("r" * 300, "300 bytes long, more than the 255"), ("é" * 128, "256 bytes long"),
])
def test_the_experiment_is_one_folder_inside_output(name, words):
    with pytest.raises(ConfigError, match=words) as err:
        load_config(["--experiment", name])
    assert err.value.key == "experiment" and "plain folder name" in str(err.value)
    assert load_config(["--experiment", "r" * 255]).run.experiment == "r" * 255


@pytest.mark.parametrize("policy, words", [
    ("foo", "timm cannot read 'foo': Unknown AA policy foo"),
    ("rand-m9-zz5", "Unknown RandAugment config section"),
    ("augmix-q9", "Unknown AugMix config section"),
    ("rand-m9x", "invalid literal"),
    # timm builds these, skipping a part it does not read: refused as well.
    ("rand-zz", "timm would skip 'zz' of 'rand-zz'"),
    ("original-zz", "skip 'zz'"), ("rand-m9-tfoo", "skip 'tfoo'"),
    ("rand-tweights-t3a", "skip 't3a'"),
])
def test_auto_augment_is_a_policy_timm_reads_whole(policy, words):
    with pytest.raises(ConfigError, match=re.escape(words)) as err:
        _validate("--auto-augment", policy)
    assert err.value.key == "auto_augment"
    assert "rand-m9-mstd0.5-inc1" in str(err.value) and "augmix-m5-w4-d2" in str(err.value)


@pytest.mark.parametrize("policy", ["rand-m9-mstd0.5-inc1", "rand-m9-n2-tweights",
                                    "augmix-m5-w4-d2", "original", "v0", "3a", "original-mstd0.5"])
def test_auto_augment_policies_timm_reads_are_accepted(policy):
    _validate("--auto-augment", policy)
