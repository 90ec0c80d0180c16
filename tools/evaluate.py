"""Evaluate a run's checkpoints: the NLL bound on held-out data, and samples.

  python tools/evaluate.py --workdir=DIR [--step=N | --watch [--poll_sec=10 --idle_timeout=0]]
      [--num_tokens=N --num_samples=N --batch_size=N --seed=N --generate=true|false]
      [--tasks=hellaswag,arc_easy --task_dir=MY_TASKS --limit=N --mc_num=128 ... every key of
       a config's eval section]
      [--num_devices=N --fsdp] [--progress=true|false]

Without --step or --watch, evaluates the latest complete checkpoint. --watch evaluates every
complete checkpoint not evaluated yet, then each new one as training writes it, until the run's
last step is done (or --idle_timeout seconds pass with no new checkpoint). Each step's result
goes to DIR/eval/step_<N>.json (NLL bound in nats and bits per token with its standard error,
tokens scored, generation texts, model calls and tokens/s, each lm-eval task's metrics) and to
TensorBoard under DIR/tensorboard (eval/...), and one summary line is printed. Steps with a
result file are skipped, so a killed evaluation picks up where it stopped (--step=N evaluates N
again). --tasks runs lm-evaluation-harness tasks (the `eval` extra) through the llada_jax model
on the same parameters; an unknown task is one error line before anything runs.

The data is the held-out split of the run's own datasets (the shipped corpus holds three books
out of training; a prepared directory needs tools/prepare_data.py --validation_fraction). The
settings default to the run config's eval section. The job runs on its own devices (the first
--num_devices local ones; default all), restoring the parameters onto them (replicated, or with
--fsdp sharded as FSDP training shards them) whatever mesh trained them, and never takes the
trainer's lock. Bad flags or a workdir without checkpoints: one error line, exit 2.
"""

from __future__ import annotations

import os
import sys

import jax
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llada_jax import cli, evaluate  # noqa: E402
from llada_jax.host import memory as host_memory  # noqa: E402
from llada_jax.host import xla_flags  # noqa: E402
from llada_jax.kernels import KernelConfig  # noqa: E402
from llada_jax.run_sections import EvalSettings  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A workdir holding checkpoints (trained or converted).")
flags.DEFINE_integer("step", None, "Evaluate this checkpoint step (again, if already done).")
flags.DEFINE_bool("watch", False, "Evaluate every checkpoint once, as training writes them.")
flags.DEFINE_float("poll_sec", 10.0, "--watch: seconds between looks for new checkpoints.")
flags.DEFINE_float(
    "idle_timeout", 0.0, "--watch: stop after this long with nothing new (0: never)."
)
cli.define_section_flags(EvalSettings)  # --num_tokens, --mc_num, ...
cli.define_section_flags(KernelConfig)  # --matmul, --attention
flags.DEFINE_integer("num_devices", 0, "Evaluate on the first N local devices (0: all).")
flags.DEFINE_bool("fsdp", False, "Shard the weights over the devices as FSDP training does.")
flags.DEFINE_bool("progress", True, "Show progress bars.")


def check_flags() -> None:
    if not FLAGS.workdir:
        raise ValueError("--workdir=DIR is required")
    if FLAGS.watch and FLAGS.step is not None:
        raise ValueError("--step and --watch exclude each other: give one")
    if FLAGS.poll_sec <= 0 or FLAGS.idle_timeout < 0:
        raise ValueError(
            f"--poll_sec={FLAGS.poll_sec} and --idle_timeout={FLAGS.idle_timeout} must be > 0 "
            "and >= 0 seconds"
        )
    if not 0 <= FLAGS.num_devices <= len(jax.local_devices()):
        raise ValueError(
            f"--num_devices={FLAGS.num_devices} is invalid; valid: 0 (all) .. "
            f"{len(jax.local_devices())} (the local devices)"
        )


def run(argv: list[str]) -> list[dict]:
    cli.parse(argv, __doc__)
    check_flags()
    overrides = cli.overrides_from_flags(EvalSettings)
    kernels = cli.overrides_from_flags(KernelConfig)
    devices = jax.local_devices()[: FLAGS.num_devices or None]

    def make(step: int | None) -> evaluate.Evaluator:
        return evaluate.Evaluator(
            FLAGS.workdir,
            devices,
            step=step,
            fsdp=FLAGS.fsdp,
            progress=FLAGS.progress,
            log=lambda line: print(line, flush=True),
            kernels=kernels,
            **overrides,
        )

    if FLAGS.watch:  # beside a trainer that may not have saved yet, and removes old steps
        evaluator = evaluate.open_watched(FLAGS.workdir, make, FLAGS.poll_sec, FLAGS.idle_timeout)
    else:
        evaluator = make(FLAGS.step)
    try:
        if FLAGS.watch:
            return evaluate.watch(evaluator, FLAGS.poll_sec, FLAGS.idle_timeout)
        result = evaluator.evaluate(evaluator.model.step)
        print(evaluate.summary_line(result), flush=True)
        return [result]
    finally:
        evaluator.close()


def main(argv: list[str]) -> int:
    xla_flags.apply_defaults()
    host_memory.keep_freed_memory()  # before JAX starts its backend
    try:
        run(argv)
    except (ValueError, FileNotFoundError, flags.Error) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
