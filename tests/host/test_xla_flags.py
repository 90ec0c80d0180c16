"""Default XLA flags: appended to XLA_FLAGS unless the user set the same flag."""

from llada_jax.host import xla_flags


def test_defaults_are_appended_and_user_flags_win():
    env = {"XLA_FLAGS": "--xla_dump_to=/tmp/d --xla_gpu_enable_triton_gemm=true"}
    assert xla_flags.apply_defaults(env) == "--xla_dump_to=/tmp/d --xla_gpu_enable_triton_gemm=true"
    env = {"XLA_FLAGS": "--xla_dump_to=/tmp/d"}
    assert xla_flags.apply_defaults(env) == (
        "--xla_dump_to=/tmp/d --xla_gpu_enable_triton_gemm=false"
    )
    env = {}
    xla_flags.apply_defaults(env)
    assert env == {"XLA_FLAGS": "--xla_gpu_enable_triton_gemm=false"}
    assert xla_flags.apply_defaults(env) == env["XLA_FLAGS"]  # idempotent
