"""The trainer: `loop.py` is the training loop; `python -m llada_jax.train` (`__main__.py`) is its
command line.

  python -m llada_jax.train --config=configs/demo.py[:variant] --workdir=DIR [--config.key=value]
      [--coordinator=HOST:PORT --num_processes=N --process_id=I]

This file imports nothing, so that the command line can set its SIGTERM handler before the slow
imports.
"""
