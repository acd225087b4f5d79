"""Every Triton kernel of icrl_kernels compiles for Hopper (sm_90) without a GPU, in every dtype/argmax variant and
every autotuning config, with the paper shape's specialisation (N 40,960, d 4,096, V 128,256) -- and without register
spills (ptxas -v) or more shared memory than an H100/H200 block may use.

Triton compiles for a ``GPUTarget`` with no driver (``triton.compile(ASTSource(...), target=...)``) down to PTX and
a cubin (Triton's bundled ptxas); the resource usage comes from running that ptxas with ``-v`` on the PTX, since
``CompiledKernel.n_regs``/``n_spills`` are filled only when a driver loads the cubin. Capability 90 is compiled as
``sm_90a`` (Triton's ``sm_arch_from_capability``: the ``a`` target, the only one with wgmma), so the PTX names its
tensor-core instructions (``wgmma.mma_async``) and the cubin's SASS (Triton's bundled ``cuobjdump -sass``) its
``HGMMA`` ones: the Hopper GEMM variant of the vocab argmax is checked to use them. The compile runs in a
subprocess without ``TRITON_INTERPRET`` (the test session's kernels are interpreter functions, which cannot be
compiled). Run alone: ``python tests/kernels/test_sm90_compile.py`` prints one JSON line per kernel variant.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TARGET = ("cuda", 90, 32)
MAX_SHARED = 232_448  # bytes of shared memory one block may use on sm_90 (227 KiB, opt-in)
PAPER = {"N": 40960, "D": 4096, "V": 128256, "A": 4}  # the benchmark's stress shape
DTYPES = {"fp32": "*fp32", "bf16": "*bf16", "fp16": "*fp16"}


def _ptxas():
    """The ptxas Triton itself uses for sm_90 (its bundled one), else the one on PATH."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(90).path
    except (ImportError, AttributeError, TypeError):
        import shutil

        return shutil.which("ptxas")


def _tool(name: str):
    """A CUDA binary tool next to that ptxas (Triton bundles cuobjdump), else on PATH, else None."""
    import shutil

    ptxas = _ptxas()
    beside = Path(ptxas).parent / name if ptxas else None
    return str(beside) if beside is not None and beside.exists() else shutil.which(name)


def _resources(ptx: str, sass: bool = False) -> dict:
    """Registers, spill bytes and stack frame of one kernel from ``ptxas -v`` (sm_90a, as Triton compiles), whether
    ptxas had to serialise its wgmma, and instruction counts read from the PTX and (with ``sass``, where cuobjdump is
    at hand: 0.5 s a kernel) the cubin's SASS: wgmma / HGMMA (Hopper tensor cores) and the 64-bit atomic max (PTX
    red/atom, SASS REDG/ATOMG)."""
    with tempfile.TemporaryDirectory() as tmp:
        src, cubin = Path(tmp) / "k.ptx", Path(tmp) / "k.cubin"
        src.write_text(ptx)
        arch = re.search(r"^\.target\s+(\w+)", ptx, re.MULTILINE).group(1)
        done = subprocess.run([_ptxas(), "-v", f"--gpu-name={arch}", str(src), "-o", str(cubin)],
                              capture_output=True, text=True, check=False)
        if done.returncode:
            raise RuntimeError(f"ptxas failed: {done.stderr[-500:]}")
        cuobjdump = _tool("cuobjdump") if sass else None
        sass = subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True,
                              check=False).stdout if cuobjdump else ""  # no SASS: the test reads the PTX only
    log = done.stderr

    def num(pattern):
        return int(m.group(1)) if (m := re.search(pattern, log)) else 0

    return {"regs": num(r"Used (\d+) registers"), "spill_stores": num(r"(\d+) bytes spill stores"),
            "spill_loads": num(r"(\d+) bytes spill loads"), "stack": num(r"(\d+) bytes stack frame"),
            "target": arch, "wgmma_serialized": "serialized" in log,
            "ptx_wgmma": len(re.findall(r"wgmma\.mma_async\S*", ptx)),
            "ptx_atomic_max_s64": len(re.findall(r"(?:red|atom)\.global\S*\.max\.s64", ptx)),
            "sass": bool(sass), "sass_hgmma": len(re.findall(r"\bHGMMA\.", sass)),
            "sass_atomic_max_s64": len(re.findall(r"\b(?:REDG|ATOMG|RED|ATOM)\.E\.MAX\.S64", sass))}


def _compile(fn, types: dict, constexprs: dict, values: dict, options: dict, sass: bool = False) -> dict:
    """Compile ``fn`` for sm_90 with runtime-argument ``types``, the paper shape's ``values`` (ints divisible by 16
    and every pointer get Triton's divisibility-16 specialisation, as a real launch there would; not the arguments
    the kernel marks ``do_not_specialize``) and ``options`` (num_warps, num_stages)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {name: ("constexpr" if name in constexprs else types[name]) for name in fn.arg_names}
    attrs = {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs or name in getattr(fn, "do_not_specialize", ()):
            continue
        if types[name].startswith("*") or (isinstance(values.get(name), int) and values[name] % 16 == 0):
            attrs[(i,)] = [["tt.divisibility", 16]]
    kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs),
                            target=GPUTarget(*TARGET), options=options)
    out = _resources(kernel.asm["ptx"], sass)
    out["shared"] = int(kernel.metadata.shared)
    return out


def variants(include_control: bool = True):
    """``(label, fn, types, constexprs, values, options)`` for every kernel, variant and tuning config."""
    import importlib

    import torch

    q = importlib.import_module("icrl_kernels.q_td_loss")
    n, d, v, a = PAPER["N"], PAPER["D"], PAPER["V"], PAPER["A"]
    ints = {"stride_h": d, "stride_w": d, "stride_hn": d, "stride_ht": d, "stride_wt": d, "stride_dh": d, "N": n,
            "V": v, "D": d, "A": a, "N_BUCKET": q.n_bucket(n)}
    for dname, ptr in DTYPES.items():
        variant = q.argmax_variant(getattr(torch, {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dname]))
        types = {k: "i32" for k in ints} | {"h_ptr": ptr, "w_ptr": ptr, "key_ptr": "*i64"}
        configs = [(c, True, "") for c in q.ARGMAX_CONFIGS[variant]]
        if dname == "fp16":  # bf16's code with another element type: its first config stands for the rest (time)
            configs = configs[:1]
        else:
            configs.append((q.ARGMAX_CONFIGS[variant][0], False, " masked-d"))  # the body for d % BLOCK_D != 0
        if include_control and dname == "fp32":
            configs.append(((128, 128, 32, 8, 4, 2), True, " control"))  # FMA tiles too large: must be seen to spill
        for (bn, bv, bd, gn, w, st), even, tag in configs:
            yield (f"vocab_argmax {dname} {variant} N{bn} V{bv} D{bd} G{gn} w{w} s{st}{tag}",
                   q._q_td_vocab_argmax_kernel, types,
                   {"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_D": bd, "GROUP_N": gn, "EVEN_D": even,
                    "IEEE": dname == "fp32"}, ints, {"num_warps": w, "num_stages": st})
        types = {k: "i32" for k in ints} | {
            "h_ptr": ptr, "hn_ptr": ptr, "ht_ptr": ptr, "w_ptr": ptr, "wt_ptr": ptr, "tok_ptr": "*i64",
            "next_tok_ptr": "*i64", "action_ids_ptr": "*i64", "r_ptr": "*fp32", "done_ptr": "*fp32", "q_ptr": "*fp32",
            "y_ptr": "*fp32", "next_ptr": "*i64", "gamma": "fp32", "reward_scale": "fp32"}
        for argmax in ("actions", "vocab"):
            for bn, bd, w in q.FWD_CONFIGS:
                yield (f"fwd {dname} {argmax} N{bn} D{bd} w{w}", q._q_td_fwd_kernel, types,
                       {"VOCAB_ARGMAX": argmax == "vocab", "BLOCK_N": bn, "BLOCK_D": bd, "BLOCK_A": 16}, ints,
                       {"num_warps": w})
        types = {k: "i32" for k in ints} | {"g_ptr": "*fp32", "w_ptr": ptr, "tok_ptr": "*i64", "dh_ptr": ptr}
        bn, bd, w = q.DHIDDEN_CONFIG
        yield (f"dhidden {dname} N{bn} D{bd} w{w}", q._q_td_dhidden_kernel, types, {"BLOCK_N": bn, "BLOCK_D": bd}, ints,
               {"num_warps": w})


def main() -> None:
    os.environ.pop("TRITON_INTERPRET", None)
    sys.path.insert(0, str(ROOT / "kernels"))  # a checkout without `pip install -e .`: kernels/icrl_kernels
    import icrl_kernels  # noqa: F401

    for label, fn, types, constexprs, values, options in variants():
        try:
            row = {"kernel": label, **_compile(fn, types, constexprs, values, options,
                                               sass=label.startswith("vocab_argmax"))}
        except Exception as e:  # noqa: BLE001 - a kernel that does not compile is a result, reported by the test
            row = {"kernel": label, "error": f"{type(e).__name__}: {str(e)[-800:]}"}
        print(json.dumps(row), flush=True)


@pytest.fixture(scope="module")
def sm90():
    """Compile everything once (one subprocess): ``{label: resources or error}``."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset; 1 is what the kernels get
    done = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, cwd=ROOT, timeout=900,
                          check=False)  # a failed compile is a row of its own; no row at all fails below
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if not rows:
        pytest.fail(f"the sm_90 compile did not run: {done.stderr[-3000:]}")
    return {r["kernel"]: r for r in rows}


def test_sm90_every_kernel_variant_compiles(sm90):
    errors = {k: r["error"] for k, r in sm90.items() if "error" in r}
    assert not errors, f"kernels that do not compile for sm_90: {errors}"
    kinds = {k.split()[0] for k in sm90}
    assert kinds == {"vocab_argmax", "fwd", "dhidden"}
    assert len(sm90) == len(list(variants()))


def test_sm90_no_register_spills_and_shared_memory_fits(sm90):
    """Spills (local-memory traffic from running out of the 255 registers) and over-large shared-memory tiles fail.
    The control, fp32 (FMA) vocab-argmax tiles of 128 x 128 at 4 warps, must be seen to spill."""
    control = [r for k, r in sm90.items() if k.endswith(" control")]
    assert control and control[0]["spill_stores"] > 0, "the spill check no longer sees a known spilling config"
    bad = {k: r for k, r in sm90.items() if "error" not in r and r not in control
           and (r["spill_stores"] or r["spill_loads"] or r["shared"] > MAX_SHARED or r["regs"] > 255)}
    assert not bad, f"kernel configs that spill registers or overflow shared memory at sm_90: {bad}"
    assert all(r["regs"] > 0 for r in sm90.values() if "error" not in r)  # ptxas -v was parsed


def test_sm90_vocab_argmax_bf16_fp16_run_on_wgmma_with_one_packed_atomic(sm90):
    """The Hopper GEMM of the vocab argmax: every bf16/fp16 config (and its d-masked body) is compiled for sm_90a and
    its PTX issues ``wgmma.mma_async`` that ptxas did not serialise -- and, where cuobjdump is at hand (Triton bundles
    it), the SASS has ``HGMMA``; the epilogue is a 64-bit signed atomic max (``red``/``atom ... max.s64``). The fp32
    (IEEE) configs are the control: no tensor-core form, no wgmma."""
    import importlib

    configs = importlib.import_module("icrl_kernels.q_td_loss").ARGMAX_CONFIGS
    rows = {k: r for k, r in sm90.items() if k.startswith("vocab_argmax") and "error" not in r}
    half = {k: r for k, r in rows.items() if " half " in k}
    fp32 = {k: r for k, r in rows.items() if " fp32-ieee " in k}
    assert sum(" bf16 " in k for k in half) == len(configs["half"]) + 1 and fp32  # every config, and masked-d
    assert all(r["target"] == "sm_90a" for r in rows.values())
    assert all(r["ptx_atomic_max_s64"] >= 1 for r in rows.values())
    assert {k for k, r in half.items() if not r["ptx_wgmma"] or r["wgmma_serialized"]} == set()
    assert all(r["ptx_wgmma"] == 0 for r in fp32.values()), "the wgmma check cannot tell fp32 FMA tiles apart"
    if all(r["sass"] for r in rows.values()):
        assert all(r["sass_hgmma"] > 0 and r["sass_atomic_max_s64"] >= 1 for r in half.values())
        assert all(r["sass_hgmma"] == 0 for r in fp32.values())


if __name__ == "__main__":
    main()
