"""Config files, variants and command-line overrides."""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import pytest
from flax import nnx

from llada_jax import config, optim, sections, sharding
from llada_jax.model import ModelConfig, Transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("name", ["tiny", "demo", "llada_1b", "llada_8b"])
def test_every_config_and_variant_loads_and_validates(name):
    """The file alone and with each of its own variants (demo.py:quick once set fewer steps
    than its warmup + decay, which the trainer refused)."""
    path = f"configs/{name}.py"
    spec = importlib.util.spec_from_file_location("config_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for variant in ["", *module.VARIANTS]:
        c = config.load(f"{path}:{variant}", [])
        config.check(c)
        optim.make_optimizer(c.optim, c.train.steps)


def test_base_config_alone_is_valid():
    """What a converted checkpoint's config starts from: tools/sample.py and evaluate build
    its run."""
    c = config.base_config()
    config.check(c)
    optim.make_optimizer(c.optim, c.train.steps)


@pytest.mark.parametrize("name,params", [("llada_1b", 1.49e9), ("llada_8b", 8.02e9)])
def test_paper_parameter_counts(name, params):
    """Counted from the abstract model (nothing allocated) against the paper's Table 5."""
    cfg = sections.from_section(ModelConfig, config.load(f"configs/{name}.py", []).model)
    with sharding.use_mesh(sharding.make_mesh((1, -1, 1))):
        model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    count = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert abs(count - params) / params < 0.005, count


def test_llada_8b_schedule_in_steps():
    c = config.load("configs/llada_8b.py", [])
    tokens_per_step = 4096 * 1280
    assert c.data.seq_len * c.data.batch_size == tokens_per_step
    assert c.train.steps == round(2.3e12 / tokens_per_step) == 438690
    assert c.optim.lr_drops == ((round(1.2e12 / tokens_per_step), 1e-4),)
    assert c.optim.decay_steps == round(0.3e12 / tokens_per_step)
    assert (c.optim.lr, c.optim.warmup_steps, c.optim.final_lr, c.optim.weight_decay) == (
        4e-4,
        2000,
        1e-5,
        0.1,
    )


def test_overrides_are_typed():
    c = config.load(
        "configs/tiny.py",
        [
            ("model.d_model", "128"),
            ("optim.lr", "1"),
            ("model.causal", "true"),
            ("mesh.shape", "(2,2,2)"),
            ("model.remat", "full"),
            ("sample.prompts", "('a','b')"),
        ],
    )
    assert c.model.d_model == 128 and c.optim.lr == 1.0 and isinstance(c.optim.lr, float)
    assert c.model.causal is True and c.mesh.shape == (2, 2, 2) and c.model.remat == "full"
    assert c.sample.prompts == ("a", "b")


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("model.d_model", "abc", "config.model.d_model='abc' is not a valid int"),
        ("model.d_model", "1.5", "config.model.d_model=1.5 is not a valid int"),
        ("model.causal", "3", "config.model.causal=3 is not a valid bool"),
        (
            "model.bogus",
            "1",
            "unknown config key 'model.bogus'; valid keys here: causal, d_model, dtype",
        ),
        (
            "modle.d_model",
            "1",
            "unknown config key 'modle'; valid keys here: checkpoint, data, diffusion",
        ),
        ("model", "1", "unknown config key 'model'"),
    ],
)
def test_bad_overrides(key, value, message):
    with pytest.raises(config.ConfigError) as e:
        config.load("configs/tiny.py", [(key, value)])
    assert message in str(e.value)


def test_variants_compose_and_unknown_lists_valid():
    c = config.load("configs/demo.py:cosine+stratified+quick", [])
    assert (c.diffusion.schedule, c.diffusion.t_sampling, c.train.steps) == (
        "cosine",
        "stratified",
        30,
    )
    with pytest.raises(
        config.ConfigError,
        match="unknown config variant 'huge'; valid variants: "
        "14m, ablation, bell, bf16, complementary, cosine, linear, long, poly2, quick, stratified",
    ):
        config.load("configs/demo.py:huge", [])


def test_missing_file_and_locked_config():
    with pytest.raises(config.ConfigError, match="'configs/nope.py' does not exist"):
        config.load("configs/nope.py", [])
    c = config.load("configs/tiny.py", [])
    with pytest.raises(AttributeError):
        c.model.new_key = 1


def test_split_overrides():
    rest, overrides = config.split_overrides(["--workdir=x", "--config.a.b=1=2", "--config=c.py"])
    assert rest == ["--workdir=x", "--config=c.py"] and overrides == [("a.b", "1=2")]
    with pytest.raises(config.ConfigError, match="needs a value"):
        config.split_overrides(["--config.a.b"])


# Run in a fresh interpreter: the library's modules, imported by a host program with absl flags
# of its own (big_vision, a notebook), define none of theirs; the command line defines them.
IMPORTS_DEFINE_NO_FLAGS = """
import json
from absl import flags
before = set(flags.FLAGS)
import llada_jax.config, llada_jax.evaluate, llada_jax.inference, llada_jax.lm_eval_model
import llada_jax.train
from llada_jax.host import distributed
added = set(flags.FLAGS) - before
ours = sorted(m for m in flags.FLAGS.flags_by_module_dict() if m.startswith("llada_jax"))
ours_added = sorted(
    added & {"config", "workdir", "coordinator", "num_processes", "process_id", "distributed"}
)
# The host's own --config and --workdir, parsed as it defines them.
flags.DEFINE_integer("config", 7, "the host's config")
flags.DEFINE_string("workdir", "host", "the host's workdir")
flags.FLAGS(["host", "--config=3"])
host = [flags.FLAGS.config, flags.FLAGS.workdir]
# The trainer's command line defines its flags (once, however often asked) in a FlagValues
# of its own here, as main does in the global one.
trainer = flags.FlagValues()
llada_jax.config.define_flags(trainer)
llada_jax.config.define_flags(trainer)
distributed.define_flags(trainer)
distributed.define_flags(trainer)
print(json.dumps({"modules": ours, "names": ours_added, "host": host, "trainer": sorted(trainer)}))
"""


def test_importing_the_library_defines_no_absl_flags():
    proc = subprocess.run(
        [sys.executable, "-c", IMPORTS_DEFINE_NO_FLAGS],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["modules"] == [] and got["names"] == [], got
    assert got["host"] == [3, "host"]
    assert got["trainer"] == sorted(
        ["config", "coordinator", "num_processes", "process_id", "distributed"]
    )


def test_trainer_command_line_defines_its_flags():
    """`python -m llada_jax.train` knows --config, --workdir and the distributed flags (the
    launchers pass them): a bad --process_id is its one-line error, not an unknown flag."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "llada_jax.train",
            "--config=configs/tiny.py",
            "--workdir=/nonexistent/run",
            "--coordinator=127.0.0.1:1",
            "--num_processes=2",
            "--process_id=2",
            "--distributed",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert proc.stderr.strip() == "error: --process_id=2 must be in [0, --num_processes=2)"
