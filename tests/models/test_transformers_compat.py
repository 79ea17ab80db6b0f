"""The supported transformers range is declared once and enforced: setup.cfg, the import check, the model card."""

import configparser

import pytest
import transformers

from modeling_unimoe.transformers_compat import (
    MINIMUM_TRANSFORMERS,
    SUPPORTED_TRANSFORMERS,
    require_supported_transformers,
)
from tests.utils import REPO_ROOT


def test_setup_cfg_declares_the_supported_range():
    config = configparser.ConfigParser()
    config.read(REPO_ROOT / "setup.cfg")
    requirements = [line.split("#")[0].strip() for line in config["options"]["install_requires"].splitlines()]
    assert f"transformers{SUPPORTED_TRANSFORMERS}" in requirements


def test_an_older_transformers_is_refused_by_name():
    with pytest.raises(ImportError, match=r'needs transformers>=5\.19,<6, but transformers 5\.10\.0 is installed'):
        require_supported_transformers("5.10.0")
    for version in (MINIMUM_TRANSFORMERS, "5.23.0.dev0", "5.24.0", transformers.__version__):
        require_supported_transformers(version)


def test_training_yamls_turn_activation_checkpointing_on_under_the_running_release():
    """The YAMLs say `activation_checkpointing` (transformers >= 5.23); earlier releases call the TrainingArguments
    field `gradient_checkpointing`, and `unimoe-train` passes the option under the running release's name."""
    from trl_scripts.training.train import CHECKPOINTING_OPTION, parse_arguments

    _, _, training_args = parse_arguments(
        [str(REPO_ROOT / "configuration/training/unimoe-v1-8e-stage3.yaml"), "--bf16", "false", "--use_cpu", "true"]
    )
    assert getattr(training_args, CHECKPOINTING_OPTION.removeprefix("--")) is True
