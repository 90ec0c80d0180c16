"""The trainer's command line: the run built from the config, trained (llada_jax/train/loop.py),
then the end-of-run report (llada_jax/end_of_run.py: samples, held-out bound).

  python -m llada_jax.train --config=configs/demo.py[:variant] --workdir=DIR [--config.key=value]
      [--coordinator=HOST:PORT --num_processes=N --process_id=I]

Multi-process runs: see llada_jax/host/distributed.py (TPU pods and SLURM are detected). Exit
codes: 0 done (or stopped by SIGTERM after saving), 1 a save failed, 2 bad input, 3 too many
non-finite steps in a row, 130 SIGINT.
"""

import os
import signal
import sys

if __name__ == "__main__":  # before the slow imports: a SIGTERM while they run exits 0
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))

from absl import flags  # noqa: E402

from llada_jax import checkpoint, end_of_run, files, writer_lock  # noqa: E402
from llada_jax import config as config_lib  # noqa: E402
from llada_jax.host import compilation_cache, distributed, xla_flags  # noqa: E402
from llada_jax.host import memory as host_memory  # noqa: E402
from llada_jax.run import build_run  # noqa: E402
from llada_jax.train import loop  # noqa: E402

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line's flags (--config, --workdir and the distributed ones), defined by `main`
    (importing this module defines none); a second call does nothing."""
    config_lib.define_flags()
    distributed.define_flags()
    if "workdir" not in FLAGS:
        flags.DEFINE_string("workdir", None, "Directory for config.json, metrics and checkpoints")


def main(argv: list[str]) -> int:
    """Command-line entry point; returns the exit code."""
    signals = loop.StopSignals()  # first of all: a SIGTERM during start-up exits 0
    xla_flags.apply_defaults()
    define_flags()
    try:
        cfg = config_lib.from_command_line(argv, __doc__)
        if cfg.train.keep_host_memory:  # before JAX starts its backend
            host_memory.keep_freed_memory()
        compilation_cache.enable(cfg.train.compilation_cache)  # before the first compilation
        if not FLAGS.workdir:
            raise ValueError("--workdir=DIR is required")
        distributed.initialize()
        run = build_run(cfg, workdir=FLAGS.workdir)
        trained = loop.train(run, signals)
        # Every process takes part (the parameters are sharded over all of them); process 0
        # prints. The stop flags are the same on every process (agreed in the loop).
        if not (signals.terminate or signals.interrupt):
            end_of_run.report(run, trained.params)
    except checkpoint.SaveFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError, flags.Error, writer_lock.WorkdirBusy) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # writing config.json, metrics or the lock (e.g. a full disk)
        print(f"error: {files.write_error(e, FLAGS.workdir)}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:  # a second SIGINT, or one outside the training loop
        print("interrupted", file=sys.stderr)
        return 130
    if signals.interrupt:  # the save in flight has finished (train's `with` blocks)
        print("interrupted: stopped after the step the SIGINT came in", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
