"""The launchers in launch/: exact dry-run command lines built here independently, one-line errors,
and the parts that can run without a cluster (local processes with a stand-in trainer, the TPU
workers' shell commands run by bash on a fake home, stand-in gcloud and sbatch executables)."""

import contextlib
import importlib.util
import io
import os
import shlex
import signal
import socket
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
TRAIN = ["--config=configs/tiny.py", "--workdir=/tmp/run a", "--config.optim.lr=1e-3"]


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "CUDA_VISIBLE_DEVICES")}
    env.update(extra)
    return env


def launcher_process(name, *args, env=None, cwd=ROOT, timeout=30):
    """Runs launch/NAME as a separate process (what a user does)."""
    return subprocess.run(
        [PY, os.path.join(ROOT, "launch", name), *args],
        cwd=cwd,
        env=env or clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


_MODULES = {}


def launcher(name, *args, env=None):
    """Runs launch/NAME's main() in this process (fast; dry runs and argument errors only),
    with its environment, stdout, stderr and exit status as a separate process would have."""
    if name not in _MODULES:
        spec = importlib.util.spec_from_file_location(
            f"launch_{name[:-3]}", os.path.join(ROOT, "launch", name)
        )
        _MODULES[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(_MODULES[name])
    saved = dict(os.environ)
    out, err = io.StringIO(), io.StringIO()
    try:
        os.environ.clear()
        os.environ.update(env or clean_env())
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                status = _MODULES[name].main([name, *args])
            except SystemExit as e:
                status = e.code
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return subprocess.CompletedProcess(args, status, out.getvalue(), err.getvalue())


def lines(p):
    assert p.returncode == 0, p.stderr
    return p.stdout.splitlines()


def assert_one_line_error(p, *fragments, status=2):
    assert p.returncode == status, (p.stdout, p.stderr)
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), p.stderr
    for f in fragments:
        assert f in err[0], err[0]
    assert p.stdout == ""


# ---------------------------------------------------------------------------------- local.py


def test_local_dry_run_cpu_devices():
    out = lines(
        launcher(
            "local.py",
            "--num_processes=2",
            "--devices_per_process=4",
            "--port=12345",
            "--dry_run",
            "--",
            *TRAIN,
        )
    )
    expected = [
        f"XLA_FLAGS=--xla_force_host_platform_device_count=4 {PY} -u -m llada_jax.train "
        f"--config=configs/tiny.py '--workdir=/tmp/run a' --config.optim.lr=1e-3 "
        f"--coordinator=127.0.0.1:12345 --num_processes=2 --process_id={i}"
        for i in range(2)
    ]
    assert out == expected
    assert shlex.split(out[1]) == [
        "XLA_FLAGS=--xla_force_host_platform_device_count=4",
        PY,
        "-u",
        "-m",
        "llada_jax.train",
        *TRAIN,
        "--coordinator=127.0.0.1:12345",
        "--num_processes=2",
        "--process_id=1",
    ]


def test_local_keeps_other_xla_flags_and_replaces_the_device_count():
    env = clean_env(XLA_FLAGS="--xla_dump_to=/tmp/d --xla_force_host_platform_device_count=8")
    out = lines(
        launcher(
            "local.py",
            "--num_processes=3",
            "--devices_per_process=2",
            "--port=999",
            "--dry_run",
            "--",
            "--config=c.py",
            env=env,
        )
    )
    assert out == [
        f"XLA_FLAGS='--xla_dump_to=/tmp/d --xla_force_host_platform_device_count=2' {PY} -u -m "
        f"llada_jax.train --config=c.py --coordinator=127.0.0.1:999 --num_processes=3 "
        f"--process_id={i}"
        for i in range(3)
    ]


def test_local_gpu_split_and_free_port():
    out = lines(
        launcher(
            "local.py",
            "--num_processes=2",
            "--gpus_per_process=2",
            "--dry_run",
            "--",
            "--config=c.py",
        )
    )
    port = shlex.split(out[0])[-3].rsplit(":", 1)[1]
    assert 0 < int(port) < 65536
    assert out == [
        f"CUDA_VISIBLE_DEVICES={g} {PY} -u -m llada_jax.train --config=c.py "
        f"--coordinator=127.0.0.1:{port} --num_processes=2 --process_id={i}"
        for i, g in enumerate(("0,1", "2,3"))
    ]
    # Within an inherited CUDA_VISIBLE_DEVICES.
    out = lines(
        launcher(
            "local.py",
            "--num_processes=2",
            "--gpus_per_process=1",
            "--port=5",
            "--dry_run",
            "--",
            "--config=c.py",
            env=clean_env(CUDA_VISIBLE_DEVICES="4,6"),
        )
    )
    assert [shlex.split(o)[0] for o in out] == ["CUDA_VISIBLE_DEVICES=4", "CUDA_VISIBLE_DEVICES=6"]


def test_local_single_process_has_no_distributed_flags():
    out = lines(launcher("local.py", "--num_processes=1", "--dry_run", "--", "--config=c.py"))
    assert out == [f"{PY} -u -m llada_jax.train --config=c.py"]


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--num_processes=0", "--", "--config=c"], "--num_processes=0 must be >= 1"),
        (
            ["--num_processes=2", "--devices_per_process=0", "--", "--config=c"],
            "--devices_per_process=0 must be >= 1",
        ),
        (["--num_processes=2", "--port=70000", "--", "--config=c"], "--port=70000"),
        (["--num_processes=2"], "no training flags"),
        (["--num_processes=2", "--", "--config=c", "--process_id=1"], "--process_id"),
        (["--num_processes=two", "--", "--config=c"], "invalid int value: 'two'"),
        (
            ["--num_processes=2", "--devices=4", "--", "--config=c"],
            "unrecognized arguments: --devices=4",
        ),
        (["--", "--config=c"], "--num_processes"),
        (["--num_processes=3", "--gpus_per_process=2", "--", "--config=c"], "needs 6 GPUs"),
    ],
)
def test_local_bad_arguments(args, fragment):
    env = clean_env(CUDA_VISIBLE_DEVICES="0,1,2,3")
    assert_one_line_error(launcher("local.py", *args, env=env), fragment)


FAKE_TRAIN = """
import os, signal, sys, time
flags = dict(a.split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)
i = int(flags.get("--process_id", 0))
mode = flags["--mode"]
if mode != "hang":
    signal.signal(signal.SIGTERM, lambda *a: (print(f"{i} got SIGTERM", flush=True),
                                               sys.exit(0)))
else:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
print(f"hello from {i} of {flags['--num_processes']} {os.environ['XLA_FLAGS']}", flush=True)
print(f"note {i}", file=sys.stderr, flush=True)
if mode in ("fail", "hang") and i == 1:
    time.sleep(0.5)
    sys.exit(3)
if mode == "ok":
    sys.exit(0)
print("ready", flush=True)
time.sleep(60)
sys.exit(5)
"""


@pytest.fixture()
def fake_trainer(tmp_path):
    """A directory where `python -m llada_jax.train` is a stand-in that starts instantly."""
    (tmp_path / "llada_jax").mkdir()
    (tmp_path / "llada_jax" / "__init__.py").write_text("")
    (tmp_path / "llada_jax" / "train.py").write_text(FAKE_TRAIN)
    return str(tmp_path)


def test_local_prefixes_output_of_each_process(fake_trainer):
    p = launcher_process(
        "local.py",
        "--num_processes=2",
        "--devices_per_process=3",
        "--",
        "--mode=ok",
        cwd=fake_trainer,
    )
    assert p.returncode == 0, p.stderr
    assert sorted(p.stdout.splitlines()) == [
        f"[{i}] hello from {i} of 2 --xla_force_host_platform_device_count=3" for i in range(2)
    ]
    assert sorted(p.stderr.splitlines()) == ["[0] note 0", "[1] note 1"]


def test_local_failure_stops_the_others(fake_trainer):
    p = launcher_process(
        "local.py",
        "--num_processes=2",
        "--devices_per_process=1",
        "--",
        "--mode=fail",
        cwd=fake_trainer,
    )
    assert p.returncode == 3, p.stderr
    assert "[0] 0 got SIGTERM" in p.stdout.splitlines()
    assert "process 1 exited with status 3; sending SIGTERM to the others" in p.stderr


def test_local_kills_what_ignores_sigterm(fake_trainer):
    t = time.monotonic()
    p = launcher_process(
        "local.py",
        "--num_processes=2",
        "--devices_per_process=1",
        "--kill_after=0.5",
        "--",
        "--mode=hang",
        cwd=fake_trainer,
    )
    assert p.returncode == 3, p.stderr
    assert "killing" in p.stderr and time.monotonic() - t < 20


def test_local_forwards_sigterm(fake_trainer):
    p = subprocess.Popen(
        [
            PY,
            os.path.join(ROOT, "launch", "local.py"),
            "--num_processes=2",
            "--devices_per_process=1",
            "--",
            "--mode=wait",
        ],
        cwd=fake_trainer,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen = []
    while sum(line.endswith("] ready\n") for line in seen) < 2:
        line = p.stdout.readline()
        assert line, p.stderr.read()
        seen.append(line)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=20)
    assert p.returncode == 0, err
    assert sorted(line for line in out.splitlines() if "SIGTERM" in line) == [
        "[0] 0 got SIGTERM",
        "[1] 1 got SIGTERM",
    ]
    assert "got SIGTERM; forwarding it to the processes" in err


# ------------------------------------------------------------------------------- tpu_pod.py

POD = ["--name=pod-1", "--zone=us-east5-a", "--project=my-proj"]
GC = "gcloud compute tpus tpu-vm"
WHERE = "--zone=us-east5-a --project=my-proj"
VENV = (
    "{ python3 -m venv ~/llada_venv || { sudo apt-get update -q && sudo apt-get install -y "
    "-q python3-venv && python3 -m venv --clear ~/llada_venv; }; } && "
    "~/llada_venv/bin/pip install --upgrade pip && cd ~/llada_jax && "
    "~/llada_venv/bin/pip install -e '.[tpu]'"
)
RUN_REMOTE = (
    "cd ~/llada_jax || exit 1; "
    'if [ -f ~/llada_train.log.pid ] && kill -0 "$(cat ~/llada_train.log.pid)" 2>/dev/null; '
    'then echo "$(hostname): training is still running (pid $(cat ~/llada_train.log.pid))" >&2; '
    "exit 1; fi; "
    "nohup setsid ~/llada_venv/bin/python -u -m llada_jax.train "
    "--config=configs/llada_1b.py:bf16 "
    "--workdir=gs://bucket/run1 --distributed --config.train.steps=10 "
    "'--config.data.datasets=((\"d e\", 1.0),)' "
    ">> ~/llada_train.log 2>&1 < /dev/null & "
    'echo $! > ~/llada_train.log.pid; echo "$(hostname): started pid $!, log ~/llada_train.log"'
)
ALIVE = 'kill -0 "$p" 2>/dev/null || kill -0 -- -"$p" 2>/dev/null'


def stop_remote(timeout=60):
    """What `stop` runs on each worker: SIGTERM, up to `timeout` seconds for the run's process
    group to exit, then kill -9 of what is left."""
    return (
        'if [ -f ~/llada_train.log.pid ] && kill -0 "$(cat ~/llada_train.log.pid)" 2>/dev/null; '
        'then p=$(cat ~/llada_train.log.pid); kill -TERM "$p"; '
        f'echo "$(hostname): sent SIGTERM to $p, waiting up to {timeout}s for it to save and '
        'exit"; '
        f"t=0; while {{ {ALIVE}; }} && [ $t -lt {timeout} ]; do sleep 1; t=$((t+1)); done; "
        f'if {ALIVE}; then kill -9 -- -"$p" 2>/dev/null; kill -9 "$p" 2>/dev/null; '
        f'echo "$(hostname): still running after {timeout}s: sent SIGKILL to $p and its group"; '
        'else echo "$(hostname): stopped"; fi; '
        'else echo "$(hostname): not running"; fi'
    )


STOP_REMOTE = stop_remote()
RUN_ARGS = [
    "--config=configs/llada_1b.py:bf16",
    "--workdir=gs://bucket/run1",
    "--",
    "--config.train.steps=10",
    '--config.data.datasets=(("d e", 1.0),)',
]


@pytest.fixture(scope="module", autouse=True)
def no_real_gcloud(tmp_path_factory):
    """A gcloud first on PATH that fails: a test must never reach a real one."""
    global GUARDED
    d = tmp_path_factory.mktemp("guard")
    (d / "gcloud").write_text("#!/bin/sh\necho 'a test ran gcloud' >&2\nexit 99\n")
    (d / "gcloud").chmod(0o755)
    GUARDED = clean_env(PATH=f"{d}{os.pathsep}{os.environ['PATH']}")


def pod(*args, env=None):
    return launcher("tpu_pod.py", *args, env=env or GUARDED)


def pod_process(*args, env=None):
    return launcher_process("tpu_pod.py", *args, env=env or GUARDED)


def ssh_argv(remote, worker="all"):
    return [
        "gcloud",
        "compute",
        "tpus",
        "tpu-vm",
        "ssh",
        "pod-1",
        "--zone=us-east5-a",
        "--project=my-proj",
        f"--worker={worker}",
        f"--command={remote}",
    ]


def test_pod_create():
    out = lines(
        pod(
            "create",
            *POD,
            "--accelerator_type=v5p-128",
            "--runtime_version=v2-alpha-tpuv5",
            "--spot",
            "--dry_run",
        )
    )
    assert out == [
        f"{GC} create pod-1 {WHERE} --accelerator-type=v5p-128 --version=v2-alpha-tpuv5 --spot"
    ]
    out = lines(
        pod(
            "create",
            "--name=p",
            "--zone=z",
            "--accelerator_type=v4-32",
            "--runtime_version=tpu-ubuntu2204-base",
            "--preemptible",
            "--dry_run",
        )
    )
    assert out == [
        f"{GC} create p --zone=z --accelerator-type=v4-32 "
        "--version=tpu-ubuntu2204-base --preemptible"
    ]


def test_pod_install_by_copy():
    out = lines(pod("install", *POD, "--dry_run"))
    sources = " ".join(
        os.path.join(ROOT, i)
        for i in ("setup.py", "README.md", "llada_jax", "configs", "tools", "launch")
    )
    assert out == [
        f"{GC} ssh pod-1 {WHERE} --worker=all '--command=rm -rf ~/llada_jax && mkdir -p "
        "~/llada_jax'",
        f"{GC} scp {sources} pod-1:llada_jax {WHERE} --worker=all --recurse",
        shlex.join(ssh_argv(VENV)),
    ]
    assert shlex.split(out[2])[-1] == "--command=" + VENV


def test_pod_install_by_clone():
    out = lines(
        pod(
            "install",
            *POD,
            "--repo_url=https://example.com/me/llada jax.git",
            "--branch=v1",
            "--remote_dir=code/llada",
            "--dry_run",
        )
    )
    remote = (
        "set -e; rm -rf ~/code/llada; git clone --depth=1 --branch=v1 "
        "'https://example.com/me/llada jax.git' ~/code/llada; "
        + VENV.replace("~/llada_jax", "~/code/llada")
    )
    assert out == [shlex.join(ssh_argv(remote))]


def test_pod_run_tail_stop_delete():
    out = lines(pod("run", *POD, "--dry_run", *RUN_ARGS))
    assert out == [shlex.join(ssh_argv(RUN_REMOTE))]
    assert out[0].startswith(f"{GC} ssh pod-1 {WHERE} --worker=all '--command=cd ~/llada_jax ")
    out = lines(pod("tail", *POD, "--worker=3", "--lines=20", "--dry_run"))
    assert out == [f"{GC} ssh pod-1 {WHERE} --worker=3 '--command=tail -n 20 -F ~/llada_train.log'"]
    assert lines(pod("stop", *POD, "--dry_run")) == [shlex.join(ssh_argv(STOP_REMOTE))]
    assert lines(pod("delete", "--name=pod-1", "--zone=europe-west4-b", "--dry_run")) == [
        f"{GC} delete pod-1 --zone=europe-west4-b"
    ]


def test_pod_workdir_warning_goes_to_stderr():
    p = pod("run", *POD, "--config=c.py", "--workdir=/local/dir", "--dry_run")
    assert p.returncode == 0 and p.stdout.count("\n") == 1
    assert p.stderr.startswith("warning: --workdir=/local/dir is not a gs:// path")


def test_pod_remote_commands_run_and_stop_a_training_process(tmp_path):
    """The run and stop commands, executed by bash with a fake home: the trainer starts in the
    background with the right argv, a second run is refused, stop SIGTERMs it and waits."""
    home = tmp_path / "home"
    (home / "llada_jax").mkdir(parents=True)
    (home / "llada_venv" / "bin").mkdir(parents=True)
    python = home / "llada_venv" / "bin" / "python"
    python.write_text(
        f"#!{PY}\n"
        + (
            "import json, os, signal, sys, time\n"
            "signal.signal(signal.SIGTERM, lambda *a: (print('saved', flush=True), sys.exit(0)))\n"
            "print(json.dumps([os.getcwd()] + sys.argv[1:]), flush=True)\n"
            "time.sleep(60)\n"
        )
    )
    python.chmod(0o755)
    env = clean_env(HOME=str(home))
    bash = lambda cmd: subprocess.run(
        ["bash", "-c", cmd], env=env, capture_output=True, text=True, timeout=30
    )
    log = home / "llada_train.log"
    started = bash(RUN_REMOTE)
    assert started.returncode == 0 and "started pid" in started.stdout, started.stderr
    for _ in range(100):
        if log.exists() and log.read_text():
            break
        time.sleep(0.05)
    assert log.read_text().splitlines()[0] == (
        f'["{home}/llada_jax", "-u", "-m", "llada_jax.train", "--config=configs/llada_1b.py:bf16",'
        ' "--workdir=gs://bucket/run1", "--distributed", "--config.train.steps=10", '
        '"--config.data.datasets=((\\"d e\\", 1.0),)"]'
    )
    pid = int((home / "llada_train.log.pid").read_text())
    assert os.getpgid(pid) == pid  # a session of its own: `stop` can kill what it starts
    again = bash(RUN_REMOTE)
    assert again.returncode == 1 and "training is still running" in again.stderr
    stopped = bash(STOP_REMOTE)
    assert stopped.returncode == 0 and stopped.stdout.strip().endswith("stopped")
    assert log.read_text().splitlines()[-1] == "saved"
    assert bash(STOP_REMOTE).stdout.strip().endswith("not running")


@pytest.mark.parametrize(
    "args,fragment",
    [
        (
            [
                "create",
                *POD,
                "--accelerator_type=v5p-8",
                "--runtime_version=x",
                "--spot",
                "--preemptible",
            ],
            "--spot and --preemptible are exclusive",
        ),
        (["create", *POD, "--runtime_version=x"], "--accelerator_type"),
        (["run", *POD, "--config=c.py"], "--workdir"),
        (
            ["run", *POD, "--config=c.py", "--workdir=gs://b", "--", "--process_id=0"],
            "--process_id",
        ),
        (["run", *POD, "--config=c.py", "--workdir=gs://b", "--", "--config=d.py"], "--config"),
        (["stop", *POD, "--", "--config.x=1"], "`stop` takes no training flags"),
        (["tail", *POD, "--worker=-1"], "--worker=-1 must be >= 0"),
        (["install", *POD, "--remote_dir=../x"], "--remote_dir=../x"),
        (["install", *POD, "--source_dir=/nonexistent"], "not a llada_jax checkout"),
        (["start", *POD], "invalid choice: 'start'"),
        (["stop", "--zone=z"], "--name"),
        ([], "COMMAND"),
    ],
)
def test_pod_bad_arguments(args, fragment):
    assert_one_line_error(pod(*args[:1], "--dry_run", *args[1:]) if args else pod(), fragment)


def test_pod_without_gcloud(tmp_path):
    p = pod_process("stop", *POD, env=clean_env(PATH=str(tmp_path)))
    assert_one_line_error(p, "gcloud not found on PATH", status=1)


def fake_tool(directory, name, status=0):
    """An executable `name` on a PATH of its own that appends its argv to calls.txt."""
    tool = directory / name
    tool.write_text(
        f"#!{PY}\nimport json, sys\n"
        f"open({str(directory / 'calls.txt')!r}, 'a').write(json.dumps(sys.argv[1:]) "
        f"+ '\\n')\nprint('Submitted batch job 42')\nsys.exit({status})\n"
    )
    tool.chmod(0o755)
    return clean_env(PATH=f"{directory}{os.pathsep}{os.environ['PATH']}")


def calls(directory):
    import json

    return [json.loads(line) for line in (directory / "calls.txt").read_text().splitlines()]


def test_pod_runs_the_dry_run_commands_with_gcloud(tmp_path):
    env = fake_tool(tmp_path, "gcloud")
    p = pod_process("install", *POD, env=env)
    assert p.returncode == 0, p.stderr
    assert [shlex.join(["gcloud"] + c) for c in calls(tmp_path)] == lines(
        pod("install", *POD, "--dry_run")
    )
    assert p.stderr.count("\n+ gcloud ") + p.stderr.startswith("+ gcloud ") == 3


def test_pod_stops_at_a_failing_gcloud(tmp_path):
    env = fake_tool(tmp_path, "gcloud", status=7)
    p = pod_process("install", *POD, env=env)
    assert p.returncode == 7
    assert len(calls(tmp_path)) == 1
    assert p.stderr.splitlines()[-1].startswith("error: gcloud exited with status 7: gcloud ")


QR = "gcloud compute tpus queued-resources"


def test_pod_queued_and_multislice_create_and_delete():
    create = ["create", *POD, "--accelerator_type=v5p-128", "--runtime_version=v2-alpha-tpuv5"]
    assert lines(pod(*create, "--queued", "--spot", "--dry_run")) == [
        f"{QR} create pod-1 {WHERE} --accelerator-type=v5p-128 --runtime-version=v2-alpha-tpuv5 "
        "--node-id=pod-1 --spot"
    ]
    # A multislice is a queued resource of N nodes, pod-1-0 ... pod-1-(N-1).
    assert lines(pod(*create, "--num_slices=2", "--dry_run")) == [
        f"{QR} create pod-1 {WHERE} --accelerator-type=v5p-128 --runtime-version=v2-alpha-tpuv5 "
        "--node-count=2 --node-prefix=pod-1"
    ]
    for flags in (["--queued"], ["--num_slices=2"]):
        assert lines(pod("delete", *POD, *flags, "--dry_run")) == [
            f"{QR} delete pod-1 {WHERE} --force"
        ]


def test_pod_multislice_runs_on_every_worker_of_every_slice():
    out = lines(pod("run", *POD, "--num_slices=2", "--dry_run", *RUN_ARGS))
    remote = RUN_REMOTE.replace(
        "'--config.data.datasets=((\"d e\", 1.0),)' ",
        "'--config.data.datasets=((\"d e\", 1.0),)' --config.mesh.num_slices=2 ",
    )
    assert out == [
        shlex.join(
            ["gcloud", "compute", "tpus", "queued-resources", "ssh", "pod-1", "--zone=us-east5-a"]
            + ["--project=my-proj", "--node=all", "--worker=all", f"--command={remote}"]
        )
    ]
    out = lines(pod("install", *POD, "--num_slices=2", "--dry_run"))
    for ssh_line in out[::2]:
        assert shlex.split(ssh_line)[:-1] == shlex.split(
            f"{QR} ssh pod-1 {WHERE} --node=all --worker=all"
        )
    assert out[1].startswith(f"{QR} scp {os.path.join(ROOT, 'setup.py')} ")
    assert out[1].endswith(f" pod-1:llada_jax {WHERE} --worker=all --node=all --recurse")
    stop = lines(pod("stop", *POD, "--num_slices=3", "--dry_run"))
    assert stop == [
        f"{QR} ssh pod-1 {WHERE} --node=all --worker=all " + shlex.quote(f"--command={STOP_REMOTE}")
    ]


def test_pod_stop_kills_what_outlives_the_timeout(tmp_path):
    """The stop command, run by bash: a trainer that ignores SIGTERM and has a child is killed
    with its child (its process group) once --stop_timeout_sec has passed."""
    out = lines(pod("stop", *POD, "--stop_timeout_sec=1", "--dry_run"))
    assert out == [shlex.join(ssh_argv(stop_remote(1)))]
    trainer = tmp_path / "trainer.sh"
    trainer.write_text("trap '' TERM\nsleep 60 &\necho $! > child\nwait\n")
    env = clean_env(HOME=str(tmp_path))
    subprocess.run(
        ["bash", "-c", f"cd {tmp_path}; setsid bash trainer.sh & echo $! > llada_train.log.pid"],
        env=env,
        check=True,
    )
    pid = int((tmp_path / "llada_train.log.pid").read_text())
    for _ in range(100):
        if (tmp_path / "child").exists() and (tmp_path / "child").read_text():
            break
        time.sleep(0.02)
    child = int((tmp_path / "child").read_text())
    assert os.getpgid(child) == pid  # the run's own process group
    t = time.monotonic()
    stopped = subprocess.run(
        ["bash", "-c", stop_remote(1)], env=env, capture_output=True, text=True, timeout=20
    )
    assert time.monotonic() - t < 5
    assert "sent SIGTERM" in stopped.stdout and "sent SIGKILL" in stopped.stdout, stopped
    for p in (pid, child):
        for _ in range(100):
            if gone(p):
                break
            time.sleep(0.02)
        else:
            pytest.fail(f"process {p} survived stop")


def gone(pid):
    """True when `pid` has exited (a zombie not yet reaped by its new parent counts)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def fake_worker_tools(directory, worker_number="3", tpu_env="MEGASCALE_SLICE_ID: '1'"):
    """A curl answering the metadata server's attributes and a tail that prints the log and
    exits, on a PATH of their own (curl fails when worker_number is None)."""
    curl = directory / "curl"
    answers = {"agent-worker-number": worker_number, "tpu-env": f"A: 'x'\n{tpu_env}\nB: 'y'"}
    curl.write_text(
        f"#!{PY}\nimport sys\nanswers = {answers!r}\nkey = sys.argv[-1].rsplit('/', 1)[1]\n"
        "if answers['agent-worker-number'] is None: sys.exit(22)\nprint(answers[key])\n"
    )
    tail = directory / "tail"
    tail.write_text(f"#!{PY}\nimport sys\nsys.stdout.write(open(sys.argv[-1]).read())\n")
    for tool in (curl, tail):
        tool.chmod(0o755)
    return clean_env(HOME=str(directory), PATH=f"{directory}{os.pathsep}{os.environ['PATH']}")


@pytest.mark.parametrize(
    "flags,worker_number,prefix",
    [([], "3", "[w3] "), (["--num_slices=2"], "3", "[s1w3] "), ([], None, None)],
)
def test_pod_tail_all_workers_prefixes_each_line(tmp_path, flags, worker_number, prefix):
    out = lines(pod("tail", *POD, *flags, "--worker=all", "--lines=7", "--dry_run"))
    argv = shlex.split(out[0])
    where = ["--node=all"] if flags else []
    assert argv[:4] == ["gcloud", "compute", "tpus", "queued-resources" if flags else "tpu-vm"]
    assert argv[4:-1] == [
        "ssh",
        "pod-1",
        "--zone=us-east5-a",
        "--project=my-proj",
        *where,
        "--worker=all",
    ]
    remote = argv[-1].removeprefix("--command=")
    assert "tail -n 7 -F ~/llada_train.log | sed -u " in remote
    env = fake_worker_tools(tmp_path, worker_number)
    (tmp_path / "llada_train.log").write_text("step 1\nstep 2\n")
    shown = subprocess.run(["bash", "-c", remote], env=env, capture_output=True, text=True)
    prefix = prefix or f"[{socket.gethostname()}] "  # no metadata server: the host name
    assert shown.stdout.splitlines() == [f"{prefix}step 1", f"{prefix}step 2"], shown.stderr


def test_pod_tail_one_worker_of_one_slice():
    out = lines(pod("tail", *POD, "--num_slices=2", "--worker=3", "--slice=1", "--dry_run"))
    assert out == [
        f"{QR} ssh pod-1 {WHERE} --node=1 --worker=3 '--command=tail -n 100 -F ~/llada_train.log'"
    ]
    out = lines(pod("tail", *POD, "--queued", "--dry_run"))
    assert out[0].startswith(f"{QR} ssh pod-1 {WHERE} --node=0 --worker=0 ")


@pytest.mark.parametrize(
    "args,fragment",
    [
        (
            [
                "create",
                *POD,
                "--queued",
                "--accelerator_type=v5p-8",
                "--runtime_version=x",
                "--preemptible",
            ],
            "--preemptible is not available for queued resources",
        ),
        (["stop", *POD, "--num_slices=0"], "--num_slices=0 must be >= 1"),
        (["stop", *POD, "--stop_timeout_sec=-1"], "--stop_timeout_sec=-1 must be >= 0"),
        (["tail", *POD, "--worker=w1"], "--worker=w1 must be an index >= 0 or all"),
        (["tail", *POD, "--slice=1"], "--slice=1 needs --queued or --num_slices"),
        (["tail", *POD, "--num_slices=2", "--slice=2"], "--slice=2 must be < --num_slices=2"),
        (
            [
                "run",
                *POD,
                "--num_slices=2",
                "--config=c.py",
                "--workdir=gs://b",
                "--",
                "--config.mesh.num_slices=4",
            ],
            "--config.mesh.num_slices=4 in the training flags contradicts --num_slices=2",
        ),
    ],
)
def test_pod_bad_queued_arguments(args, fragment):
    assert_one_line_error(pod(*args[:1], "--dry_run", *args[1:]), fragment)


# -------------------------------------------------------------------------------- slurm.py


OVERLAP_FLAGS = (
    "--xla_gpu_enable_latency_hiding_scheduler=true",
    "--xla_gpu_enable_pipelined_all_gather=true",
    "--xla_gpu_enable_pipelined_reduce_scatter=true",
    "--xla_gpu_enable_pipelined_all_reduce=true",
)
OVERLAP = (
    "# XLA flags that overlap GPU collectives with computation (launch/slurm.py; a flag\n"
    "# already in XLA_FLAGS keeps its value):\n"
    "#   --xla_gpu_enable_latency_hiding_scheduler=true: schedule collectives asynchronously, "
    "overlapped with independent computation\n"
    "#   --xla_gpu_enable_pipelined_all_gather=true: in loops (scanned layers), all-gather the "
    "next iteration's parameters during this one\n"
    "#   --xla_gpu_enable_pipelined_reduce_scatter=true: in loops, finish an iteration's "
    "gradient reduce-scatter during the next one\n"
    "#   --xla_gpu_enable_pipelined_all_reduce=true: in loops, finish an iteration's all-reduce "
    "during the next one\n"
    f"for flag in {' '.join(OVERLAP_FLAGS)}; do\n"
    '  case " ${XLA_FLAGS:-} " in\n'
    '    *" ${flag%%=*}="*) ;;\n'
    '    *) XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }$flag" ;;\n'
    "  esac\n"
    "done\n"
    "export XLA_FLAGS\n"
)


def expected_script(
    sbatch_extra="",
    body_extra="",
    overlap=OVERLAP,
    job="llada",
    nodes=2,
    gpus=8,
    cpus=8,
    time_limit="24:00:00",
    output="%x-%j.out",
    command=None,
):
    command = command or (
        "python -u -m llada_jax.train --config=configs/tiny.py "
        "'--workdir=/tmp/run a' --config.optim.lr=1e-3"
    )
    return (
        "#!/bin/bash\n"
        "# llada-jax training on a GPU cluster, rendered from launch/slurm.sbatch by "
        "launch/slurm.py.\n"
        "# One task per GPU: every task sees all GPUs of its node and JAX, reading the SLURM "
        "environment,\n"
        "# starts one process per task on GPU number SLURM_LOCALID (llada_jax/distributed.py).\n"
        f"#SBATCH --job-name={job}\n"
        f"#SBATCH --nodes={nodes}\n"
        f"#SBATCH --ntasks-per-node={gpus}\n"
        f"#SBATCH --gpus-per-node={gpus}\n"
        f"#SBATCH --cpus-per-task={cpus}\n"
        f"#SBATCH --time={time_limit}\n"
        f"#SBATCH --output={output}\n"
        f"{sbatch_extra}"
        "set -euo pipefail\n"
        f"cd {ROOT}\n"
        f"{body_extra}"
        f"{overlap}"
        f"srun --kill-on-bad-exit=1 {command}\n"
    )


def test_slurm_dry_run_defaults():
    p = launcher("slurm.py", "--nodes=2", "--gpus_per_node=8", "--dry_run", "--", *TRAIN)
    assert p.returncode == 0, p.stderr
    assert p.stdout == expected_script("#SBATCH --signal=TERM@300\n") + "sbatch llada.sbatch\n"


def test_slurm_dry_run_all_options(tmp_path):
    script = str(tmp_path / "job 1.sbatch")
    p = launcher(
        "slurm.py",
        "--nodes=4",
        "--gpus_per_node=4",
        "--partition=gpu-h100",
        "--account=proj7",
        "--time=2-00:00:00",
        "--job_name=abl",
        "--cpus_per_task=12",
        "--output=logs/%j.txt",
        "--term_before_end=0",
        "--mem_fraction=0.9",
        "--env=NCCL_DEBUG=WARN",
        "--env=MSG=a b",
        "--setup=module load cuda/12",
        "--setup=source ~/venv/bin/activate",
        "--python=/opt/py/bin/python3",
        "--overlap_flags=false",
        f"--script={script}",
        "--dry_run",
        "--",
        "--config=configs/llada_1b.py",
        "--workdir=/shared/x",
    )
    assert p.returncode == 0, p.stderr
    assert (
        p.stdout
        == expected_script(
            "#SBATCH --partition=gpu-h100\n#SBATCH --account=proj7\n",
            "module load cuda/12\nsource ~/venv/bin/activate\n"
            "export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9\nexport NCCL_DEBUG=WARN\nexport MSG='a b'\n",
            overlap="",
            job="abl",
            nodes=4,
            gpus=4,
            cpus=12,
            time_limit="2-00:00:00",
            output="logs/%j.txt",
            command="/opt/py/bin/python3 -u -m llada_jax.train --config=configs/llada_1b.py "
            "--workdir=/shared/x",
        )
        + f"sbatch '{script}'\n"
    )
    assert not os.path.exists(script)  # a dry run writes nothing


def test_slurm_writes_and_submits(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    env = fake_tool(bindir, "sbatch")
    p = launcher_process(
        "slurm.py", "--nodes=2", "--gpus_per_node=8", "--", *TRAIN, env=env, cwd=str(tmp_path)
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout == "Submitted batch job 42\n"
    assert calls(bindir) == [["llada.sbatch"]]
    assert (tmp_path / "llada.sbatch").read_text() == expected_script("#SBATCH --signal=TERM@300\n")


def test_slurm_without_sbatch_keeps_the_script(tmp_path):
    p = launcher_process(
        "slurm.py",
        "--nodes=1",
        "--gpus_per_node=1",
        "--",
        "--config=c.py",
        env=clean_env(PATH=str(tmp_path)),
        cwd=str(tmp_path),
    )
    assert_one_line_error(p, "sbatch not found on PATH", "llada.sbatch", status=1)
    assert (tmp_path / "llada.sbatch").exists()


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--nodes=0", "--gpus_per_node=8"], "--nodes=0 must be >= 1"),
        (["--nodes=1", "--gpus_per_node=0"], "--gpus_per_node=0 must be >= 1"),
        (["--gpus_per_node=8"], "--nodes"),
        (["--nodes=1", "--gpus_per_node=8", "--mem_fraction=1.5"], "--mem_fraction=1.5"),
        (["--nodes=1", "--gpus_per_node=8", "--env=1X=2"], "--env=1X=2"),
        (["--nodes=1", "--gpus_per_node=8", "--job_name=a b"], "--job_name='a b'"),
        (["--nodes=1", "--gpus_per_node=8", "--term_before_end=-1"], "--term_before_end=-1"),
    ],
)
def test_slurm_bad_arguments(args, fragment):
    assert_one_line_error(launcher("slurm.py", *args, "--dry_run", "--", "--config=c.py"), fragment)


def test_slurm_needs_training_flags_without_distributed_ones():
    assert_one_line_error(
        launcher("slurm.py", "--nodes=1", "--gpus_per_node=8", "--dry_run"), "no training flags"
    )
    assert_one_line_error(
        launcher(
            "slurm.py",
            "--nodes=1",
            "--gpus_per_node=8",
            "--dry_run",
            "--",
            "--config=c.py",
            "--coordinator=h:1",
        ),
        "--coordinator",
    )


def test_slurm_overlap_flags_keep_the_jobs_own_xla_flags():
    """The rendered XLA_FLAGS block, run by bash: defaults appended, a flag the job already sets
    keeps its value."""
    run = lambda inherited: (
        subprocess.run(
            ["bash", "-c", "set -euo pipefail\n" + OVERLAP + 'printf %s "$XLA_FLAGS"'],
            env=clean_env(**({"XLA_FLAGS": inherited} if inherited is not None else {})),
            capture_output=True,
            text=True,
        ).stdout
    )
    assert run(None) == " ".join(OVERLAP_FLAGS)
    assert run("--xla_dump_to=/d --xla_gpu_enable_pipelined_all_gather=false") == " ".join(
        ["--xla_dump_to=/d", "--xla_gpu_enable_pipelined_all_gather=false"]
        + [f for f in OVERLAP_FLAGS if "all_gather" not in f]
    )


JOB16 = "the job has 16 processes of one GPU each (--nodes=2 x --gpus_per_node=8)"


@pytest.mark.parametrize(
    "mesh,fragment",
    [
        (
            ["--config.mesh.shape=(2,4,1)"],
            f"--config.mesh.shape=(2,4,1) needs 8 devices but {JOB16}",
        ),
        (
            ["--config.mesh.shape", "(4,4,4)"],
            f"--config.mesh.shape=(4,4,4) needs 64 devices but {JOB16}",
        ),
        (
            ["--config.mesh.shape=(-1,-1,2)"],
            f"--config.mesh.shape=(-1,-1,2) must have entries >= 1 and at most one -1; {JOB16}",
        ),
        (
            ["--config.mesh.shape=(3,-1,1)"],
            "--config.mesh.shape=(3,-1,1): the fixed entries (3 devices) do not divide the "
            f"processes; {JOB16}",
        ),
        (
            ["--config.mesh.num_slices=2", "--config.mesh.shape=(2,8,1)"],
            "--config.mesh.shape=(2,8,1) x --config.mesh.num_slices=2 needs 32 devices but "
            f"{JOB16}",
        ),
        (
            ["--config.mesh.num_slices=3", "--config.mesh.shape=(-1,1,1)"],
            f"--config.mesh.num_slices=3 does not divide the processes; {JOB16}",
        ),
    ],
)
def test_slurm_refuses_a_mesh_that_does_not_fit_the_job(mesh, fragment):
    p = launcher(
        "slurm.py", "--nodes=2", "--gpus_per_node=8", "--dry_run", "--", "--config=c", *mesh
    )
    assert_one_line_error(p, fragment)
    assert p.stderr == f"error: {fragment}\n"


@pytest.mark.parametrize(
    "mesh",
    [
        ["--config.mesh.shape=(2,8,1)"],
        ["--config.mesh.shape=(-1,4,2)"],
        ["--config.mesh.shape=(1,-1,1)"],
        ["--config.mesh.shape=[16]"],
        ["--config.mesh.shape=(-1,)"],
        ["--config.mesh.shape=(1,8,1)", "--config.mesh.num_slices=2"],
        ["--config.mesh.shape=x"],
    ],
)
def test_slurm_takes_a_mesh_that_fits_or_leaves_it_to_the_trainer(mesh):
    p = launcher("slurm.py", "--nodes=2", "--gpus_per_node=8", "--dry_run", "--", *mesh)
    assert p.returncode == 0, p.stderr
