import dataclasses
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from typing import Literal

import pytest
from helpers import load_script

from densecl_vit.training.engine.config import (
    ALIASES,
    ConfigError,
    config_diff,
    config_to_dict,
    format_help,
    parse_config,
    run_cli,
    save_config,
)
from densecl_vit.training.tasks.pretraining import PretrainConfig
from densecl_vit.training.tasks.segmentation import FinetuneSegmentationConfig


@dataclass
class ToyConfig:
    """Toy training options."""

    lr: float = field(default=1e-4, metadata={"help": "base learning rate"})
    batch_size: int = field(default=8, metadata={"help": "images per device"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model"})
    pin_memory: bool = True
    image_size: tuple[int, int] = field(default=(224, 224), metadata={"help": "height, width"})
    out_indices: list[int] = field(default_factory=lambda: [4, 6, 8, 12])
    pool_scales: tuple[int, ...] = (1, 2, 3, 6)
    precision: Literal["no", "fp16", "bf16"] = field(default="bf16", metadata={"help": "mixed precision"})
    resume_from: str | None = None
    max_steps: int | None = 100

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")


def write_yaml(tmp_path, text):
    path = tmp_path / "cfg.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_defaults():
    assert parse_config(ToyConfig, []) == ToyConfig()


def test_yaml_then_cli_precedence(tmp_path):
    path = write_yaml(
        tmp_path,
        """
        lr: 3e-4            # PyYAML reads this as a string; it must still become a float
        batch-size: 16
        image_size: [192, 160]
        precision: fp16
        """,
    )
    cfg = parse_config(ToyConfig, ["--config", str(path), "--batch-size", "32"])
    assert cfg.lr == pytest.approx(3e-4) and isinstance(cfg.lr, float)
    assert cfg.batch_size == 32  # CLI beats YAML
    assert cfg.image_size == (192, 160)
    assert cfg.precision == "fp16"
    # The order of --config among the options does not matter.
    assert parse_config(ToyConfig, ["--batch-size=32", "--config", str(path)]).batch_size == 32


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--compile"], True),
        (["--compile", "true"], True),
        (["--compile", "False"], False),
        (["--compile=yes"], True),
        (["--no-compile"], False),
        (["--compile", "--no-compile"], False),
    ],
)
def test_bool_forms(argv, expected):
    assert parse_config(ToyConfig, argv).compile is expected


def test_no_prefix_turns_off_default_true():
    assert parse_config(ToyConfig, ["--no-pin-memory"]).pin_memory is False


def test_sequences_comma_separated_repeated_and_spaced():
    assert parse_config(ToyConfig, ["--image-size", "96,128"]).image_size == (96, 128)
    assert parse_config(ToyConfig, ["--out-indices", "3", "--out-indices", "5"]).out_indices == [3, 5]
    assert parse_config(ToyConfig, ["--pool-scales", "1", "2", "--lr", "1"]).pool_scales == (1, 2)
    with pytest.raises(ConfigError, match="exactly 2 values"):
        parse_config(ToyConfig, ["--image-size", "96,128,3"])


def test_optional_none_and_negative_numbers():
    cfg = parse_config(ToyConfig, ["--max-steps", "none", "--resume-from", "latest", "--lr", "-1e-3"])
    assert cfg.max_steps is None and cfg.resume_from == "latest" and cfg.lr == -1e-3
    with pytest.raises(ConfigError, match="invalid value 'none' for --batch-size"):
        parse_config(ToyConfig, ["--batch-size", "none"])


def test_yaml_null_only_for_optional_fields(tmp_path):
    path = write_yaml(tmp_path, "max_steps: null\n")
    assert parse_config(ToyConfig, ["--config", str(path)]).max_steps is None
    path = write_yaml(tmp_path, "batch_size: null\n")
    with pytest.raises(ConfigError, match="batch_size in cfg.yaml cannot be none"):
        parse_config(ToyConfig, ["--config", str(path)])


def test_yaml_bare_no_for_literal_choice(tmp_path):
    path = write_yaml(tmp_path, "precision: no\n")  # PyYAML reads `no` as False
    assert parse_config(ToyConfig, ["--config", str(path)]).precision == "no"
    path = write_yaml(tmp_path, "precision: yes\n")
    with pytest.raises(ConfigError, match="invalid value True for precision in cfg.yaml"):
        parse_config(ToyConfig, ["--config", str(path)])


def test_literal_choices_validated():
    with pytest.raises(ConfigError, match="choose one of: no, fp16, bf16"):
        parse_config(ToyConfig, ["--precision", "fp8"])


def test_wrong_types_are_one_line_errors():
    with pytest.raises(ConfigError, match=r"invalid value 'abc' for --batch-size; expected INT"):
        parse_config(ToyConfig, ["--batch-size", "abc"])
    with pytest.raises(ConfigError, match="expected true or false"):
        parse_config(ToyConfig, ["--compile", "maybe"])
    with pytest.raises(ConfigError, match="expects a value"):
        parse_config(ToyConfig, ["--lr"])


def test_unknown_option_suggests_closest():
    with pytest.raises(ConfigError) as err:
        parse_config(ToyConfig, ["--batch-sise", "4"])
    assert str(err.value) == "unknown option --batch-sise; did you mean --batch-size?"
    with pytest.raises(ConfigError, match="takes no value"):
        parse_config(ToyConfig, ["--no-compile", "true"])
    with pytest.raises(ConfigError, match="unknown option --no-lr"):
        parse_config(ToyConfig, ["--no-lr"])  # --no- only applies to bool fields


def test_unknown_yaml_key_suggests_closest(tmp_path):
    path = write_yaml(tmp_path, "step_size: 0.1\nprecison: fp16\n")
    with pytest.raises(ConfigError, match=r"unknown key 'step_size' in .*cfg.yaml; see"):
        parse_config(ToyConfig, ["--config", str(path)])
    path = write_yaml(tmp_path, "precison: fp16\n")
    with pytest.raises(ConfigError, match="unknown key 'precison' .*did you mean precision"):
        parse_config(ToyConfig, ["--config", str(path)])
    path = write_yaml(tmp_path, "- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        parse_config(ToyConfig, ["--config", str(path)])


def test_help_lists_every_field(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(ToyConfig, ["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "Toy training options." in out
    for name in (
        "--lr",
        "--batch-size",
        "--compile, --no-compile",
        "--image-size",
        "--precision {no,fp16,bf16}",
    ):
        assert name in out
    assert "base learning rate (default: 0.0001)" in out
    assert "mixed precision (default: 'bf16')" in out
    assert "(default: [4, 6, 8, 12])" in out


def test_save_load_round_trip(tmp_path):
    cfg = parse_config(ToyConfig, ["--image-size", "64,32", "--max-steps", "none", "--compile"])
    path = save_config(cfg, tmp_path / "out" / "config.yaml")
    assert "image_size:\n- 64\n- 32" in path.read_text()  # tuples saved as plain YAML lists
    assert parse_config(ToyConfig, ["--config", str(path)]) == cfg


def test_config_diff_treats_tuples_as_lists():
    saved = config_to_dict(ToyConfig())
    now = config_to_dict(ToyConfig(lr=1.0, image_size=(1, 2)))
    assert config_diff(saved, dict(saved), ["lr", "image_size"]) == []
    assert config_diff(saved, now, ["lr", "image_size", "batch_size"]) == ["lr", "image_size"]
    assert config_diff({"a": (1, 2)}, {"a": [1, 2]}, ["a"]) == []
    assert config_diff({}, {"a": None}, ["a"]) == ["a"]


def test_run_cli_calls_main_with_validated_config():
    assert run_cli(lambda cfg: cfg.batch_size * 2, ToyConfig, ["--batch-size", "3"]) == 6


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--batch-size", "0"], "error: --batch-size must be >= 1, got 0"),
        (["--bach-size", "2"], "error: unknown option --bach-size; did you mean --batch-size?"),
    ],
)
def test_run_cli_exits_2_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda cfg: pytest.fail("main must not run"), ToyConfig, argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err == message + "\n"


@pytest.mark.slow  # a fresh interpreter imports transformers through the package: tens of seconds on 2 cores
def test_run_cli_as_a_script(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(
        textwrap.dedent(
            """
            from dataclasses import dataclass
            from densecl_vit.training.engine.config import run_cli

            @dataclass
            class C:
                steps: int = 1

            run_cli(lambda cfg: print(cfg.steps), C)
            """
        )
    )
    bad = subprocess.run([sys.executable, str(script), "--step", "5"], capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr == "error: unknown option --step; did you mean --steps?\n"


TRANSFORMERS_FLAGS = [
    "--dataset", "d", "--model_name_or_path", "vit-small", "--learning_rate", "3e-4", "--per_device_train_batch_size", "8",
    "--resume_from_checkpoint", "latest", "--output_dir", "out",
]  # fmt: skip
OUR_FLAGS = [
    "--dataset", "d", "--model", "vit-small", "--lr", "3e-4", "--per-device-batch-size", "8", "--resume-from", "latest",
    "--output-dir", "out",
]  # fmt: skip


@pytest.mark.parametrize("cls", [PretrainConfig, FinetuneSegmentationConfig])
def test_transformers_example_flags_are_aliases_of_ours(cls, tmp_path):
    cfg = parse_config(cls, TRANSFORMERS_FLAGS)
    assert cfg == parse_config(cls, OUR_FLAGS)
    assert (cfg.model, cfg.lr, cfg.per_device_batch_size, cfg.resume_from) == ("vit-small", 3e-4, 8, "latest")
    yaml_file = write_yaml(tmp_path, "model_name_or_path: vit-small\nlearning_rate: 3.0e-4\n")
    assert parse_config(cls, ["--config", str(yaml_file), "--dataset", "d"]) == parse_config(
        cls, ["--dataset", "d", "--model", "vit-small", "--lr", "3e-4"]
    )
    assert "--lr FLOAT (alias --learning_rate)" in format_help(cls)
    assert set(ALIASES.values()) <= {f.name for f in dataclasses.fields(cls)}


def test_an_alias_names_nothing_where_the_config_lacks_its_target(tmp_path):
    with pytest.raises(ConfigError, match="unknown option --model_name_or_path"):
        parse_config(ToyConfig, ["--model_name_or_path", "x"])
    assert parse_config(ToyConfig, ["--learning_rate", "0.5"]).lr == 0.5
    yaml_file = write_yaml(tmp_path, "lr: 0.1\nlearning_rate: 0.2\n")
    with pytest.raises(ConfigError, match="sets lr twice"):
        parse_config(ToyConfig, ["--config", str(yaml_file)])


@pytest.mark.parametrize(
    "script, required",
    [("export_to_hub", ["--model", "m"]), ("make_synthetic_scenes", ["--num-train", "1"])],
)
def test_scripts_that_write_a_folder_take_output_dir_and_still_read_output(script, required):
    parse = load_script(script).parse_args
    assert str(parse([*required, "--output-dir", "folder"]).output) == "folder"
    assert str(parse([*required, "--output", "folder"]).output) == "folder"
