"""The end-of-run report of a training run: samples from the config's prompts (and, on the
shipped corpus, how much they read like it), the held-out NLL bound, and the untrained model's
figures beside them (`train.compare_untrained`).

  end_of_run.report(run, params)   # on every process; process 0 prints

Every process of a multi-process run calls it: the parameters are sharded over all of them, so
the sampler and the scorer run on the run's mesh.
"""

from __future__ import annotations

import time
from typing import Any

import jax

from llada_jax import evaluate, inference, likelihood, sharding
from llada_jax.data.corpus import read_default_corpus
from llada_jax.run import Run, init_params
from llada_jax.sample_stats import CorpusVocabulary, sample_stats


def report(run: Run, params: Any) -> None:
    """Prints what the config's `sample.num_samples` and `train.final_bound` ask for, with the
    untrained parameters' figures beside them when `train.compare_untrained`."""
    # The untrained parameters (the run's initialization) once, for both comparisons.
    untrained = init_params(run)[1] if run.train_cfg.compare_untrained else None
    if run.printed_samples.num_samples > 0:
        print_samples(run, params, untrained)
    if run.train_cfg.final_bound:
        print_held_out_bound(run, params, untrained)


def say(*lines: str) -> None:
    """Prints on process 0 only (every process computes what it reports)."""
    if jax.process_index() == 0:
        print(*lines, sep="\n", flush=True)


def print_samples(run: Run, params: Any, untrained: Any | None = None) -> None:
    """Generates from the config's prompts on the run's mesh and prints them. On the shipped
    corpus also how much they read like it (llada_jax/sample_stats.py), and given `untrained`
    parameters the same figures for their samples. Every process calls it."""
    s, printed, tok, mesh = run.sample_settings, run.printed_samples, run.tokenizer, run.mesh
    prompts = [tok.encode(p) for p in list(printed.prompts)[: printed.num_samples]]
    ids, valid = inference.left_pad(prompts, tok.pad_id)
    ids, valid, _ = inference.pad_batch(ids, valid, sharding.data_parallel_size(mesh))
    ids_BxP, valid_BxP = sharding.to_devices(ids, mesh), sharding.to_devices(valid, mesh)
    sample = inference.make_sampler(run, run.sample_settings)

    def generate(params: Any) -> list[str]:
        """The completions of the prompts by `params`, decoded (one string each, the prompt
        excluded)."""
        canvas_BxT = sample(params, ids_BxP, valid_BxP, jax.random.key(run.cfg.seed))[0]
        out = sharding.to_host(canvas_BxT)
        return [tok.decode(row[ids.shape[1] :]) for row in out[: len(prompts)].tolist()]

    t = time.perf_counter()
    texts = generate(params)
    say(f"samples ({s.steps} steps, {s.gen_length} tokens, {time.perf_counter() - t:.1f}s):")
    for p, text in zip(prompts, texts):
        say(f"--- {tok.decode(p)!r} ->\n{tok.decode(p)}{text}")
    if run.data_cfg.datasets:  # the figures compare with the shipped corpus
        return
    corpus = CorpusVocabulary.of([read_default_corpus()])
    say(f"sample words, trained:   {sample_stats(texts, corpus).line()}")
    if untrained is not None:
        texts = generate(untrained)
        say(f"sample words, untrained: {sample_stats(texts, corpus).line()}")


def print_held_out_bound(run: Run, params: Any, untrained: Any | None = None) -> None:
    """Prints the evaluation job's NLL bound of the trained parameters on the run's held-out
    data (the eval section's tokens, masks and seed), and given `untrained` parameters theirs
    beside it, scored on the run's mesh. Every process calls it."""
    settings = evaluate.bound_settings(run, run.eval_settings)
    try:
        rows_RxL, _ = evaluate.held_out_rows(run, settings.num_tokens)
    except ValueError as e:
        say(f"held-out bound: skipped ({e})")
        return
    scorer = evaluate.make_scorer(run, settings)
    batch_size = evaluate.rounded_batch_size(settings, run.mesh)

    def bound(params: Any) -> str:
        """The held-out NLL bound of `params` as text: nats per token +- its standard error, and
        bits per token."""
        samples = evaluate.score_rows(scorer, params, rows_RxL, settings, batch_size)
        est = likelihood.estimate(samples, rows_RxL.size)
        return (
            f"{est.nll_per_token:.3f} +- {est.stderr_per_token:.3f} nats/token "
            f"({est.bits_per_token:.3f} bits)"
        )

    line = f"held-out bound ({rows_RxL.size} tokens, {settings.num_samples} masks per row): "
    line += f"trained {bound(params)}"
    if untrained is not None:
        line += f", untrained {bound(untrained)}"
    say(line)
