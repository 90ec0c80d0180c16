"""The lm-evaluation-harness model: its estimate against exact enumeration on a real checkpoint,
packed and unpacked layouts, and lm-eval running local JSONL tasks (multiple choice, perplexity,
generation) through it."""

import argparse
import itertools
import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from llada_jax import likelihood
from llada_jax.lm_eval_model import (
    ALTERNATIVES,
    LLaDAJaxLM,
    cut,
    layout,
    request_id,
    set_cli_batch_size,
)

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


def test_one_token_choices_of_a_context_are_scored_from_one_slot(lm):
    """Multiple choice by letter: requests of one-token continuations after the same context
    have one model input (the context, then a mask); up to 1 + ALTERNATIVES of them are scored
    from one slot, each -log p(its token | the context, a mask) as the model computes it directly
    (exact: one target, every sample masks it). Other requests score as they do alone."""
    ctx = lm.tok.encode("And the LORD said unto Moses")
    choices = [5, 17, 42, 99, 123, 7]  # more than 1 + ALTERNATIVES: two groups
    rows = [(ctx + [c], 1) for c in choices] + [(ctx[:-1] + [c], 1) for c in choices[:2]]
    rows.append((ctx + [3, 4], 2))
    _, pairs, _, shared = lm.plan(rows)
    assert shared == {0: [1, 2, 3, 4], 6: [7]}
    assert sorted({i for i, _ in pairs}) == [0, 5, 6, 8]
    samples = lm.score_rows(rows, "test")
    for i, (ids, _) in enumerate(rows[:8]):
        assert (samples[i] == samples[i, 0]).all()
        assert samples[i, 0] == pytest.approx(exact_bound(lm.model, ids[:-1], ids[-1:]), rel=1e-5)
    np.testing.assert_array_equal(samples[8], lm.score_rows(rows[8:], "test")[0])
    # lm-eval's requests, a question and its four lettered answers: each gets its own value.
    question = "Who spoke unto Moses? Answer:"
    letters = [lm.encode_pair(question, f" {x}") for x in "ABCD"]
    assert all(len(cont) == 1 and c == letters[0][0] for c, cont in letters)
    lls = [ll for ll, _ in lm.loglikelihood([Request(question, f" {x}") for x in "ABCD"])]
    want = [-exact_bound(lm.model, c, cont) for c, cont in letters]
    np.testing.assert_allclose(lls, want, rtol=1e-5)
    assert len(set(lls)) == 4


# Requests of (ids, targets) and how they pack: 3 model rows of 48 positions holding 3, 4 and
# 1 of them (3 unused slots), then padding; at most 16 targets per row.
PACKED_REQUESTS = [(7, 3), (12, 5), (20, 6), (5, 1), (30, 9), (9, 4), (3, 2), (16, 16)]
PACKED_ROWS = [[0, 1, 2], [3, 4, 5, 6], [7]]


@pytest.mark.parametrize("cfg_scale", [0.0, 1.5])
def test_packed_rows_score_as_each_request_alone_with_the_full_head(lm, cfg_scale):
    """Requests of different lengths packed 2 to 4 per row (segment ids, block-diagonal
    attention, the head on 16 gathered positions per row) against each alone in its row (S = 1)
    with the head on every position, and alone with the head on 16 gathered positions: the same
    samples (the same masks; RoPE is relative), with and without guidance."""
    guided = LLaDAJaxLM(model=lm.model, mc_num=4, batch_size=8, cfg_scale=cfg_scale, progress=False)
    rng = np.random.default_rng(0)
    requests = [(rng.integers(5, 4000, n).tolist(), t) for n, t in PACKED_REQUESTS]
    sample = [1, 3, 0, 2, 2, 1, 3, 0]  # each request's sample index
    length, slots = 48, 4
    # 8 rows (a multiple of the test's 8 devices): 3 packed ones and 5 of padding only.
    packed = [np.zeros((8, length), t) for t in (np.int32, bool, np.int32)]
    row_id, sample_id = np.zeros((8, slots), np.int32), np.zeros((8, slots), np.int32)
    alone = [np.zeros((8, length), t) for t in (np.int32, bool, np.int32)]
    for b, members in enumerate(PACKED_ROWS):
        offset = 0
        for s, i in enumerate(members):
            ids, n = requests[i]
            for arrays, row, start in ((packed, b, offset), (alone, i, 0)):
                tokens, target, segment = arrays
                tokens[row, start : start + len(ids)] = ids
                target[row, start + len(ids) - n : start + len(ids)] = True
                segment[row, start : start + len(ids)] = s + 1 if arrays is packed else 1
            row_id[b, s], sample_id[b, s] = 100 + i, sample[i]
            offset += len(ids)
    alone_ids = (100 + np.arange(8, dtype=np.int32))[:, None]
    alone_samples = np.asarray(sample, np.int32)[:, None]
    params = lm.model.params
    none_alone = np.zeros((8, 1, ALTERNATIVES), np.int32)
    full = np.asarray(guided.scorer(0)(params, *alone, alone_ids, alone_samples, none_alone)[0])
    gathered = guided.scorer(16)(params, *alone, alone_ids, alone_samples, none_alone)[0]
    gathered = np.asarray(gathered)[:, 0]
    full = full[:, 0]
    none_packed = np.zeros((8, slots, ALTERNATIVES), np.int32)
    packed_BxS = np.asarray(guided.scorer(16)(params, *packed, row_id, sample_id, none_packed)[0])
    assert (full > 0).all()
    np.testing.assert_allclose(gathered, full, rtol=1e-5)
    for b, members in enumerate(PACKED_ROWS):
        np.testing.assert_allclose(packed_BxS[b, : len(members)], full[members], rtol=1e-5)
        assert (packed_BxS[b, len(members) :] == 0).all()  # empty slots score nothing
    assert (packed_BxS[3:] == 0).all()


def test_layout_packs_best_fit_decreasing():
    requests = [(40, 2), (100, 5), (70, 1), (30, 3), (60, 2), (200, 9), (10, 20)]
    unpacked = layout(requests, pack=False)  # each request alone, in its length's bucket
    assert [(r.length, r.items, r.head_positions) for r in unpacked] == [
        (224, [5], 16),
        (112, [1], 16),
        (80, [2], 16),
        (64, [4], 16),
        (48, [0], 16),
        (32, [3], 16),
        (16, [6], 16),
    ]
    # Longest first, each into the row with the least room that holds it, else a new row of at
    # least 128: 200 -> A (224, room 24); 100 -> B (128, room 28); 70 -> C (128, 58); 60 -> D
    # (128, 68); 40 -> C (18 left); 30 -> D (38 left); 10 -> C (8 left; first fit: A).
    packed = layout(requests, pack=True)
    assert [(r.length, r.items, r.used, r.scored, r.head_positions) for r in packed] == [
        (224, [5], 200, 9, 16),
        (128, [1], 100, 5, 16),
        (128, [2, 0, 6], 120, 23, 32),
        (128, [4, 3], 90, 5, 16),
    ]


def test_loglikelihood_is_the_same_packed_or_not(lm):
    """The same requests (several per model row packed, one per row not): the same estimates,
    request by request, to float rounding; rolling ones too."""
    pairs = [
        ("In the beginning God created", " the heaven"),
        ("And the LORD said unto Moses, Go in unto Pharaoh", " and tell him"),
        ("Amen", "."),
        ("Blessed are the meek: for they shall", " inherit the earth"),
        ("", "Jesus wept."),
    ]
    requests = [Request(*p) for p in pairs]
    texts = [Request("And God said, Let there be light."), Request("Amen.")]
    assert lm.loglikelihood([]) == [] and lm.loglikelihood_rolling([]) == []
    lengths = [(len(c) + len(x), len(x)) for c, x in (lm.encode_pair(*p) for p in pairs)]
    assert len(layout(lengths, pack=True)) < len(pairs)  # several requests share a row
    unpacked = LLaDAJaxLM(model=lm.model, mc_num=16, batch_size=32, pack=False, progress=False)
    assert lm.pack and not unpacked.pack
    np.testing.assert_allclose(
        [ll for ll, _ in lm.loglikelihood(requests)],
        [ll for ll, _ in unpacked.loglikelihood(requests)],
        rtol=1e-5,
    )
    np.testing.assert_allclose(
        lm.loglikelihood_rolling(texts), unpacked.loglikelihood_rolling(texts), rtol=1e-5
    )


def test_each_mask_is_scored_once_and_every_sample_gets_its_value(lm):
    """Requests of 1, 2, 3 and 20 targets, 16 samples each: `score_rows` gives every sample the
    value it has scored alone in its own row with the full head, while scoring each mask once
    (the masks told apart here by drawing them on the whole rows): one for the one-token
    continuation, all 16 for 20 targets (16 different counts l); its model rows run the head
    on their masked targets alone."""
    rng = np.random.default_rng(3)
    rows = [
        (rng.integers(5, 4000, p + t).tolist(), t) for p, t in [(6, 1), (9, 2), (4, 3), (3, 20)]
    ]
    n, length = lm.mc_num, 32
    tokens, target = np.zeros((4 * n, length), np.int32), np.zeros((4 * n, length), bool)
    segment = np.zeros((4 * n, length), np.int32)
    row_id, sample = np.zeros((4 * n, 1), np.int32), np.zeros((4 * n, 1), np.int32)
    for i, (ids, t) in enumerate(rows):
        for j in range(n):
            b = i * n + j
            tokens[b, : len(ids)], segment[b, : len(ids)] = ids, 1
            target[b, len(ids) - t : len(ids)] = True
            row_id[b], sample[b] = request_id(ids, t), j
    none = np.zeros((4 * n, 1, ALTERNATIVES), np.int32)
    expected = lm.scorer(0)(lm.model.params, tokens, target, segment, row_id, sample, none)[0]
    expected = np.asarray(expected)
    masks = np.asarray(
        likelihood.draw_masks(jax.random.key(lm.seed), target, segment, row_id, sample, n)[0]
    )
    distinct = [len({m.tobytes() for m in masks[i * n : (i + 1) * n]}) for i in range(4)]
    assert distinct[0] == 1 and distinct[1] == 3 and distinct[3] == n and distinct[2] <= 7

    first, pairs, model_rows, shared = lm.plan(rows)
    assert [sum(i == r for i, _ in pairs) for r in range(4)] == distinct and not shared
    # The head runs on the masked targets alone: each model row's count of them.
    counts = lm.masked_counts(rows)
    np.testing.assert_array_equal(counts, masks.sum(-1).reshape(4, n))
    for model_row in model_rows:
        scored = sum(counts[pairs[k]] for k in model_row.items)
        assert model_row.scored == scored <= model_row.head_positions
    for i in range(4):  # a sample's first one draws its mask
        for j in range(n):
            np.testing.assert_array_equal(masks[i * n + first[i, j]], masks[i * n + j])
    np.testing.assert_allclose(lm.score_rows(rows, "test"), expected.reshape(4, n), rtol=1e-5)


def test_the_command_line_batch_size_is_the_models_rows_per_call():
    """lm-eval's summary header prints the parsed --batch_size: set to what the model uses."""

    def cli(model="llada_jax", **given):
        args = argparse.Namespace(model=model, model_args=given.pop("model_args", None), **given)
        set_cli_batch_size(args)
        return args.batch_size

    assert cli() == 32  # not lm-eval's default 1
    assert cli(batch_size="auto") == 32 and cli(batch_size="8") == 8
    assert cli(model_args={"workdir": "w", "batch_size": 16}, batch_size="8") == 16
    assert cli(model="hf", batch_size="8") == "8"  # other models: as given


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
    assert "batch_size: 8" in proc.stdout  # the rows per call, not lm-eval's default 1


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
