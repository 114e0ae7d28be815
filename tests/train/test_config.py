"""`dtp-ext train` option handling: presets, config files, and every error path (no training)."""

import json

import pytest

from dtp_ext.cli import main
from dtp_ext.train import PRESETS, TrainConfig, resolve
from dtp_ext.train.catalog import build_model
from dtp_ext.train.config import ConfigError, merge


def run_cli(capsys, *argv):
    code = main(["train", "--no-progress", "--threads", "1", *argv])
    return code, capsys.readouterr().err


def test_help_mentions_default_run_and_presets(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "minutes" in text and "cifar10-simplevgg-ldrl" in text and "beta" in text


def test_unknown_dataset_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--dataset", "svhn"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--lr", "-0.1"], "lr must be >= 0"),
        (["--feedback-lr", "0.1,0.2,0.3"], "feedback_lr has 3 entries but the model has 2"),
        (["--feedback-iterations", "2.5"], "feedback_iterations entries must be whole numbers"),
        (["--feedback-noise", "-1"], "feedback_noise entries must be finite numbers >= 0"),
        (["--momentum", "1.0"], "momentum must be in [0, 1)"),
        (["--epochs", "0"], "epochs must be >= 1"),
        (["--data-dir", "/nonexistent/folder"], "is not an existing folder"),
        (["--dataset", "cifar10"], "no --data-dir given"),
        (["--dataset", "mnist", "--model", "simplevgg"], "needs inputs of at least 32x32"),
        (["--config", "no-such-preset"], "neither a preset"),
        (["--resume"], "--resume needs --out"),
        (["--feedback-memory-mb", "0"], "feedback_memory_mb must be > 0"),
        (["--drl-variant", "s"], "drl_variant applies to drl only, not 'ldrl'"),
        (
            ["--penultimate-target", "gradient"],
            "penultimate_target applies to dtp and tp only, not 'ldrl'",
        ),
    ],
)
def test_bad_values_stop_before_training(capsys, tmp_path, argv, message):
    code, err = (
        run_cli(capsys, "--out", str(tmp_path / "run"), *argv)
        if "--resume" not in argv
        else run_cli(capsys, *argv)
    )
    assert code == 2
    assert message in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_resume_without_checkpoint(capsys, tmp_path):
    code, err = run_cli(capsys, "--resume", "--out", str(tmp_path))
    assert code == 2 and "no checkpoint.pt" in err


def test_config_file_unknown_key_and_yaml_json(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset: mnist\nlearning_rate: 0.1\n")
    code, err = run_cli(capsys, "--config", str(bad))
    assert code == 2 and "unknown option(s) ['learning_rate']" in err
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"feedback-iterations": [5, 6], "lr": 0.02}))
    from dtp_ext.train.config import load_config_file

    cfg = resolve(merge(load_config_file(good)))
    assert cfg.feedback_iterations == [5, 6] and cfg.lr == 0.02


def test_defaults_follow_dataset_model_and_algorithm():
    cfg = resolve(TrainConfig())
    assert (cfg.dataset, cfg.model, cfg.algorithm, cfg.lr) == (
        "mnist",
        "mnist-convnet",
        "ldrl",
        0.01,
    )
    assert cfg.feedback_iterations == [20, 20] and cfg.feedback_noise == [0.2, 0.08]
    assert cfg.feedback_lr == [1e-3, 0.18] and cfg.augment is False
    vgg = resolve(TrainConfig(dataset="cifar10", out="x"))
    assert vgg.model == "simplevgg" and len(vgg.feedback_lr) == 5 and vgg.augment is True
    assert resolve(TrainConfig(algorithm="bp")).lr == 0.01
    assert resolve(TrainConfig(algorithm="drl")).lr == 0.001


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_resolves(name):
    cfg = resolve(merge(PRESETS[name]))
    assert cfg.algorithm in name and cfg.dataset in name


def test_paper_presets_in_gradient_units():
    ldrl = resolve(merge(PRESETS["cifar10-simplevgg-ldrl"]))
    assert ldrl.lr == pytest.approx(0.7 * 0.05) and ldrl.weight_decay == pytest.approx(1e-4 / 0.7)
    assert (
        ldrl.feedback_iterations == [20, 30, 35, 55, 20]
        and ldrl.t_max == 85
        and ldrl.batch_size == 128
    )
    bp = resolve(merge(PRESETS["cifar10-simplevgg-bp"]))
    assert bp.lr == 0.05 and bp.weight_decay == 1e-4
    inet = resolve(merge(PRESETS["imagenet32-simplevgg-ldrl"]))
    assert inet.lr == pytest.approx(0.007) and inet.feedback_iterations == [25, 35, 40, 60, 25]
    assert inet.batch_size == 256
    inet_bp = resolve(merge(PRESETS["imagenet32-simplevgg-bp"]))
    assert (inet_bp.scheduler, inet_bp.step_size, inet_bp.lr) == ("step", 30, 0.01)


def test_simplevgg_parameter_count():
    model = build_model("simplevgg", 3, 32, 10, 0.7)
    assert sum(p.numel() for p in model.parameters()) == 2_221_706
    assert (
        sum(p.numel() for p in build_model("simplevgg", 3, 32, 1000, 0.7).parameters())
        == 2_221_706 + 990 * 513
    )


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)
