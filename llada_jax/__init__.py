"""llada-jax: pretrain, fine-tune, sample from and evaluate masked-diffusion language models.

Where each concept lives, by layer:
- The method (pure functions of arrays and keys, no platform): `model` (the transformer),
  `diffusion` (noise schedules, t-sampling, masking, the losses; block diffusion), `sampling`
  (the reverse process, its K/V caches), `block_sampling` (a block-diffusion model's reverse
  process, block by block with an exact K/V cache), `likelihood` (Monte-Carlo NLL bounds),
  `guidance` (classifier-free guidance, for both), `optim` (optimizer, LR schedules),
  `train_step` (the jitted step), `special_ids` (the mask, EOS, end-of-turn and pad ids).
- Config sections: `sections` (a section as a frozen dataclass: each key's type, default,
  description and checks, written once); each lives beside its reader (`model.ModelConfig`,
  `diffusion.DiffusionConfig`, `sampling.SampleSettings`, ..., `run_sections` for the runner's)
  and `config.SECTIONS` lists them.
- The runner: `run` (`build_run`: a run's objects from its config), `train` (the loop),
  `end_of_run` (the trainer's closing samples and bound), `inference` (a checkpoint loaded for
  sampling), `evaluate` (the evaluation job), `lm_eval_model` (the lm-evaluation-harness
  model), `sweep` (ablation grids), `compare` (runs compared with standard errors), `config`
  (base_config, variants, overrides), `cli` (tools' flags from a section, --help),
  `checkpoint`, `metrics`, `files`, `sharding`, `profiling` (profiler traces), `data/`
  (tokenizers, prepared shards and held-out splits, grain pipelines, SFT), `convert/` (Hugging
  Face import, export).
- The platform: `kernels/` (matmul and attention implementations, chosen once per model by
  `kernels.select` from the `kernels` section), `host/` (XLA flags, malloc settings, cache
  directories, the compilation cache, multi-process start and the decisions processes take
  together).
"""
