"""Fused Q-head + Double-DQN TD loss from final hidden states, forward and backward, never holding [N, V] logits.

Layers (Liger-Kernel style): ``@triton.jit`` kernels -> launchers (``q_td_forward``, ``q_td_dhidden``) ->
``QTDLossFunction`` (autograd) -> functional :func:`q_td_loss` and the :class:`QTDLoss` module.

Contract (N transitions, d hidden size, V vocabulary, A actions):

* ``hidden [N, d]`` online hidden states at the decision points (the only input that gets a gradient, with
  ``weight`` when it requires grad); ``next_hidden [N, d]`` online and ``next_target_hidden [N, d]`` target
  hidden states at each transition's next decision point (no gradient: the target is detached);
* ``weight``: the LM head ``[V, d]`` with ``action_ids [A]`` (Q is the logit of an action's token), or a dedicated
  Q-head ``[A, d]`` with ``action_ids=None``; ``target_weight`` (default ``weight``) is the target network's head;
* ``actions [N]`` int in ``0..A-1``, ``rewards [N]`` float, ``dones [N]`` (1: the next decision belongs to another
  episode: no bootstrap), ``seq_ids [N]`` int >= 0 (sequence of each transition, for the paper's normalisation);
* optional ``discounts [N]`` float: each transition's discount of the next Q, in place of ``gamma * (1 - done)``
  (e.g. a target that bootstraps across episode ends with a discount of its own). The fused path takes it as
  ``gamma = 1`` and ``done = 1 - discount``, which its kernels already read as a float: the same kernels.

Computes ``q = <hidden, W[tok(action)]>`` and ``y = reward_scale * r + gamma * (1 - done) * <next_target_hidden,
W_tgt[a*]>`` with ``a* = argmax <next_hidden, W[.]>`` over the A action tokens (``argmax="actions"``) or over the
whole vocabulary (``"vocab"``, the paper's code: the head is streamed in vocabulary tiles with an online max);
then the loss ``paper`` (``((q - y) / mean_seq(y))^2``, ``mean_seq(y)`` detached and kept >= ``norm_eps`` in
magnitude), ``mse`` or ``huber``, reduced by ``mean`` / ``sum`` / ``none`` (see ``reference.reduce_loss``).

Fused: in ``vocab`` mode the next action is :func:`vocab_argmax`'s: a Triton GEMM over ``[N, V]`` tiles whose
epilogue merges each tile's per-row max/argmax into a packed int64 key by one atomic max, or ``torch.mm`` over V
chunks with a running argmax, whichever a one-time timing per shape found faster (CUDA; see :func:`argmax_path`).
One forward kernel makes a single pass over ``d`` for q, the online next-action logits, the target logits and the
target; ``dL/dhidden`` is written in the forward pass (Liger's trick: ``q`` is linear in ``hidden``), so backward
only scales it. Accumulation is fp32 whatever the input dtype.
Tolerances: fp32 within 1e-5 (relative, max-norm) of a float64 reference; bf16 within 2x the error eager bf16
makes against float64 (GPU only: the Triton interpreter computes bf16 ``tl.dot`` wrongly).
"""

from __future__ import annotations

import math

import torch

from .dispatch import FLOAT_DTYPES, HAS_TRITON, debug_checks, interpreting, select_backend
from .reference import (
    ARGMAX,
    LOSSES,
    REDUCTIONS,
    elementwise_loss,
    q_td_loss_reference,
    reduce_loss,
    safe_denominator,
    sequence_index,
    sequence_mean,
)

if HAS_TRITON:
    import triton
    import triton.language as tl
    from triton.runtime.errors import OutOfResources

    @triton.jit
    def _argmax_key(value, index):
        """The packed int64 key of ``(value fp32, index int32)`` that :func:`argmax_key` computes in torch: a signed
        max over keys is a max over values whose ties keep the lowest index."""
        value = tl.where(value == 0.0, 0.0, value)  # -0.0 == +0.0: one key, so the lower index wins that tie too
        bits = value.to(tl.int32, bitcast=True)
        high = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # order-preserving: negatives reversed below zero
        low = (~index.to(tl.int32)).to(tl.uint32, bitcast=True).to(tl.int64)  # 2**32 - 1 - index, zero-extended
        return (high.to(tl.int64) << 32) | low

    @triton.jit(do_not_specialize=["N_BUCKET"])
    def _q_td_vocab_argmax_kernel(
        h_ptr, w_ptr, key_ptr,
        stride_h, stride_w,
        N, V, D, N_BUCKET,
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_N: tl.constexpr,
        EVEN_D: tl.constexpr, IEEE: tl.constexpr,
    ):
        """One ``[BLOCK_N, BLOCK_V]`` tile of ``h @ w.T`` (a GEMM over d), then per row the tile's max/argmax merged
        into ``key[row]`` with one packed 64-bit atomic max (ties: lowest index). ``N_BUCKET`` is only the
        autotuner's key (N's power-of-two bucket)."""
        # grouped program order (the Triton matmul tutorial's): GROUP_N row blocks walk the V tiles together, so a
        # W tile is read from HBM once per group and from L2 by the group's other row blocks
        pid = tl.program_id(0)
        n_blocks = tl.cdiv(N, BLOCK_N)
        v_blocks = tl.cdiv(V, BLOCK_V)
        per_group = GROUP_N * v_blocks
        first_n = (pid // per_group) * GROUP_N
        group_rows = tl.minimum(n_blocks - first_n, GROUP_N)
        pid_n = first_n + (pid % per_group) % group_rows
        pid_v = (pid % per_group) // group_rows
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
        dd = tl.arange(0, BLOCK_D)
        # out-of-range rows/columns wrap (no load masks): their results are dropped by the epilogue's masks
        h_ptrs = h_ptr + (rows % N).to(tl.int64)[:, None] * stride_h + dd[None, :]  # int64: N * d can pass 2**31
        w_ptrs = w_ptr + (cols % V).to(tl.int64)[None, :] * stride_w + dd[:, None]  # [BLOCK_D, BLOCK_V]: w.T
        acc = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
        for d0 in range(0, D, BLOCK_D):
            if EVEN_D:
                h = tl.load(h_ptrs)
                w = tl.load(w_ptrs)
            else:
                h = tl.load(h_ptrs, mask=dd[None, :] < D - d0, other=0.0)
                w = tl.load(w_ptrs, mask=dd[:, None] < D - d0, other=0.0)
            acc = tl.dot(h, w, acc, input_precision="ieee" if IEEE else "tf32")  # bf16/fp16: wgmma on sm_90a
            h_ptrs += BLOCK_D
            w_ptrs += BLOCK_D
        acc = tl.where((cols < V)[None, :], acc, float("-inf"))
        tile_max, tile_idx = tl.max(acc, axis=1, return_indices=True, return_indices_tie_break_left=True)
        key = _argmax_key(tile_max, pid_v * BLOCK_V + tile_idx)
        # a max commutes and is idempotent: any program order gives the same keys, and the autotuner's repeated
        # benchmark launches into one buffer leave it as one launch would
        tl.atomic_max(key_ptr + rows, key, mask=rows < N, sem="relaxed")

    @triton.jit
    def _q_td_fwd_kernel(
        h_ptr, hn_ptr, ht_ptr, w_ptr, wt_ptr, tok_ptr, next_tok_ptr, action_ids_ptr, r_ptr, done_ptr,
        q_ptr, y_ptr, next_ptr,
        stride_h, stride_hn, stride_ht, stride_w, stride_wt,
        N, D, A, gamma, reward_scale,
        VOCAB_ARGMAX: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_A: tl.constexpr,
    ):
        """One pass over d: q of the taken action, online next-action logits (actions mode), target logits, y."""
        pid = tl.program_id(0)
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        rows64 = rows.to(tl.int64)
        tok = tl.load(tok_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        a_cols = tl.arange(0, BLOCK_A)
        a_ok = a_cols < A
        a_tok = tl.load(action_ids_ptr + a_cols, mask=a_ok, other=0).to(tl.int64)
        if VOCAB_ARGMAX:
            next_tok = tl.load(next_tok_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        q = tl.zeros((BLOCK_N,), tl.float32)
        q_tgt = tl.zeros((BLOCK_N,), tl.float32)
        logits = tl.zeros((BLOCK_N, BLOCK_A), tl.float32)
        tgt_logits = tl.zeros((BLOCK_N, BLOCK_A), tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            d_ok = dd < D
            m2 = row_ok[:, None] & d_ok[None, :]
            h = tl.load(h_ptr + rows64[:, None] * stride_h + dd[None, :], mask=m2, other=0.0).to(tl.float32)
            w_tok = tl.load(w_ptr + tok[:, None] * stride_w + dd[None, :], mask=m2, other=0.0).to(tl.float32)
            q += tl.sum(h * w_tok, axis=1)
            ht = tl.load(ht_ptr + rows64[:, None] * stride_ht + dd[None, :], mask=m2, other=0.0).to(tl.float32)
            if VOCAB_ARGMAX:
                wt_next = tl.load(wt_ptr + next_tok[:, None] * stride_wt + dd[None, :], mask=m2, other=0.0)
                q_tgt += tl.sum(ht * wt_next.to(tl.float32), axis=1)
            else:
                hn = tl.load(hn_ptr + rows64[:, None] * stride_hn + dd[None, :], mask=m2, other=0.0).to(tl.float32)
                ma = a_ok[:, None] & d_ok[None, :]
                w_a = tl.load(w_ptr + a_tok[:, None] * stride_w + dd[None, :], mask=ma, other=0.0).to(tl.float32)
                wt_a = tl.load(wt_ptr + a_tok[:, None] * stride_wt + dd[None, :], mask=ma, other=0.0).to(tl.float32)
                logits += tl.dot(hn, tl.trans(w_a), input_precision="ieee")  # operands are fp32 here; A is tiny
                tgt_logits += tl.dot(ht, tl.trans(wt_a), input_precision="ieee")
        if VOCAB_ARGMAX:
            nxt = next_tok
        else:
            logits = tl.where(a_ok[None, :], logits, float("-inf"))
            _, nxt32 = tl.max(logits, axis=1, return_indices=True, return_indices_tie_break_left=True)
            nxt = nxt32.to(tl.int64)
            q_tgt = tl.sum(tl.where(a_cols[None, :] == nxt[:, None], tgt_logits, 0.0), axis=1)
        r = tl.load(r_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        done = tl.load(done_ptr + rows, mask=row_ok, other=0).to(tl.float32)
        y = r * reward_scale + gamma * (1.0 - done) * q_tgt
        tl.store(q_ptr + rows, q, mask=row_ok)
        tl.store(y_ptr + rows, y, mask=row_ok)
        tl.store(next_ptr + rows, nxt, mask=row_ok)

    @triton.jit
    def _q_td_dhidden_kernel(
        g_ptr, w_ptr, tok_ptr, dh_ptr,
        stride_w, stride_dh, N, D,
        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """``dh[i] = g[i] * w[tok[i]]``: the gradient of a loss of ``q_i = <h_i, w[tok_i]>``."""
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        dd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        row_ok = rows < N
        m2 = row_ok[:, None] & (dd[None, :] < D)
        g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
        tok = tl.load(tok_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        w = tl.load(w_ptr + tok[:, None] * stride_w + dd[None, :], mask=m2, other=0.0).to(tl.float32)
        tl.store(dh_ptr + rows.to(tl.int64)[:, None] * stride_dh + dd[None, :],
                 (g[:, None] * w).to(dh_ptr.dtype.element_ty), mask=m2)


# Tile configurations. On a GPU each kernel is autotuned over its list (and the dtypes: Triton's autotuner adds them to
# the key), so the first call at a shape benchmarks the configs once. Every config listed compiles for sm_90 without
# register spills and within sm_90's shared memory -- checked by tests/kernels/test_sm90_compile.py with ptxas -v
# at the paper shape (Triton 3.9; registers per thread in the comments). Under the CPU interpreter one config is
# used (multi-config autotuning needs do_bench, which fails on the CPU), with large blocks since the interpreter
# pays per program.
#
# The vocab-argmax GEMM: (BLOCK_N, BLOCK_V, BLOCK_D, GROUP_N, num_warps, num_stages), keyed on (N's power-of-two
# bucket, V, D). "half" (bf16/fp16) are Hopper tiles: tl.dot on 16-bit operands with 4 or 8 warps lowers to wgmma
# on sm_90a (the compile test reads wgmma.mma_async in their PTX and HGMMA in their SASS); 128 x 256 x 64 at 8 warps
# and 3-4 stages is two warpgroups of m64n256k16 wgmma, the large-GEMM Hopper tile; the 64-row tiles waste fewer
# rows at small N (N 204: 2 row blocks of 128 or 4 of 64). fp32 runs IEEE products (no TF32), which have no tensor-core form: small FMA tiles. Not yet
# timed on a GPU (no device in the session that wrote them): the per-shape path choice below times this kernel
# against chunked cuBLAS at the first call, so a config list that loses costs only the choice, never the speed.
ARGMAX_CONFIGS = {  # by variant of the [N, V] GEMM; sm_90a registers, shared memory (KiB) in the comments
    "fp32-ieee": [(64, 64, 32, 8, 8, 2), (32, 64, 32, 8, 4, 2)],  # 80, 16; 96, 12 (128 x 128 at 4 warps spills)
    "half": [(128, 256, 64, 8, 8, 3), (128, 256, 64, 8, 8, 4),  # 182, 144; 182, 192
             (128, 128, 64, 8, 4, 4), (64, 256, 64, 8, 4, 4), (64, 128, 64, 8, 4, 4)],  # 189, 128; 198, 160; 119, 96
}
# BLOCK_N, BLOCK_D, warps (the A tile is sized from A); at most 156 registers (fp32, actions mode). On the lent H200
# (Triton 3.6, 2026-11-30) 32/128 at 8 warps spilled 24 bytes in bf16/fp16 (64 registers), so it left the list.
FWD_CONFIGS = [(32, 64, 4), (64, 32, 4)]
DHIDDEN_CONFIG = (32, 128, 4)  # BLOCK_N, BLOCK_D, warps: an elementwise gather-scale, memory bound (<= 48 registers)
INTERPRETER_META = {"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_D": 64, "GROUP_N": 4}
ARGMAX_PATHS = ("auto", "triton", "cublas")
ARGMAX_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # the Triton path's; the cuBLAS path takes any float
KEY_INIT = -(2 ** 63)  # no packed key is lower (-inf's high half is -2**31 + 2**23 - 1)
CUBLAS_CHUNK_UNIT = 128  # chunk widths are multiples of this many vocabulary rows (whole GEMM tiles)
TIMING_REPS = 3  # timed calls per path in the one-time per-shape choice (after one warm-up call each)


def argmax_variant(dtype: torch.dtype) -> str:
    """The tile-config family of the vocab-argmax GEMM for inputs of ``dtype`` (fp32 runs in IEEE precision)."""
    return "fp32-ieee" if dtype == torch.float32 else "half"


def _launcher(kernel, configs, names, key):
    """``launch(grid)(*args, **constexprs)``: ``kernel`` autotuned over ``configs`` (tuples: the values of the
    constexpr ``names``, then num_warps and optionally num_stages) keyed on ``key`` -- or, under the interpreter,
    launched with the ``INTERPRETER_META`` values of those names and no tuning. ``grid`` maps the chosen
    constexprs to the grid."""
    if interpreting():
        meta = {name: INTERPRETER_META[name] for name in names}
        return lambda grid: (lambda *args, **kw: kernel[grid(meta)](*args, **kw, **meta))
    tuned = triton.autotune([triton.Config(dict(zip(names, c)), num_warps=c[len(names)],
                                           **({"num_stages": c[len(names) + 1]} if len(c) > len(names) + 1 else {}))
                             for c in configs], key=key)(kernel)
    return lambda grid: tuned[grid]


if HAS_TRITON:
    _ARGMAX_KERNEL = triton.heuristics({"EVEN_D": lambda a: a["D"] % a["BLOCK_D"] == 0})(_q_td_vocab_argmax_kernel)
    _ARGMAX = {variant: _launcher(_ARGMAX_KERNEL, configs, ("BLOCK_N", "BLOCK_V", "BLOCK_D", "GROUP_N"),
                                  ["N_BUCKET", "V", "D"])
               for variant, configs in ARGMAX_CONFIGS.items()}
    _FWD = _launcher(_q_td_fwd_kernel, FWD_CONFIGS, ("BLOCK_N", "BLOCK_D"), ["D"])


def argmax_key(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The packed int64 key of ``values`` (fp32) at ``index`` (ints in ``0..2**31-1``), as the Triton epilogue packs
    it: high 32 bits the value mapped to an order-preserving int32 (-0.0 as +0.0), low 32 bits ``2**32 - 1 -
    index``; so ``max`` over keys is the max value and, among equal values, the lowest index."""
    values = torch.where(values == 0, torch.zeros_like(values), values.to(torch.float32))
    bits = values.view(torch.int32)
    high = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64)
    return (high << 32) | (0xFFFFFFFF - index.to(torch.int64))


def argmax_from_key(key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values fp32, index int64)`` of packed keys (the inverse of :func:`argmax_key`, with -0.0 read as +0.0)."""
    high = (key >> 32).to(torch.int32)
    bits = torch.where(high < 0, high ^ 0x7FFFFFFF, high)
    return bits.view(torch.float32), 0xFFFFFFFF - (key & 0xFFFFFFFF)


def n_bucket(n: int) -> int:
    """N's power-of-two bucket: the autotuner's and the path choice's key. dqn_loss's N is the batch's transition
    count, different at nearly every step; keyed on N itself, every step would retune."""
    return 1 << max(n - 1, 0).bit_length()


def cublas_chunk(v: int) -> int:
    """Vocabulary rows per ``torch.mm`` of the cuBLAS path: the largest multiple of ``CUBLAS_CHUNK_UNIT`` that is at
    most V / 10 -- so its ``[N, chunk]`` buffer is at most 10 % of eager's ``[N, V]`` logits once V >= 1,280 --
    and at least one unit (at most V). V 128,256: 12,800 (10 chunks, the last 12,056)."""
    return min(v, max(CUBLAS_CHUNK_UNIT, v // 10 // CUBLAS_CHUNK_UNIT * CUBLAS_CHUNK_UNIT))


def _triton_keys(next_hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The Triton path's packed per-row keys (int64 [N]): one ``[BLOCK_N, BLOCK_V]`` GEMM tile per program, each
    merged into its rows' keys with one atomic max per row."""
    n, d = next_hidden.shape
    v = weight.shape[0]
    key = torch.full((n,), KEY_INIT, dtype=torch.int64, device=next_hidden.device)
    _ARGMAX[argmax_variant(next_hidden.dtype)](
        lambda meta: (triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(v, meta["BLOCK_V"]),))(
        next_hidden, weight, key, next_hidden.stride(0), weight.stride(0), n, v, d, n_bucket(n),
        IEEE=next_hidden.dtype == torch.float32)
    return key


def _argmax_triton(next_hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return argmax_from_key(_triton_keys(next_hidden, weight))[1]


def _argmax_cublas(next_hidden: torch.Tensor, weight: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """``torch.mm`` of ``next_hidden`` with one V chunk of ``weight`` at a time into one reused ``[N, chunk]``
    buffer, and a running max/argmax (the logits in the inputs' dtype, as eager's; ties: lowest index)."""
    n, v = next_hidden.shape[0], weight.shape[0]
    chunk = cublas_chunk(v) if chunk is None else chunk
    dev = next_hidden.device
    buf = torch.empty(n * chunk, dtype=next_hidden.dtype, device=dev)
    vals = torch.empty(n, dtype=next_hidden.dtype, device=dev)
    idx = torch.empty(n, dtype=torch.int64, device=dev)
    best = torch.full((n,), float("-inf"), dtype=torch.float32, device=dev)
    best_idx = torch.zeros(n, dtype=torch.int64, device=dev)
    for v0 in range(0, v, chunk):
        width = min(chunk, v - v0)
        logits = buf[:n * width].view(n, width)  # contiguous, also for the narrower last chunk
        torch.mm(next_hidden, weight[v0:v0 + width].T, out=logits)
        torch.max(logits, dim=1, out=(vals, idx))  # the first maximal index of the chunk
        m = vals.to(torch.float32)
        better = m > best  # strict: an earlier chunk keeps a tie
        best = torch.where(better, m, best)
        best_idx = torch.where(better, idx + v0, best_idx)
    return best_idx


_PATHS = {"triton": _argmax_triton, "cublas": _argmax_cublas}
# (N bucket, V, d, dtype, device) -> the faster path, and {path: ms per call} as timed: filled by the first CUDA call
# of each key (benchmarks print them)
PATH_CHOICE: dict[tuple, str] = {}
PATH_TIMES: dict[tuple, dict[str, float]] = {}


def _fastest_path(next_hidden: torch.Tensor, weight: torch.Tensor) -> tuple[str, dict[str, float]]:
    """Time both paths on these inputs (one warm-up call each, which also compiles and autotunes the Triton kernel,
    then ``TIMING_REPS`` calls between CUDA events); the faster one, and the times (ms per call)."""
    times = {}
    for path in ("triton", "cublas"):
        try:
            _PATHS[path](next_hidden, weight)
        except OutOfResources:  # no config fits this GPU's shared memory (pre-Hopper)
            times[path] = float("inf")
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(TIMING_REPS):
            _PATHS[path](next_hidden, weight)
        end.record()
        end.synchronize()  # host-device sync: once per shape key, never per step
        times[path] = start.elapsed_time(end) / TIMING_REPS
    return min(times, key=times.get), times  # a tie keeps "triton" (the first)


def argmax_path(next_hidden: torch.Tensor, weight: torch.Tensor) -> str:
    """The path ``vocab_argmax(..., path="auto")`` takes for these inputs.

    CUDA tensors (compiled Triton): the faster of the two as timed by the first call of its key (N's power-of-two
    bucket, V, d, dtype, device), cached in ``PATH_CHOICE``; fp64 (no Triton variant): ``cublas``. Elsewhere a
    fixed rule: under ``TRITON_INTERPRET=1`` ``triton`` (the interpreter is there to test the kernels), on plain
    CPU tensors ``cublas`` (``torch.mm`` chunks, the only path that runs there).
    """
    runnable = HAS_TRITON and (next_hidden.is_cuda or interpreting())
    if not runnable or next_hidden.dtype not in ARGMAX_DTYPES:
        return "cublas"
    if interpreting():
        return "triton"
    key = (n_bucket(next_hidden.shape[0]), weight.shape[0], weight.shape[1], next_hidden.dtype, next_hidden.device)
    if key not in PATH_CHOICE:
        PATH_CHOICE[key], PATH_TIMES[key] = _fastest_path(next_hidden, weight)
    return PATH_CHOICE[key]


def vocab_argmax(next_hidden: torch.Tensor, weight: torch.Tensor, path: str = "auto") -> torch.Tensor:
    """``argmax_v <next_hidden[i], weight[v]>`` for every row (int64 [N]), never holding the ``[N, V]`` logits;
    among equal maxima the lowest index.

    ``next_hidden [N, d]`` and ``weight [V, d]`` of one float dtype, rows contiguous. ``path``:

    * ``"triton"``: one Triton GEMM over all ``[BLOCK_N, BLOCK_V]`` tiles with an argmax epilogue (fp32: IEEE
      products, no TF32; the max compared in fp32 accumulators); fp32/bf16/fp16 only;
    * ``"cublas"``: ``torch.mm`` per V chunk (:func:`cublas_chunk`) into one reused buffer, with a running argmax
      over the logits in the inputs' dtype (eager's rounding; fp32 follows torch's TF32 setting);
    * ``"auto"``: :func:`argmax_path`'s choice (on CUDA the first call of a shape key times both, a host sync).
    """
    if path not in ARGMAX_PATHS:
        raise ValueError(f"path must be one of {ARGMAX_PATHS}, got {path!r}")
    if next_hidden.ndim != 2 or weight.ndim != 2 or next_hidden.shape[1] != weight.shape[1] or weight.shape[0] < 1:
        raise ValueError(f"need next_hidden [N, d] and weight [V >= 1, d], got {tuple(next_hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if next_hidden.dtype != weight.dtype or not next_hidden.is_floating_point():
        raise ValueError(f"next_hidden and weight must share one float dtype, got {next_hidden.dtype}, {weight.dtype}")
    if next_hidden.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError("next_hidden and weight need contiguous rows (call .contiguous())")
    if next_hidden.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64, device=next_hidden.device)
    path = argmax_path(next_hidden, weight) if path == "auto" else path
    if path == "triton" and not (HAS_TRITON and (next_hidden.is_cuda or interpreting())
                                 and next_hidden.dtype in ARGMAX_DTYPES):
        raise ValueError("path='triton' needs triton, fp32/bf16/fp16 and CUDA tensors (or TRITON_INTERPRET=1 set "
                         "before triton is imported); use path='cublas' or 'auto'")
    return _PATHS[path](next_hidden, weight)


def q_td_forward(hidden, weight, next_hidden, next_target_hidden, target_weight, taken_tok, action_ids, rewards,
                 dones, gamma: float, reward_scale: float, argmax: str):
    """Launch the forward kernels; returns ``q``, ``y`` (fp32 [N]) and the next action (vocab index or action
    index, int64 [N])."""
    n, d = hidden.shape
    dev = hidden.device
    q = torch.empty(n, dtype=torch.float32, device=dev)
    y = torch.empty(n, dtype=torch.float32, device=dev)
    nxt = torch.empty(n, dtype=torch.int64, device=dev)
    vocab = argmax == "vocab"
    next_tok = vocab_argmax(next_hidden, weight) if vocab else taken_tok
    a = action_ids.numel()
    _FWD(lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),))(
        hidden, next_hidden, next_target_hidden, weight, target_weight, taken_tok, next_tok, action_ids,
        rewards, dones, q, y, nxt, hidden.stride(0), next_hidden.stride(0), next_target_hidden.stride(0),
        weight.stride(0), target_weight.stride(0), n, d, a, float(gamma), float(reward_scale),
        VOCAB_ARGMAX=vocab, BLOCK_A=max(16, triton.next_power_of_2(a)))
    return q, y, nxt


def q_td_dhidden(g: torch.Tensor, weight: torch.Tensor, taken_tok: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``g[:, None] * weight[taken_tok]`` in ``dtype`` ([N, d]); ``g`` fp32 [N], ``taken_tok`` int64 [N]."""
    n, d = g.shape[0], weight.shape[1]
    dh = torch.empty((n, d), dtype=dtype, device=g.device)
    if interpreting():
        block_n, block_d, extra = INTERPRETER_META["BLOCK_N"], INTERPRETER_META["BLOCK_D"], {}
    else:
        block_n, block_d, warps = DHIDDEN_CONFIG
        extra = {"num_warps": warps}
    _q_td_dhidden_kernel[(triton.cdiv(n, block_n), triton.cdiv(d, block_d))](
        g, weight, taken_tok, dh, weight.stride(0), dh.stride(0), n, d, BLOCK_N=block_n, BLOCK_D=block_d, **extra)
    return dh


def loss_and_dq(q, y, seq_ids, loss: str, reduction: str, huber_delta: float, norm_eps: float):
    """Loss (reduced) and ``d loss / d q`` per row for a unit upstream gradient (per row for ``none``); ``q``, ``y``
    fp32 [N], ``seq_ids`` int64 [N]. No device-to-host sync (sequences by ``sequence_index``)."""
    index = sequence_index(seq_ids) if loss == "paper" else None
    diff = q - y
    denom = safe_denominator(sequence_mean(y, seq_ids, index)[0], norm_eps) if loss == "paper" else None
    per_row = elementwise_loss(diff, denom, loss, huber_delta)
    if loss == "paper":
        dq = 2.0 * diff / denom ** 2
    elif loss == "mse":
        dq = 2.0 * diff
    else:
        dq = torch.where(diff.abs() <= huber_delta, diff, huber_delta * torch.sign(diff))
    if reduction == "mean":
        if loss == "paper":
            dq = dq / (sequence_mean(dq, seq_ids, index)[1] * index[1].to(dq.dtype))
        else:
            dq = dq / max(q.numel(), 1)
    return reduce_loss(per_row, seq_ids, loss, reduction, index), dq


class QTDLossFunction(torch.autograd.Function):
    """Autograd wrapper of the Triton path; gradients flow to ``hidden`` and (if it requires grad) ``weight``."""

    @staticmethod
    def forward(ctx, hidden, weight, next_hidden, next_target_hidden, target_weight, actions, rewards, dones,
                seq_ids, action_ids, gamma, reward_scale, argmax, loss, huber_delta, reduction, norm_eps):
        taken_tok = action_ids[actions].contiguous()
        with torch.no_grad():
            q, y, _ = q_td_forward(hidden, weight, next_hidden, next_target_hidden, target_weight, taken_tok,
                                   action_ids, rewards, dones, gamma, reward_scale, argmax)
            out, dq = loss_and_dq(q, y, seq_ids, loss, reduction, huber_delta, norm_eps)
            # Gradient in the forward pass: q is linear in hidden, so dL/dhidden = dq * W[tok] now, scaled later.
            dh = q_td_dhidden(dq, weight, taken_tok, hidden.dtype) if ctx.needs_input_grad[0] else None
        ctx.reduction = reduction
        ctx.weight_shape = weight.shape
        ctx.save_for_backward(dh, dq, hidden if ctx.needs_input_grad[1] else None, taken_tok)
        return out.to(torch.float32)

    @staticmethod
    def backward(ctx, grad_out):
        dh, dq, hidden, taken_tok = ctx.saved_tensors
        per_row = ctx.reduction == "none"
        d_hidden = d_weight = None
        if dh is not None:
            d_hidden = dh * (grad_out[:, None] if per_row else grad_out).to(dh.dtype)
        if hidden is not None:
            g = dq * grad_out  # grad_out is a scalar, or [N] for reduction='none'
            d_weight = torch.zeros(ctx.weight_shape, dtype=torch.float32, device=dq.device)
            d_weight.index_add_(0, taken_tok, g[:, None] * hidden.to(torch.float32))
            d_weight = d_weight.to(hidden.dtype)
        return (d_hidden, d_weight) + (None,) * 15


def _check(hidden, weight, next_hidden, next_target_hidden, target_weight, actions, rewards, dones, seq_ids,
           action_ids, argmax, loss, reduction):
    """API-boundary checks: a ValueError naming the offending shapes, never a Triton crash."""
    if argmax not in ARGMAX or loss not in LOSSES or reduction not in REDUCTIONS:
        raise ValueError(f"argmax must be one of {ARGMAX}, loss one of {LOSSES}, reduction one of {REDUCTIONS}; got "
                         f"{argmax!r}, {loss!r}, {reduction!r}")
    mats = {"hidden": hidden, "next_hidden": next_hidden, "next_target_hidden": next_target_hidden, "weight": weight,
            "target_weight": target_weight}
    for name, t in mats.items():
        if not isinstance(t, torch.Tensor) or t.ndim != 2:
            raise ValueError(f"{name} must be a 2-D tensor, got {getattr(t, 'shape', type(t).__name__)}")
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} must be floating point (fp32, bf16, fp16, fp64), got {t.dtype}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (call .contiguous()), got strides {t.stride()}")
    n, d = hidden.shape
    for name in ("next_hidden", "next_target_hidden"):
        if mats[name].shape != hidden.shape:
            raise ValueError(f"{name} {tuple(mats[name].shape)} must match hidden {tuple(hidden.shape)} [N, d]")
    if weight.shape[1] != d or target_weight.shape != weight.shape:
        raise ValueError(f"weight {tuple(weight.shape)} and target_weight {tuple(target_weight.shape)} must be "
                         f"[V or A, d] with d = {d} (hidden {tuple(hidden.shape)})")
    dtypes = {t.dtype for t in mats.values()}
    if len(dtypes) != 1:
        raise ValueError(f"hidden states and head weights must share one dtype, got "
                         f"{ {k: str(t.dtype) for k, t in mats.items()} }")
    if len({t.device for t in mats.values()} | {t.device for t in (actions, rewards, dones, seq_ids)}) != 1:
        raise ValueError("all tensors must be on one device")
    for name, t in (("actions", actions), ("rewards", rewards), ("dones", dones), ("seq_ids", seq_ids)):
        if not isinstance(t, torch.Tensor) or t.shape != (n,):
            raise ValueError(f"{name} must be a tensor of shape [N] = [{n}], got {getattr(t, 'shape', t)}")
    if actions.dtype.is_floating_point or seq_ids.dtype.is_floating_point:
        raise ValueError(f"actions and seq_ids must be integer tensors, got {actions.dtype}, {seq_ids.dtype}")
    n_actions = weight.shape[0] if action_ids is None else action_ids.numel()
    if action_ids is not None:
        if action_ids.ndim != 1 or action_ids.dtype.is_floating_point:
            raise ValueError(f"action_ids must be a 1-D integer tensor [A], got {action_ids.dtype} "
                             f"{tuple(action_ids.shape)}")
    elif argmax == "vocab":
        raise ValueError("argmax='vocab' needs the LM head [V, d] and action_ids [A]; with a dedicated Q-head "
                         "[A, d] use argmax='actions'")
    if n == 0:
        raise ValueError("need at least one transition (N >= 1)")
    if debug_checks(hidden):
        _check_values(weight, actions, seq_ids, action_ids, n_actions)


def _check_values(weight, actions, seq_ids, action_ids, n_actions) -> None:
    """The checks that read tensor values: one device-to-host sync on CUDA, so they run only where
    ``dispatch.debug_checks`` says (always on CPU tensors; on CUDA with ``ICRL_KERNELS_DEBUG=1``)."""
    ids = action_ids if action_ids is not None else torch.zeros(1, dtype=torch.int64, device=actions.device)
    bad = torch.stack([(ids < 0).any() | (ids >= weight.shape[0]).any(),
                       (actions < 0).any() | (actions >= n_actions).any(), (seq_ids < 0).any()]).tolist()  # one sync
    if bad[0]:
        raise ValueError(f"action_ids must index rows of weight [{weight.shape[0]}, d], got {action_ids.tolist()}")
    if bad[1]:
        raise ValueError(f"actions must be in 0..{n_actions - 1}, got values in {int(actions.min())}.."
                         f"{int(actions.max())}")
    if bad[2]:
        raise ValueError("seq_ids must be >= 0")


def q_td_loss(hidden, weight, next_hidden, next_target_hidden, actions, rewards, dones, seq_ids, *,
              action_ids=None, target_weight=None, gamma: float = 0.9, reward_scale: float = 30.0,
              argmax: str = "actions", loss: str = "paper", huber_delta: float = 1.0, reduction: str = "mean",
              norm_eps: float = 1e-6, backend: str | None = None, discounts=None) -> torch.Tensor:
    """Fused Q readout + Double-DQN TD loss (see the module docstring for the contract).

    Returns the loss: fp32 scalar, or fp32 ``[N]`` for ``reduction="none"`` (the reference path returns the
    inputs' dtype). ``backend``: ``None``/``"auto"`` (Triton on CUDA or under ``TRITON_INTERPRET=1``, else the
    torch reference), ``"triton"`` or ``"reference"``.
    """
    target_weight = weight if target_weight is None else target_weight
    _check(hidden, weight, next_hidden, next_target_hidden, target_weight, actions, rewards, dones, seq_ids,
           action_ids, argmax, loss, reduction)
    kw = {"gamma": gamma, "reward_scale": reward_scale, "argmax": argmax, "loss": loss, "huber_delta": huber_delta,
          "reduction": reduction, "norm_eps": norm_eps}
    if discounts is not None and (discounts.shape != rewards.shape or discounts.device != rewards.device
                                  or not discounts.is_floating_point()):
        raise ValueError(f"discounts must be a float tensor shaped like rewards {tuple(rewards.shape)} on "
                         f"{rewards.device}, got {discounts.dtype} {tuple(discounts.shape)} on {discounts.device}")
    chosen = select_backend(hidden, weight, backend=backend)
    if chosen == "reference" or hidden.dtype == torch.float64:  # fp64 is the oracle's dtype: reference only
        return q_td_loss_reference(hidden, weight, next_hidden, next_target_hidden, actions, rewards, dones,
                                   seq_ids, action_ids=action_ids, target_weight=target_weight, discounts=discounts,
                                   **kw)
    if discounts is not None:  # y = r + gamma * (1 - done) * q_next with gamma 1 and done 1 - discount
        gamma, dones = 1.0, 1.0 - discounts.to(torch.float32)
    ids = (torch.arange(weight.shape[0], device=weight.device) if action_ids is None else action_ids).to(torch.int64)
    return QTDLossFunction.apply(hidden, weight, next_hidden.detach(), next_target_hidden.detach(),
                                 target_weight.detach(), actions.to(torch.int64).contiguous(),
                                 rewards.to(torch.float32).contiguous(), dones.to(torch.float32).contiguous(),
                                 seq_ids.to(torch.int64).contiguous(), ids.contiguous(), float(gamma),
                                 float(reward_scale), argmax, loss, float(huber_delta), reduction, float(norm_eps))


class QTDLoss(torch.nn.Module):
    """Module form of :func:`q_td_loss`; the loss settings are fixed at construction."""

    def __init__(self, *, gamma: float = 0.9, reward_scale: float = 30.0, argmax: str = "actions",
                 loss: str = "paper", huber_delta: float = 1.0, reduction: str = "mean", norm_eps: float = 1e-6,
                 backend: str | None = None):
        super().__init__()
        if not (0.0 <= gamma <= 1.0) or not math.isfinite(reward_scale):
            raise ValueError(f"gamma must be in [0, 1] and reward_scale finite, got {gamma}, {reward_scale}")
        self.kw = {"gamma": gamma, "reward_scale": reward_scale, "argmax": argmax, "loss": loss,
                   "huber_delta": huber_delta, "reduction": reduction, "norm_eps": norm_eps, "backend": backend}

    def forward(self, hidden, weight, next_hidden, next_target_hidden, actions, rewards, dones, seq_ids, *,
                action_ids=None, target_weight=None):
        return q_td_loss(hidden, weight, next_hidden, next_target_hidden, actions, rewards, dones, seq_ids,
                         action_ids=action_ids, target_weight=target_weight, **self.kw)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kw.items())
