"""``ragged_decode_attention``'s kernel compiles for Hopper (sm_90) without a GPU, with the tile config its launcher
picks, without register spills (ptxas -v) or more shared memory than an H100/H200 block may use.

Default lane: Llama-8B's decode shape (B 64, L 4,096, H 32, KVH 8, D 128, Q 2) in fp32, with a bf16 cache under
fp32 queries and all in bf16, and the default model's (H 4, KVH 4, D 32) in fp32 and with a bf16 cache; and a
control config known to spill, which the check must see. Slow lane (``-m slow``): every entry of ``TILE_CONFIGS``
(fp32, bf16 and fp16 caches, D 16 ... 256).

The compile and the ptxas run are ``tests/kernels/test_sm90_compile.py``'s helpers (imported, not copied); as
there, they run in a subprocess without ``TRITON_INTERPRET`` (the test session's kernels are interpreter
functions). Run alone: ``python tests/kernels/test_sm90_decode_attention.py [--all]`` prints one JSON line per
variant.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from test_sm90_compile import MAX_SHARED, ROOT, _compile

B, L = 64, 4096
SHAPES = {"llama8b": (2, 32, 8, 128), "default": (2, 4, 4, 32)}  # name: (Q, H, KVH, D)
PTR = {"fp32": "*fp32", "bf16": "*bf16", "fp16": "*fp16"}
DEFAULT_LANE = [("llama8b", "fp32", "fp32"), ("llama8b", "fp32", "bf16"), ("llama8b", "bf16", "bf16"),
                ("default", "fp32", "fp32"), ("default", "fp32", "bf16")]  # shape, query dtype, cache dtype


CONTROL = ("llama8b", "fp32", "bf16", (64, 4, 3))  # a config known to spill (~7 KB): the check must see it


def variant(da, t: int, h: int, kvh: int, d: int, q_dtype: str, cache_dtype: str, config=None):
    """``(label, fn, types, constexprs, values, num_warps, num_stages)`` for one shape and dtype pair: a cache
    ``[B, L, KVH, D]`` and int64 lengths and positions, as the player passes them; the launcher's tile config
    unless ``config`` (BLOCK_L, num_warps, num_stages) is given."""
    import torch

    bd = da.block_d(d)
    block_l, warps, stages = config or da.launch_config(getattr(torch, {"fp32": "float32", "bf16": "bfloat16",
                                                                         "fp16": "float16"}[cache_dtype]), bd)
    values = {"stride_qb": t * h * d, "stride_qt": h * d, "stride_qh": d, "stride_kb": L * kvh * d,
              "stride_ks": kvh * d, "stride_kh": d, "stride_vb": L * kvh * d, "stride_vs": kvh * d, "stride_vh": d,
              "stride_ob": t * h * d, "stride_ot": h * d, "stride_oh": d, "stride_pb": t, "stride_pt": 1, "L": L,
              "D": d}
    types = {k: "i32" for k in values} | {"q_ptr": PTR[q_dtype], "k_ptr": PTR[cache_dtype],
                                          "v_ptr": PTR[cache_dtype], "len_ptr": "*i64", "qpos_ptr": "*i64",
                                          "o_ptr": PTR[q_dtype], "qk_scale": "fp32"}
    constexprs = {"T": t, "GROUP": h // kvh, "BLOCK_M": da.BLOCK_M, "BLOCK_L": block_l, "BLOCK_D": bd}
    label = (f"H{h} KVH{kvh} D{d} q-{q_dtype} cache-{cache_dtype}: M{da.BLOCK_M} L{block_l} D{bd} w{warps} "
             f"s{stages}{' (control)' if config else ''}")
    return label, da._ragged_decode_attention_fwd_kernel, types, constexprs, values, warps, stages


def variants(every_config: bool = False):
    """The default lane's variants and the spilling control, or (``every_config``) one per ``TILE_CONFIGS`` entry:
    D = the tile's BLOCK_D, H 32 over KVH 8, fp32 queries, each 2-byte entry as bf16 and as fp16."""
    import importlib

    da = importlib.import_module("icrl_kernels.decode_attention")
    if not every_config:
        for shape, q_dtype, cache_dtype in DEFAULT_LANE:
            yield variant(da, *SHAPES[shape], q_dtype, cache_dtype)
        shape, q_dtype, cache_dtype, config = CONTROL
        yield variant(da, *SHAPES[shape], q_dtype, cache_dtype, config)
        return
    for size, bd in da.TILE_CONFIGS:
        for cache_dtype in (["fp32"] if size == 4 else ["bf16", "fp16"]):
            yield variant(da, 2, 32, 8, bd, "fp32", cache_dtype)


def main(every_config: bool) -> None:
    os.environ.pop("TRITON_INTERPRET", None)
    sys.path.insert(0, str(ROOT / "kernels"))  # a checkout without `pip install -e .`: kernels/icrl_kernels
    for label, fn, types, constexprs, values, warps, stages in variants(every_config):
        try:
            row = {"kernel": label, **_compile(fn, types, constexprs, values,
                                               {"num_warps": warps, "num_stages": stages})}
        except Exception as e:  # noqa: BLE001 - a kernel that does not compile is a result, reported by the test
            row = {"kernel": label, "error": f"{type(e).__name__}: {str(e)[-800:]}"}
        print(json.dumps(row), flush=True)


def compile_all(every_config: bool) -> dict:
    """Compile the variants in one subprocess: ``{label: resources or error}``."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset; 1 is what the kernels get
    done = subprocess.run([sys.executable, __file__] + (["--all"] if every_config else []), capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=600, check=False)  # a failed run: pytest.fail below
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if not rows:
        pytest.fail(f"the sm_90 compile did not run: {done.stderr[-3000:]}")
    return {r["kernel"]: r for r in rows}


def check(sm90: dict, expected: int) -> None:
    errors = {k: r["error"] for k, r in sm90.items() if "error" in r}
    assert not errors, f"decode-attention variants that do not compile for sm_90: {errors}"
    assert len(sm90) == expected
    bad = {k: r for k, r in sm90.items() if "(control)" not in k
           and (r["spill_stores"] or r["spill_loads"] or r["shared"] > MAX_SHARED or r["regs"] > 255)}
    assert not bad, f"decode-attention variants that spill registers or overflow shared memory at sm_90: {bad}"
    assert all(r["regs"] > 0 for r in sm90.values())  # ptxas -v was parsed


def test_sm90_decode_attention_llama8b_and_default_shapes():
    sm90 = compile_all(False)
    check(sm90, len(DEFAULT_LANE) + 1)
    control = [r for k, r in sm90.items() if "(control)" in k]
    assert control[0]["spill_stores"] > 0, "the spill check no longer sees a known spilling config"


@pytest.mark.slow
def test_sm90_decode_attention_every_tile_config():
    check(compile_all(True), len(list(variants(True))))


if __name__ == "__main__":
    main("--all" in sys.argv[1:])
