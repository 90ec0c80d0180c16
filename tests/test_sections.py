"""Config sections as dataclasses (llada_jax/sections.py): one definition per setting reaches the
config, the command-line tools and lm-eval's model args."""

import dataclasses
import os
import subprocess
import sys

import pytest
from absl import flags

from llada_jax import cli, config, inference, sampling, sections
from llada_jax.model import ModelConfig
from llada_jax.run_sections import EvalSettings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class WithTopP(sampling.SampleSettings):
    """The sampler's settings plus one a developer adds."""

    top_p: float = sections.setting(1.0, "keep the smallest set of tokens this probable")


def test_every_section_key_is_in_base_config_with_its_default():
    c = config.base_config()
    for name, classes in config.SECTIONS.items():
        fields = [f for cls in classes for f in sections.keys(cls)]
        assert sorted(c[name].keys()) == sorted(f.name for f in fields), name
        for f in fields:
            assert c[name][f.name] == f.default, f"{name}.{f.name}"
    described = config.describe()
    for name, classes in config.SECTIONS.items():
        for cls in classes:
            for f in sections.keys(cls):
                assert f"{name}.{f.name} = {f.default!r}  # {f.metadata['doc']}" in described


def test_a_new_sample_field_reaches_the_config_the_flags_and_lm_eval(monkeypatch):
    """Declared once in the dataclass: base_config's sample section, a tool's flags (with its
    help) and lm-eval's model args all have it, and it reaches the settings they build."""
    monkeypatch.setitem(config.SECTIONS, "sample", (WithTopP, config.run_sections.PrintedSamples))
    assert config.base_config().sample.top_p == 1.0
    assert "sample.top_p = 1.0  # keep the smallest set" in config.describe()

    flag_values = flags.FlagValues()
    cli.define_section_flags(WithTopP, flag_values)
    flag_values(["prog", "--top_p=0.9", "--gen_length=8", "--steps=8", "--block_length=8"])
    assert "--top_p: keep the smallest set" in cli.help_text("doc", flag_values)
    assert cli.section_with_flags(WithTopP(), flag_values).top_p == 0.9

    from llada_jax import lm_eval_model

    monkeypatch.setattr(sampling, "SampleSettings", WithTopP)
    assert lm_eval_model.split_section_args({"top_p": "0.5"}) == ({"top_p": 0.5}, {})
    lm = object.__new__(lm_eval_model.LLaDAJaxLM)
    lm.sample_args, lm.block_size = {"top_p": 0.5, "block_length": 4}, 0
    settings = lm.settings_for(max_gen_toks=10)
    assert (settings.top_p, settings.gen_length, settings.steps) == (0.5, 12, 12)


@pytest.mark.parametrize(
    "tool,section",
    [("tools/sample.py", sampling.SampleSettings), ("tools/evaluate.py", EvalSettings)],
)
def test_the_tools_list_every_setting_of_their_section(tool, section):
    proc = subprocess.run(
        [sys.executable, tool, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = {line.split(":")[0].strip(): line for line in proc.stdout.splitlines()}
    for f in sections.keys(section):
        assert f.metadata["doc"] in lines[f"--{f.name}"]


def test_override_flags_default_to_the_run_and_are_checked():
    flag_values = flags.FlagValues()
    cli.define_section_flags(EvalSettings, flag_values)
    flag_values(["prog", "--mc_num=64", "--tasks=a,b"])
    assert cli.overrides_from_flags(EvalSettings, flag_values) == {
        "mc_num": 64,
        "tasks": ("a", "b"),
    }
    flag_values(["prog", "--limit=-1"])
    with pytest.raises(ValueError, match=r"^--limit=-1 is invalid"):
        cli.overrides_from_flags(EvalSettings, flag_values)


def test_sample_flags_default_to_the_run_and_errors_name_the_flag():
    """A tool's sampler is the run's sample section with the flags given replaced; an error
    names the flags, saying which ones the user left to the run."""
    flag_values = flags.FlagValues()
    cli.define_section_flags(sampling.SampleSettings, flag_values)
    run_settings = sampling.SampleSettings(gen_length=32, steps=16, block_length=8, temperature=0.8)
    flag_values(["prog", "--steps=32"])
    settings = cli.section_with_flags(run_settings, flag_values)
    assert settings == dataclasses.replace(run_settings, steps=32)
    assert cli.section_with_flags(run_settings, flag_values, block_length=4).block_length == 4

    flag_values(["prog", "--gen_length=12", "--block_length=5"])
    with pytest.raises(ValueError) as e:
        cli.section_with_flags(run_settings, flag_values)
    assert str(e.value) == "--block_length=5 does not divide --gen_length=12"
    flag_values.unparse_flags()
    flag_values(["prog", "--gen_length=12"])
    with pytest.raises(ValueError) as e:
        cli.section_with_flags(run_settings, flag_values)
    assert str(e.value) == (
        "--block_length=8 does not divide --gen_length=12 "
        "(--block_length: the run's sample.block_length)"
    )


def test_lm_eval_refuses_an_unknown_model_arg():
    from llada_jax import lm_eval_model

    with pytest.raises(ValueError, match="model_args top_k=5 is not a model argument"):
        lm_eval_model.split_section_args({"top_k": 5})
    with pytest.raises(ValueError, match="not a valid float"):
        lm_eval_model.split_section_args({"temperature": "hot"})
    with pytest.raises(ValueError, match="model_args: matmul='blas' is invalid"):
        lm_eval_model.split_section_args({"matmul": "blas"})
    assert lm_eval_model.split_section_args({"matmul": "xla", "threshold": 0.9}) == (
        {"threshold": 0.9},
        {"matmul": "xla"},
    )


def test_shape_keys_come_from_the_model_section():
    assert set(ModelConfig.shape_keys()) == {
        "vocab_size",
        "d_model",
        "n_layers",
        "n_heads",
        "n_kv_heads",
        "head_dim",
        "mlp_hidden",
        "tie_embeddings",
        "qkv_bias",
        "qk_norm",
        "scan_layers",
        "param_dtype",
    }


def test_optional_keys_come_from_the_sections():
    assert config.OPTIONAL_KEYS == {"checkpoint.max_to_keep": int, "checkpoint.keep_every": int}
    c = config.load("configs/tiny.py", [("checkpoint.max_to_keep", "None")])
    assert c.checkpoint.max_to_keep is None
    config.check(c)


@pytest.mark.parametrize(
    "key,message",
    [
        ("model.attention", "config key 'model.attention' is now 'kernels.attention'"),
        ("model.mask_id", "config key 'model.mask_id' is now 'tokens.mask_id'"),
    ],
)
def test_a_moved_key_says_where_it_went(key, message):
    with pytest.raises(config.ConfigError, match=message):
        config.load("configs/tiny.py", [(key, "1")])


def test_a_config_saved_before_the_move_is_read_into_the_new_sections():
    saved = config.base_config().to_dict()
    saved["model"].update(attention="splash", matmul="xla", mask_id=7, eos_id=2)
    del saved["kernels"], saved["tokens"]
    cfg = inference.saved_config(saved)
    assert (cfg.kernels.attention, cfg.kernels.matmul) == ("splash", "xla")
    assert (cfg.tokens.mask_id, cfg.tokens.eos_id, cfg.tokens.eot_id) == (7, 2, -1)
    assert "attention" in saved["model"]  # the saved dict is left as it was


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("data.batch_size", "0", "data.batch_size=0 is invalid; valid: an integer >= 1"),
        ("checkpoint.max_to_keep", "0", "checkpoint.max_to_keep=0 is invalid"),
        ("eval.objective_draws", "1", "eval.objective_draws=1 is invalid; valid: 0 (off) or >= 2"),
        ("train.profile_steps", "(1, -1)", "train.profile_steps=(1, -1) is invalid"),
        ("tokens.mask_id", "-3", "tokens.mask_id=-3 is invalid"),
        ("kernels.matmul", "blas", "kernels.matmul='blas' is invalid; valid choices"),
        ("sample.block_length", "5", "sample.block_length=5 does not divide sample.gen_length=16"),
    ],
)
def test_check_names_the_key_of_any_section(key, value, message):
    c = config.load("configs/tiny.py", [(key, value)])
    with pytest.raises(sections.SettingError) as e:
        config.check(c)
    assert str(e.value).startswith(message)
