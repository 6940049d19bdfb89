"""Config parsing, CLI overrides, --help; the alpha/LR schedules and noise-stream addressing
against hand-computed values."""

import math
import subprocess
import sys

import pytest
import yaml

from vittle_fast.train.config import LEAVES, ConfigError, load_yaml, parse_args, save_yaml, to_dict
from vittle_fast.train.noise import noise_offset, noise_seed, splitmix64
from vittle_fast.train.schedules import vittle_alpha, warmup_cosine_lr_factor

DATA = ["data.data_path=train.json"]  # the one option without a usable default


def test_yaml_then_cli_precedence(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"max_steps": 7, "optim": {"lr": 0.5}, "vittle": {"beta_v": 0.3}}))
    cfg = parse_args(["--config", str(path), "--optim.lr", "1e-3", "vittle.prior=learnable",
                      "--output_dir", "somewhere", "--max_steps", "9", "vittle.logvar_clamp=[-1, 2]", *DATA])
    assert cfg.max_steps == 9 and cfg.output_dir == "somewhere"
    assert cfg.optim.lr == 1e-3  # YAML 1.1 would read "1e-3" as a string
    assert cfg.vittle.beta_v == 0.3  # from the file, untouched by the command line
    assert cfg.vittle.prior == "learnable"
    assert cfg.vittle.logvar_clamp == (-1.0, 2.0)
    assert parse_args(["vittle.logvar_clamp=null", *DATA]).vittle.logvar_clamp is None


def test_string_options_keep_raw_text():
    assert parse_args(["--output_dir", "yes", *DATA]).output_dir == "yes"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--vittle.prior", "gaussian"], "vittle.prior must be one of"),
        (["--max_steps", "1.5"], "max_steps must be an integer"),
        (["vittle.enabled=maybe"], "vittle.enabled must be true or false"),
        (["optim.nonexistent=1"], "unknown config option 'optim.nonexistent'"),
        (["--max_steps", "0"], "max_steps must be >= 1"),
        (["stop_at_step=-1"], "stop_at_step must be >= 0"),
        (["model.stage=1"], "vittle.enabled requires model.stage=2"),
        (["vittle.logvar_clamp=[2, -2]"], "vittle.logvar_clamp must be .low, high. with low < high"),
        (["parallel.activation_checkpointing=some"], "parallel.activation_checkpointing must be one of"),
        (["vittle.routing=positional", "data.packing=true"], "vittle.routing=positional needs one sequence per row"),
    ],
)
def test_bad_values_name_the_option(argv, message):
    with pytest.raises(ValueError, match=message):
        parse_args(argv + DATA)


def test_option_names_are_never_abbreviated():
    with pytest.raises(ConfigError, match="unrecognized arguments: --max_step$"):
        parse_args(["--max_step", "10", *DATA])


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as info:
        parse_args(["--max_steps", "1.5", "vittle.prior=gaussian", "optim.nonexistent=1", "oops", *DATA])
    assert len(info.value.errors) == 4, info.value.errors
    with pytest.raises(ConfigError) as info:
        parse_args(["--max_steps", "0", "stop_at_step=-1", "vittle.layer_v=-2"])
    assert len(info.value.errors) == 4, info.value.errors  # + data.data_path is required


def test_bare_flag_means_true():
    assert parse_args(["--allow_schedule_change", *DATA]).allow_schedule_change
    assert not parse_args(["--allow_schedule_change", "false", *DATA]).allow_schedule_change


def test_yaml_round_trip(tmp_path):
    cfg = parse_args(["vittle.prior=learnable", "parallel.replicate=2", "model.num_layers=6", *DATA])
    save_yaml(cfg, tmp_path / "config.yaml")
    assert to_dict(load_yaml(tmp_path / "config.yaml")) == to_dict(cfg)


def test_data_path_is_required_unless_demo():
    with pytest.raises(ValueError, match="data.data_path is required"):
        parse_args([])
    assert parse_args(["data.demo=true"]).data.demo


def test_demo_config_loads():
    cfg = load_yaml("configs/demo.yaml")
    cfg.validate()
    assert cfg.vittle.enabled and cfg.vittle.prior == "fixed"


def test_help_lists_every_option_with_its_default():
    result = subprocess.run([sys.executable, "-m", "vittle_fast.train", "--help"],
                            capture_output=True, text=True, check=True)
    text = " ".join(result.stdout.split())  # undo argparse's line wrapping
    for flag in ("--config PATH", "--output_dir", "--max_steps", "section.key=VALUE"):
        assert flag in text
    for name, (_, default, _) in LEAVES.items():
        shown = list(default) if isinstance(default, tuple) else default
        assert f"--{name} " in text, name
        assert f"(default: {shown!r})" in text, name
    assert text.count("(default: ") == len(LEAVES)


def test_vittle_alpha_matches_the_formulas():
    # cosine: end * (1 - cos(pi t)) / 2
    assert vittle_alpha(0, 100) == 0.0
    assert vittle_alpha(50, 100) == pytest.approx(0.25)
    assert vittle_alpha(100, 100) == pytest.approx(0.5)
    assert vittle_alpha(25, 100, end=1.0) == pytest.approx((1 - math.sqrt(0.5)) / 2)
    # sigmoid: end / (1 + exp(-k (t - t0)))
    assert vittle_alpha(50, 100, kind="sigmoid") == pytest.approx(0.25)
    assert vittle_alpha(0, 100, kind="sigmoid") == pytest.approx(0.5 / (1 + math.exp(5)))
    assert vittle_alpha(80, 100, kind="sigmoid", k=4.0, t0=0.3, end=0.4) == pytest.approx(0.4 / (1 + math.exp(-2)))
    assert vittle_alpha(500, 100) == pytest.approx(0.5)  # held after the end
    with pytest.raises(ValueError, match="kind"):
        vittle_alpha(1, 10, kind="linear")
    with pytest.raises(ValueError, match="total_steps"):
        vittle_alpha(1, 0)


def test_warmup_cosine_lr():
    assert warmup_cosine_lr_factor(0, 4, 104) == 0.25
    assert warmup_cosine_lr_factor(3, 4, 104) == 1.0
    assert warmup_cosine_lr_factor(4, 4, 104) == 1.0
    assert warmup_cosine_lr_factor(54, 4, 104) == pytest.approx(0.5)
    assert warmup_cosine_lr_factor(104, 4, 104, min_ratio=0.1) == pytest.approx(0.1)


def test_splitmix64_known_values():
    # First outputs of the reference splitmix64 generator (Vigna) started from state 0.
    assert splitmix64(0) == 0xE220A8397B1DCDAF
    assert splitmix64(0x9E3779B97F4A7C15) == 0x6E789E6AA1B965F4


def test_noise_addressing_is_uint64_and_distinct():
    seeds = {noise_seed(0, step, micro) for step in range(20) for micro in range(4)}
    assert len(seeds) == 80
    assert all(0 <= s < 2**64 for s in seeds)
    assert noise_seed(1, 0, 0) != noise_seed(0, 0, 0)
    assert noise_offset(3) == 3 << 44
    with pytest.raises(ValueError, match="rank"):
        noise_offset(-1)
