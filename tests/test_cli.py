"""--help on every tool and launcher: exit 0, its flags with their help, and for the tools (absl
flags) their own usage, the module docstring; the launchers' comes from argparse."""

import ast
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Each command line, and flags its --help must list.
COMMANDS = {
    "tools/sample.py": ["--workdir", "--gen_length", "--kv_cache"],
    "tools/evaluate.py": ["--workdir", "--watch", "--mc_num"],
    "tools/convert_hf.py": ["--hf_dir", "--export"],
    "tools/compare_runs.py": ["--output"],
    "tools/benchmark.py": ["--mode", "--config"],
    "tools/aot_compile.py": ["--topology", "--config"],
    "tools/prepare_data.py": ["--input", "--output_dir", "--validation_fraction"],
    "tools/train_tokenizer.py": ["--input", "--vocab_size"],
    "tools/lm_eval_harness.py": ["--model_args"],
    "-m llada_jax.train": ["--workdir", "--config", "--coordinator"],
    "launch/local.py": ["--num_processes"],
    "launch/slurm.py": ["--nodes"],
    "launch/sweep.py": ["--sweep_dir"],
    "launch/tpu_pod.py run": ["--name", "--zone"],
}


def first_line_of_doc(command: str) -> str:
    path = command.split()[0]
    if path == "-m":
        path = "llada_jax/train/__main__.py"
    return ast.get_docstring(ast.parse(open(os.path.join(ROOT, path)).read())).splitlines()[0]


def test_every_command_prints_its_usage_and_flags():
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    procs = {
        command: subprocess.Popen(
            [sys.executable, *command.split(), "--help"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for command in COMMANDS
    }
    for command, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, (command, err[-2000:])
        for flag in COMMANDS[command]:
            assert flag in out, (command, flag, out[-2000:])
        if command.startswith(("tools/", "-m")) and "lm_eval_harness" not in command:
            assert first_line_of_doc(command) in " ".join(out.split()), (command, out[:500])
