"""The lm-evaluation-harness model: its estimate against exact enumeration on a real checkpoint,
and lm-eval running local JSONL tasks (multiple choice, perplexity, generation) through it."""

import itertools
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from llada_jax.lm_eval_model import LLaDAJaxLM, cut

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ["HF_DATASETS_OFFLINE"] = "1"  # local files only


class Request:
    def __init__(self, *args):
        self.args = args


@pytest.fixture(scope="module")
def workdir(tiny_run):
    return tiny_run  # only read; a test that writes into it copies it


@pytest.fixture(scope="module")
def lm(workdir):
    return LLaDAJaxLM(workdir=workdir, mc_num=16, batch_size=32, progress=False)


def exact_bound(model, ctx, cont):
    """E over l ~ U{1..T} and every l-subset of the continuation of (T / l) sum -log p, by
    enumeration with the model called directly."""
    net = nnx.merge(model.graphdef, model.params)
    mask_id = model.run.tokenizer.mask_id
    t, total = len(cont), 0.0
    for count in range(1, t + 1):
        subsets = list(itertools.combinations(range(t), count))
        for s in subsets:
            x = np.array(ctx + cont)
            x[[len(ctx) + i for i in s]] = mask_id
            logits = np.asarray(net(x[None], np.ones((1, len(x)), bool)), np.float64)[0]
            z = logits - logits.max(-1, keepdims=True)
            logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
            nll = -sum(logp[len(ctx) + i, cont[i]] for i in s)
            total += (1 / t) / len(subsets) * (t / count) * nll
    return total


def test_loglikelihood_is_the_conditional_bound_by_exact_enumeration(workdir, lm):
    many = LLaDAJaxLM(model=lm.model, mc_num=512, batch_size=64, progress=False)
    context, continuation = "And the LORD said", " unto Moses"
    ctx, cont = many.encode_pair(context, continuation)
    assert 2 <= len(cont) <= 5 and many.tok.decode(cont) == " unto Moses"
    exact = exact_bound(lm.model, ctx, cont)
    rows = many.score_rows([(ctx + cont, len(cont))], "test")
    stderr = rows.std(ddof=1) / math.sqrt(rows.shape[1])
    ((ll, greedy),) = many.loglikelihood([Request(context, continuation)])
    assert ll == pytest.approx(-rows.mean()) and greedy is False
    assert abs(-ll - exact) < 4 * stderr and stderr < 0.05 * exact, (ll, exact, stderr)
    # A trailing space of the context moves to the continuation; the same request alone or in a
    # batch with others (other lengths) gets the same masks.
    assert many.encode_pair("And the LORD said ", "unto Moses") == (ctx, cont)
    batch = many.loglikelihood(
        [Request("In the beginning", " God"), Request(context, continuation), Request("", "Amen")]
    )
    assert batch[1][0] == ll


@pytest.mark.parametrize("cfg_scale", [0.0, 1.5])
def test_the_windowed_head_scores_as_the_full_head(lm, cfg_scale):
    """The output head on a 16-wide window from each row's first target: the same samples as
    the head on every position, for rows whose targets end anywhere (the window moved left to
    fit at the row's end), with and without guidance."""
    guided = LLaDAJaxLM(model=lm.model, mc_num=4, batch_size=8, cfg_scale=cfg_scale, progress=False)
    rng = np.random.default_rng(0)
    length, rows = (
        48,
        [(5, 3), (20, 16), (48, 9), (47, 1), (30, 30 - 14), (16, 16), (33, 2), (9, 4)],
    )
    tokens, target, valid = (np.zeros((8, length), t) for t in (np.int32, bool, bool))
    for b, (n_ids, n_targets) in enumerate(rows):
        tokens[b, :n_ids] = rng.integers(5, 4000, n_ids)
        valid[b, :n_ids] = True
        target[b, n_ids - min(n_targets, 16) : n_ids] = True
    args = (tokens, target, valid, np.arange(8, dtype=np.int32), np.arange(8, dtype=np.int32) % 4)
    full = np.asarray(guided.scorer(0)(lm.model.params, *args))
    windowed = np.asarray(guided.scorer(16)(lm.model.params, *args))
    assert (full > 0).all()
    np.testing.assert_allclose(windowed, full, rtol=2e-5)


def test_rolling_loglikelihood_sums_windows_over_a_long_text(lm):
    text = "And God said, Let there be light: and there was light. " * 12
    ids = lm.tok.encode(text)
    assert len(ids) + 1 > lm.max_length  # longer than the context: several windows
    (total,) = lm.loglikelihood_rolling([Request(text)])
    windows = LLaDAJaxLM(model=lm.model, mc_num=16, max_length=10_000, progress=False)
    (whole,) = windows.loglikelihood_rolling([Request(text)])
    per_token = total / len(ids)
    assert -9.0 < per_token < -5.0  # a young model: near log(1 / 4096) = -8.3
    assert total != whole and abs(total - whole) / len(ids) < 1.0


def test_cut_at_the_first_stop_string():
    assert cut("In the beginning. God said", [".", "God"]) == "In the beginning"
    assert cut("no stop here", ["\n\n"]) == "no stop here"


def _write_tasks(directory, data):
    mc = [
        {
            "question": "In the beginning God created the",
            "choices": [" heaven", " sandwich"],
            "answer": 0,
        },
        {
            "question": "And the LORD said unto",
            "choices": [" Moses", " the xylophone"],
            "answer": 0,
        },
        {"question": "Blessed are the", "choices": [" meek", " qwerty"], "answer": 0},
    ]
    ppl = [{"text": "In the beginning God created the heaven and the earth."}, {"text": "Amen."}]
    gen = [{"prompt": "And the LORD said unto", "target": " Moses"}]
    files = {}
    for name, rows in (("mc", mc), ("ppl", ppl), ("gen", gen)):
        files[name] = os.path.join(data, f"{name}.jsonl")
        with open(files[name], "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    head = "dataset_path: json\ntest_split: train\n"
    tasks = {
        "kjv_mc": f"task: kjv_mc\n{head}dataset_kwargs:\n  data_files: {files['mc']}\n"
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
        "metric_list:\n  - metric: acc\n",
        "kjv_ppl": f"task: kjv_ppl\n{head}dataset_kwargs:\n  data_files: {files['ppl']}\n"
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n",
        "kjv_gen": f"task: kjv_gen\n{head}dataset_kwargs:\n  data_files: {files['gen']}\n"
        "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{target}}'\n"
        "generation_kwargs:\n  until: ['.']\n  max_gen_toks: 8\n"
        "metric_list:\n  - metric: exact_match\n",
    }
    for name, text in tasks.items():
        with open(os.path.join(directory, f"{name}.yaml"), "w") as f:
            f.write(text)
    return mc, ppl


def test_lm_eval_runs_local_tasks_through_the_registered_model(lm, tmp_path):
    import lm_eval
    from lm_eval.tasks import TaskManager

    mc, ppl = _write_tasks(str(tmp_path), str(tmp_path))
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=["kjv_mc", "kjv_ppl", "kjv_gen"],
        task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
        log_samples=False,
    )["results"]
    # Accuracy: what our own loglikelihood picks for each question.
    picks = [
        int(
            np.argmax(
                [
                    ll
                    for ll, _ in lm.loglikelihood([Request(d["question"], c) for c in d["choices"]])
                ]
            )
        )
        for d in mc
    ]
    assert out["kjv_mc"]["acc,none"] == pytest.approx(
        np.mean([p == d["answer"] for p, d in zip(picks, mc)])
    )
    # Word perplexity: exp(-sum of the rolling loglikelihoods / words).
    lls = lm.loglikelihood_rolling([Request(d["text"]) for d in ppl])
    words = sum(len(d["text"].split()) for d in ppl)
    assert out["kjv_ppl"]["word_perplexity,none"] == pytest.approx(math.exp(-sum(lls) / words))
    assert "exact_match,none" in out["kjv_gen"]


@pytest.mark.slow
def test_lm_eval_command_line_with_the_model_registered(workdir, tmp_path):
    _write_tasks(str(tmp_path), str(tmp_path))
    cmd = [
        sys.executable,
        "tools/lm_eval_harness.py",
        "run",
        "--model=llada_jax",
        f"--model_args=workdir={workdir},mc_num=4,batch_size=8,progress=False",
        "--tasks=kjv_mc",
        f"--include_path={tmp_path}",
        f"--output_path={tmp_path / 'out'}",
    ]
    env = dict(os.environ, HF_DATASETS_OFFLINE="1")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "kjv_mc" in proc.stdout and "acc" in proc.stdout


@pytest.mark.slow
def test_evaluate_runs_tasks_on_the_checkpoint_and_refuses_unknown_ones(tiny_copy, tmp_path):
    workdir = tiny_copy
    _write_tasks(str(tmp_path), str(tmp_path))
    base = [sys.executable, "tools/evaluate.py", f"--workdir={workdir}", "--num_tokens=128"]
    base += ["--num_samples=2", "--generate=false", "--progress=false", f"--task_dir={tmp_path}"]
    env = dict(os.environ, HF_DATASETS_OFFLINE="1")
    proc = subprocess.run(
        base + ["--tasks=kjv_mc", "--mc_num=4"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(workdir, "eval", "step_6.json")) as f:
        result = json.load(f)
    assert 0 <= result["tasks"]["kjv_mc"]["acc,none"] <= 1 and "kjv_mc: acc,none" in proc.stdout
    proc = subprocess.run(
        base + ["--tasks=kjv_mc,no_such_task"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "unknown task 'no_such_task'" in lines[0], proc.stderr[-2000:]
