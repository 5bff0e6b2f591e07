"""Triton kernels vs the fp64 PyTorch references (kernels/reference.py).

Runs on CUDA, or on CPU tensors under TRITON_INTERPRET=1 (small shapes: the interpreter is slow; the
launchers pick 16-wide blocks there so multi-chunk, multi-segment and multi-V-block paths are all exercised).
"""

import pytest
import torch

from tests.conftest import assert_close, requires_cuda, requires_triton_interpret
from tnllm import kernels
from tnllm.kernels import reference as ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"
TOL = {torch.float32: 5e-3 if ON_GPU else 1e-5, torch.float16: 5e-3, torch.bfloat16: 1e-2}


def _attn_inputs(B, T, H, D, E, dtype, n_state=None, rate_scale=1.0, device=DEVICE):
    q, k = (torch.randn(B, T, H, D, device=device).to(dtype) for _ in range(2))
    v = torch.randn(B, T, H, E, device=device).to(dtype)
    log_decay = -rate_scale * torch.rand(H, device=device)
    s0 = None if n_state is None else torch.randn(n_state, H, D, E, device=device)
    return q, k, v, log_decay, s0


def lightning_attn_triton(q, k, v, log_decay, *, initial_state=None, output_final_state=False, cu_seqlens=None,
                          _seg_len=None):
    """The Triton launcher, optionally with a forced segment length (multi-segment paths at tiny T)."""
    from tnllm.kernels.triton_chunk import _lightning_attn

    return _lightning_attn(q, k, v, log_decay, initial_state, output_final_state, cu_seqlens, _seg_len)


def _run_both(q, k, v, log_decay, s0, cu=None, seg_len=None, grads=True):
    """(reference outputs, triton outputs): o, final state and, if grads, dq, dk, dv, ds0."""
    leaves_r = [x.detach().double().requires_grad_(grads) for x in (q, k, v)]
    leaves_t = [x.detach().clone().requires_grad_(grads) for x in (q, k, v)]
    s0_r = None if s0 is None else s0.detach().double().requires_grad_(grads)
    s0_t = None if s0 is None else s0.detach().clone().requires_grad_(grads)
    o_r, f_r = ref.lightning_attn_naive(*leaves_r, log_decay, initial_state=s0_r, output_final_state=True,
                                        cu_seqlens=cu)
    o_t, f_t = lightning_attn_triton(*leaves_t, log_decay, initial_state=s0_t, output_final_state=True,
                                     cu_seqlens=cu, _seg_len=seg_len)
    out_r, out_t = {"o": o_r, "final": f_r}, {"o": o_t, "final": f_t}
    if grads:
        do, df = torch.randn_like(o_r), torch.randn_like(f_r)
        ((o_r * do).sum() + (f_r * df).sum()).backward()
        ((o_t.double() * do).sum() + (f_t.double() * df).sum()).backward()
        for name, lr, lt in zip(("dq", "dk", "dv"), leaves_r, leaves_t):
            out_r[name], out_t[name] = lr.grad, lt.grad
        if s0 is not None:
            out_r["ds0"], out_t["ds0"] = s0_r.grad, s0_t.grad
    return out_r, out_t


CHUNK_CASES = [
    pytest.param(1, 1, 2, 16, 16, None, id="B1-T1-H2-D16"),
    pytest.param(2, 63, 2, 16, 32, None, id="B2-T63-H2-D16-E32"),
    pytest.param(2, 65, 3, 32, 16, 32, id="B2-T65-H3-D32-E16-seg32"),
    pytest.param(1, 100, 2, 32, 32, 16, id="B1-T100-H2-D32-seg16"),
]


@requires_triton_interpret
class TestChunk:
    @pytest.mark.parametrize("B,T,H,D,E,seg", CHUNK_CASES)
    @pytest.mark.parametrize("with_s0", [False, True], ids=["no-s0", "s0"])
    def test_fwd_bwd_fp32(self, B, T, H, D, E, seg, with_s0):
        inputs = _attn_inputs(B, T, H, D, E, torch.float32, n_state=B if with_s0 else None)
        out_r, out_t = _run_both(*inputs, seg_len=seg)
        for name in out_r:
            assert_close(name, out_r[name], out_t[name], rel=TOL[torch.float32])

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
    def test_fwd_bwd_16bit(self, dtype):
        inputs = _attn_inputs(2, 65, 2, 32, 16, dtype, n_state=2)
        out_r, out_t = _run_both(*inputs, seg_len=32)
        for name in out_r:
            assert_close(name, out_r[name], out_t[name], rel=TOL[dtype])
        assert out_t["o"].dtype == dtype and out_t["final"].dtype == torch.float32

    @pytest.mark.parametrize("seg", [None, 16], ids=["whole", "seg16"])
    def test_varlen(self, seg):
        lens = [5, 37, 1, 27]
        cu = torch.tensor([0, 5, 42, 43, 70], device=DEVICE)
        inputs = _attn_inputs(1, sum(lens), 2, 16, 32, torch.float32, n_state=len(lens))
        out_r, out_t = _run_both(*inputs, cu=cu, seg_len=seg)
        for name in out_r:
            assert_close(name, out_r[name], out_t[name], rel=TOL[torch.float32])

    @pytest.mark.parametrize("case", ["fp32-seg", "bf16-seg", "varlen-seg"])
    def test_chunk_kernel_untransposed_state(self, case, monkeypatch):
        """The chunk kernel with its state held as [K, V] (what the wide head dims run), forced for every width,
        against the float64 reference: forward, final state and every gradient, with segments, odd lengths, batch > 1
        (the other tests run the transposed state, the default)."""
        from tnllm.kernels import triton_chunk

        monkeypatch.setitem(triton_chunk.__dict__, "_CFG" if ON_GPU else "_CFG_INTERPRET",
                            {**(triton_chunk._CFG if ON_GPU else triton_chunk._CFG_INTERPRET), "STATE_T": False})
        cu = None
        if case == "fp32-seg":
            dtype, inputs = torch.float32, _attn_inputs(2, 65, 3, 32, 16, torch.float32, n_state=2)
        elif case == "bf16-seg":
            dtype, inputs = torch.bfloat16, _attn_inputs(2, 65, 2, 32, 16, torch.bfloat16, n_state=2)
        else:
            cu = torch.tensor([0, 5, 42, 43, 70], device=DEVICE)
            dtype, inputs = torch.float32, _attn_inputs(1, 70, 2, 16, 32, torch.float32, n_state=4)
        out_r, out_t = _run_both(*inputs, cu=cu, seg_len=16 if cu is not None else 32)
        for name in out_r:
            assert_close(name, out_r[name], out_t[name], rel=TOL[dtype])

    def test_zero_rate_stays_causal(self):
        q, k, v, _, _ = _attn_inputs(1, 40, 2, 16, 16, torch.float32)
        a = torch.zeros(2, device=DEVICE)
        o, _ = lightning_attn_triton(q, k, v, a, _seg_len=16)
        v2 = v.clone()
        v2[:, 20:] += 100.0  # the future must not leak into earlier outputs
        o2, _ = lightning_attn_triton(q, k, v2, a, _seg_len=16)
        assert torch.equal(o[:, :20], o2[:, :20])
        o_r, _ = ref.lightning_attn_naive(q.double(), k.double(), v.double(), a)
        assert_close("o rate0", o_r, o, rel=TOL[torch.float32])

    @pytest.mark.parametrize("B, T, segments", [(32, 2048, 1), (8, 8192, 1), (2, 32768, 5), (1, 131072, 9)])
    def test_segments_only_when_sms_would_idle(self, monkeypatch, B, T, segments):
        """The GPU plan's segment rule (host arithmetic, run here with an H200's 132 SMs): one segment per sequence
        while (sequence, head, slice) programs fill the SMs, else segments for 2 programs per SM; the counts are
        the fastest ones of the H200 sweep (bench/results/chunk-sweep-h200.json) for H = 32, D = E = 128."""
        from tnllm.kernels import triton_chunk

        monkeypatch.setattr(triton_chunk, "triton_interpreted", lambda device: False)
        monkeypatch.setattr(triton_chunk, "_sm_count", lambda device: 132)
        plan = triton_chunk._Plan(B, T, 32, 128, 128, "cpu", None, None)
        assert (plan.NS, plan.segmented) == (segments, segments > 1)

    def test_strong_decay_is_finite(self):
        q, k, v, _, s0 = _attn_inputs(1, 70, 2, 16, 16, torch.float32, n_state=1)
        a = torch.tensor([0.0, -30.0], device=DEVICE)
        o, f = lightning_attn_triton(q, k, v, a, initial_state=s0, output_final_state=True, _seg_len=32)
        o_r, f_r = ref.lightning_attn_naive(q.double(), k.double(), v.double(), a, initial_state=s0.double(),
                                            output_final_state=True)
        assert_close("o", o_r, o, rel=TOL[torch.float32])
        assert_close("final", f_r, f, rel=TOL[torch.float32])

    def test_segment_states_keep_weak_decay(self):
        """Near λ = 1 a segmented call's final state (forward segment states) and d initial_state (reverse ones)
        are as accurate as a one-segment call: the segment kernel decays chunk by chunk, so the decayed 16-bit
        k it multiplies is within λ^BT of k, never λ^L (rounding that power away cost 7x the error). fp16: the
        interpreter rounds it to nearest like the GPU does bf16 (its bf16 cast truncates).

        The bound is relative to the one-segment call on the same device, not a fixed number: its own error
        depends on how the device's dots round (interpreter 8.7e-6, H200 tensor cores 3.5e-5 on the final
        state), while a segmented call must stay within 1.5x of it (+ 1e-6 for rounding noise); the
        whole-segment powers gave 7x (6.3e-5 against 8.7e-6 in the interpreter, seg=128)."""
        T = 512
        q, k, v, _, s0 = _attn_inputs(1, T, 2, 16, 16, torch.float16, n_state=1)
        a = torch.full((2,), -1e-6, device=DEVICE)
        do = torch.randn(1, T, 2, 16, device=DEVICE).half().double()  # exact in fp16: no rounding of dO
        df = torch.randn(1, 2, 16, 16, device=DEVICE).half().double()
        s0_r = s0.double().requires_grad_()
        o_r, f_r = ref.lightning_attn_naive(q.double(), k.double(), v.double(), a, initial_state=s0_r,
                                            output_final_state=True)
        ((o_r * do).sum() + (f_r * df).sum()).backward()

        def errors(seg):
            """rel-L2 of the final state and d initial_state against fp64, with segments of `seg` tokens."""
            s0_t = s0.clone().requires_grad_()
            o, f = lightning_attn_triton(q, k, v, a, initial_state=s0_t, output_final_state=True, _seg_len=seg)
            ((o.double() * do).sum() + (f.double() * df).sum()).backward()
            return {name: ((got.double() - want).norm() / want.norm()).item()
                    for name, want, got in (("final", f_r, f), ("ds0", s0_r.grad, s0_t.grad))}

        one = errors(T)  # one segment per sequence: the device's own rounding of this call
        for name, e in one.items():  # sanity: inputs exact in fp16, fp32 state: well under one fp16 rounding
            assert e < 2.0 ** -11, f"{name} one segment: rel-L2 {e:.3e}"
        for seg in (None, 128):  # as planned, and forced to 4 segments
            for name, e in errors(seg).items():
                limit = 1.5 * one[name] + 1e-6
                assert e <= limit, f"{name} seg={seg}: rel-L2 {e:.3e} > {limit:.3e} (one segment {one[name]:.3e})"

    def test_signatures_match_reference_twins(self):
        import inspect

        from tnllm.kernels import triton_chunk, triton_glu, triton_norm, triton_step

        def params(f):
            return [(p.name, p.kind, p.default) for p in inspect.signature(f).parameters.values()]

        assert params(triton_chunk.lightning_attn_triton) == params(ref.lightning_attn_chunked)[:-1]  # no chunk_size
        assert params(triton_chunk.lightning_attn_triton) == params(ref.lightning_attn_naive)
        assert params(triton_step.lightning_attn_step_triton) == params(ref.lightning_attn_step_ref)
        assert params(triton_norm.srmsnorm_triton) == params(ref.srmsnorm_ref)
        assert params(triton_norm.add_srmsnorm_triton) == params(ref.add_srmsnorm_ref)
        assert params(triton_norm.gated_srmsnorm_triton) == params(ref.gated_srmsnorm_ref)
        assert params(triton_glu.glu_mul_triton) == params(ref.glu_mul_ref)

    def test_dispatch_and_shape_errors(self):
        q, k, v, a, s0 = _attn_inputs(2, 33, 2, 16, 16, torch.float32, n_state=2)
        with kernels.use_impl("triton"):
            o, f = kernels.lightning_attn(q, k, v, a, initial_state=s0, output_final_state=True)
            assert kernels.lightning_attn(q, k, v, a)[1] is None
            with pytest.raises(ValueError, match="initial_state"):
                kernels.lightning_attn(q, k, v, a, initial_state=s0[:1])
        o_r, f_r = ref.lightning_attn_chunked(q.double(), k.double(), v.double(), a, initial_state=s0.double(),
                                              output_final_state=True)
        assert_close("o", o_r, o, rel=TOL[torch.float32])
        assert_close("final", f_r, f, rel=TOL[torch.float32])


@requires_triton_interpret
class TestStep:
    @pytest.mark.parametrize("B,H,D,E,dtype", [
        pytest.param(1, 2, 16, 16, torch.float32, id="B1-H2-D16-fp32"),
        pytest.param(5, 3, 32, 16, torch.float32, id="B5-H3-D32-E16-fp32"),
        pytest.param(4, 2, 16, 32, torch.bfloat16, id="B4-H2-D16-E32-bf16"),
    ])
    def test_step_in_place(self, B, H, D, E, dtype):
        q, k = (torch.randn(B, H, D, device=DEVICE).to(dtype) for _ in range(2))
        v = torch.randn(B, H, E, device=DEVICE).to(dtype)
        a = -torch.rand(H, device=DEVICE)
        state = torch.randn(B, H, D, E, device=DEVICE)
        s_ref = state.double().clone()
        ptr = state.data_ptr()
        with kernels.use_impl("triton"):
            o = kernels.lightning_attn_step(q, k, v, a, state)
        o_ref = ref.lightning_attn_step_ref(q.double(), k.double(), v.double(), a, s_ref)
        assert state.data_ptr() == ptr and o.dtype == dtype and o.shape == (B, H, E)
        assert_close("state", s_ref, state, rel=1e-5)
        assert_close("o", o_ref, o, rel=TOL[dtype] if dtype != torch.float32 else 1e-5)

    @pytest.mark.parametrize("deferred", [False, True], ids=["", "row-ms"])
    @pytest.mark.parametrize("act", ["silu", "none"])
    @pytest.mark.parametrize("pool", [False, True], ids=["no-slots", "slots"])
    @pytest.mark.parametrize("B,H,D,dtype", [
        pytest.param(3, 2, 16, torch.float32, id="B3-H2-D16-fp32"),
        pytest.param(2, 3, 24, torch.bfloat16, id="B2-H3-D24-bf16"),
        pytest.param(4, 2, 16, torch.float16, id="B4-H2-D16-fp16"),
    ])
    def test_step_fused_activation(self, B, H, D, dtype, pool, act, deferred):
        """The activation applied inside the step, on strided q/k/v views of one fused projection output; with
        row_ms (a deferred norm: 5 partial mean squares per row) q, k, v are scaled by the norm first."""
        qkvu = torch.randn(B, 1, 4 * H * D, device=DEVICE).to(dtype)  # [B, T=1, 4 hd], like qkvu_proj's output
        q, k, v = (t.view(B, 1, H, D)[:, 0] for t in qkvu.chunk(4, dim=-1)[:3])  # [B, H, D] views, row stride 4 hd
        assert q.stride(0) == 4 * H * D and not q.is_contiguous()
        a = -torch.rand(H, device=DEVICE)
        slots = torch.tensor([4, 1, 2, 0][:B], device=DEVICE) if pool else None
        state = torch.randn(5 if pool else B, H, D, D, device=DEVICE)
        s_ref = state.double().clone()
        row_ms = torch.rand(5, B, device=DEVICE) * 0.5 if deferred else None
        with kernels.use_impl("triton"):
            o = kernels.lightning_attn_step(q, k, v, a, state, slots, act=act, row_ms=row_ms, eps=1e-5)
        r = 1 if row_ms is None else torch.rsqrt(row_ms.double().sum(0) + 1e-5)[:, None, None]  # [B, 1, 1]
        o_ref = ref.lightning_attn_step_ref(q.double() * r, k.double() * r, v.double() * r, a, s_ref, slots, act=act)
        assert o.dtype == dtype
        assert_close("state", s_ref, state, rel=1e-5)
        assert_close("o", o_ref, o, rel=TOL[dtype] if dtype != torch.float32 else 1e-5)

    @pytest.mark.parametrize("deferred", [False, True], ids=["", "row-ms"])
    @pytest.mark.parametrize("B,H,D,E,dtype,pool", [
        pytest.param(3, 2, 16, 16, torch.float32, False, id="B3-H2-D16-fp32"),
        pytest.param(2, 3, 24, 40, torch.bfloat16, True, id="B2-H3-D24-E40-bf16-slots"),
    ])
    def test_step_lrpe(self, B, H, D, E, dtype, pool, deferred):
        """An LRPE layer's step: act, then the cos/sin features of each row's position (up to 200,000, where the
        angles reach 10⁵ radians) inside the kernel, on strided q, k views; the state's contracted dim 2 D."""
        qkv = torch.randn(B, 3 * H * D, device=DEVICE).to(dtype)  # [B, 3 hd]
        q, k = (t.view(B, H, D) for t in qkv[:, :2 * H * D].chunk(2, dim=-1))  # [B, H, D] views
        v = torch.randn(B, H, E, device=DEVICE).to(dtype)
        a = -torch.rand(H, device=DEVICE)
        theta = torch.rand(H, D, device=DEVICE) ** 2  # in (0, 1), as trained thetas
        positions = torch.tensor([0, 199_999, 37][:B], device=DEVICE)
        slots = torch.tensor([2, 0, 1][:B], device=DEVICE) if pool else None
        state = torch.randn(3 if pool else B, H, 2 * D, E, device=DEVICE)
        s_ref = state.double().clone()
        row_ms = torch.rand(4, B, device=DEVICE) * 0.5 if deferred else None
        with kernels.use_impl("triton"):
            o = kernels.lightning_attn_step(q, k, v, a, state, slots, act="silu", row_ms=row_ms,
                                            lrpe=(theta, positions))
        o_ref = ref.lightning_attn_step_ref(q.double(), k.double(), v.double(), a, s_ref, slots, act="silu",
                                            row_ms=row_ms, lrpe=(theta, positions))
        assert o.dtype == dtype and o.shape == (B, H, E)
        assert_close("state", s_ref, state, rel=1e-5)
        assert_close("o", o_ref, o, rel=TOL[dtype] if dtype != torch.float32 else 1e-5)

    def test_step_lrpe_equals_the_layer_features(self):
        """The reference's LRPE step == `tnllm.layers.Lrpe`'s features through a plain step (fp32)."""
        from tnllm.layers import Lrpe

        B, H, D = 3, 2, 8
        lrpe = Lrpe(H, D)
        lrpe.reset_parameters()
        q, k, v = (torch.randn(B, 1, H, D) for _ in range(3))
        positions = torch.tensor([[5], [70_000], [0]])
        a = -torch.rand(H)
        state = torch.randn(B, H, 2 * D, D)
        state2 = state.clone()
        fq, fk = lrpe(q, k, positions)  # [B, 1, H, 2 D]
        expected = ref.lightning_attn_step_ref(fq[:, 0], fk[:, 0], v[:, 0], a, state)
        got = ref.lightning_attn_step_ref(q[:, 0], k[:, 0], v[:, 0], a, state2,
                                          lrpe=(lrpe.theta.detach()[:, 0], positions[:, 0]))
        assert torch.equal(state, state2) and torch.equal(expected, got)

    @pytest.mark.parametrize("tile", [(16, 4), (32, 2), (64, 8)], ids=lambda t: f"bv{t[0]}-w{t[1]}")
    def test_step_any_tile(self, tile, monkeypatch):
        """Every launch tile the table may pick, BV below E (several programs per head) included, on pool slots."""
        from tnllm.kernels import triton_step

        monkeypatch.setattr(triton_step, "TILE", tile)
        B, H, D, E = 3, 2, 16, 48
        q, k = (torch.randn(B, H, D, device=DEVICE) for _ in range(2))
        v = torch.randn(B, H, E, device=DEVICE)
        a = -torch.rand(H, device=DEVICE)
        slots = torch.tensor([2, 0, 3], device=DEVICE)
        state = torch.randn(4, H, D, E, device=DEVICE)
        s_ref = state.double().clone()
        with kernels.use_impl("triton"):
            o = kernels.lightning_attn_step(q, k, v, a, state, slots, act="silu")
        o_ref = ref.lightning_attn_step_ref(q.double(), k.double(), v.double(), a, s_ref, slots, act="silu")
        assert_close("state", s_ref, state, rel=1e-5)
        assert_close("o", o_ref, o, rel=1e-5)

    @pytest.mark.parametrize("impl", ["triton", "torch"])
    def test_step_rejects_bad_input(self, impl):
        q = torch.randn(1, 2, 16, device=DEVICE)
        state, a = torch.zeros(1, 2, 16, 16, device=DEVICE), -torch.rand(2, device=DEVICE)
        with kernels.use_impl(impl):
            with pytest.raises(ValueError, match="act must be one of"):
                kernels.lightning_attn_step(q, q, q, a, state, act="gelu")
            with pytest.raises(ValueError, match="row_ms must be fp32"):
                kernels.lightning_attn_step(q, q, q, a, state, row_ms=torch.zeros(3, 2, device=DEVICE))  # 2 rows'
            with pytest.raises(ValueError, match="row_ms must be fp32"):
                kernels.lightning_attn_step(q, q, q, a, state, row_ms=torch.zeros(3, 1, device=DEVICE).half())

    def test_steps_continue_prefill(self):
        """Prefill with the chunk kernel, then decode token by token == one long prefill."""
        from tnllm.kernels.triton_step import lightning_attn_step_triton

        q, k, v, a, _ = _attn_inputs(2, 24, 2, 16, 16, torch.float32)
        o_full, _ = lightning_attn_triton(q, k, v, a)
        _, state = lightning_attn_triton(q[:, :20], k[:, :20], v[:, :20], a, output_final_state=True)
        outs = [lightning_attn_step_triton(q[:, t], k[:, t], v[:, t], a, state) for t in range(20, 24)]
        assert_close("decode", o_full[:, 20:], torch.stack(outs, 1), rel=TOL[torch.float32])


@requires_triton_interpret
class TestNorm:
    @pytest.mark.parametrize("shape,dtype", [
        pytest.param((3, 5, 64), torch.float32, id="3x5x64-fp32"),
        pytest.param((4, 100), torch.bfloat16, id="4x100-bf16"),
        pytest.param((2, 9000), torch.float32, id="2x9000-fp32"),
    ])
    def test_fwd_bwd(self, shape, dtype):
        x = torch.randn(shape, device=DEVICE).to(dtype).requires_grad_()
        x_r = x.detach().double().requires_grad_()
        with kernels.use_impl("triton"):
            y = kernels.srmsnorm(x, 1e-6)
        y_r = ref.srmsnorm_ref(x_r, 1e-6)
        dy = torch.randn_like(y_r)
        (y.double() * dy).sum().backward()
        (y_r * dy).sum().backward()
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        assert y.dtype == dtype
        assert_close("y", y_r, y, rel=tol)
        assert_close("dx", x_r.grad, x.grad, rel=tol)


def _bf16_ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in units of the last place between two bf16 tensors of one sign pattern."""
    return (a.view(torch.int16).int() - b.view(torch.int16).int()).abs().max().item()


# Odd widths (a masked tail) and one above the interpreter's 1024 block (two passes over the row).
FUSED_NORM_CASES = [
    pytest.param((3, 5, 67), torch.float32, id="3x5x67-fp32"),
    pytest.param((2, 4, 67), torch.bfloat16, id="2x4x67-bf16"),
    pytest.param((3, 1100), torch.float16, id="3x1100-fp16"),
    pytest.param((2, 1, 1100), torch.bfloat16, id="2x1x1100-bf16"),
    pytest.param((4, 1100), torch.float32, id="4x1100-fp32"),
]


@requires_triton_interpret
class TestFusedNorm:
    """add_srmsnorm and gated_srmsnorm (forward-only decode fusions) against their references and the unfused ops."""

    @pytest.mark.parametrize("shape,dtype", FUSED_NORM_CASES)
    def test_add_srmsnorm(self, shape, dtype):
        from tnllm.kernels.triton_norm import srmsnorm_triton

        x = torch.randn(shape, device=DEVICE).to(dtype)
        delta = torch.randn(*shape[:-1], 2 * shape[-1], device=DEVICE).to(dtype)[..., 1::2]  # strided columns
        with kernels.use_impl("triton"):
            s, y = kernels.add_srmsnorm(x, delta, 1e-6)
        assert s.dtype == y.dtype == dtype and s.shape == y.shape == x.shape
        if dtype == torch.bfloat16 and not ON_GPU:
            # the interpreter casts fp32 -> bf16 toward zero (the GPU rounds to nearest even: TestGPUShapes)
            assert _bf16_ulps(s, x + delta) <= 1
        else:
            assert torch.equal(s, x + delta)
        assert torch.equal(y, srmsnorm_triton(s, 1e-6))  # the norm of the rounded sum, bitwise
        _, y_ref = ref.add_srmsnorm_ref(x.double(), delta.double(), 1e-6)
        assert_close("y", y_ref, y, rel=1e-5 if dtype == torch.float32 else 1e-2)

    def test_add_srmsnorm_promotes_like_the_add(self):
        """Under autocast the residual is fp32 and the mixer output bf16: s is fp32, exactly x + delta."""
        x = torch.randn(3, 67, device=DEVICE)
        delta = torch.randn(3, 67, device=DEVICE).to(torch.bfloat16)
        with kernels.use_impl("triton"):
            s, y = kernels.add_srmsnorm(x, delta)
        assert s.dtype == y.dtype == torch.float32
        assert torch.equal(s, x + delta)
        assert_close("y", ref.srmsnorm_ref((x + delta).double()), y, rel=1e-5)

    @pytest.mark.parametrize("shape,dtype", FUSED_NORM_CASES)
    def test_gated_srmsnorm(self, shape, dtype):
        o = torch.randn(shape, device=DEVICE).to(dtype)
        qkvu = torch.randn(*shape[:-1], 4 * shape[-1], device=DEVICE).to(dtype)
        u = qkvu.chunk(4, dim=-1)[3]  # the gate: a strided view, as in the token mixer
        with kernels.use_impl("triton"):
            y = kernels.gated_srmsnorm(o, u, 1e-6)
        assert y.dtype == dtype and y.shape == o.shape
        y_ref = ref.gated_srmsnorm_ref(o.double(), u.double(), 1e-6)
        assert_close("y", y_ref, y, rel=1e-5 if dtype == torch.float32 else TOL[dtype])
        with kernels.use_impl("triton"):
            unfused = u * kernels.srmsnorm(o, 1e-6)
        assert_close("vs unfused", unfused, y, rel=1e-5 if dtype == torch.float32 else TOL[dtype])

    def test_shape_mismatch_raises(self):
        x = torch.randn(2, 67, device=DEVICE)
        with kernels.use_impl("triton"):
            with pytest.raises(ValueError, match="x and delta"):
                kernels.add_srmsnorm(x, x[:1])
            with pytest.raises(ValueError, match="o and u"):
                kernels.gated_srmsnorm(x, x[:, :3])

    def test_autograd_takes_the_differentiable_ops(self):
        """With inputs that require grad the dispatch composes Triton's differentiable norm instead of the
        forward-only fused kernels; the gradients equal the fp64 reference's."""
        x, delta, u = (torch.randn(3, 67, device=DEVICE).requires_grad_() for _ in range(3))
        leaves = [t.detach().double().requires_grad_() for t in (x, delta, u)]
        with kernels.use_impl("triton"):
            assert kernels._fused_impl(x, delta) == "unfused"
            s, y = kernels.add_srmsnorm(x, delta)
            g = kernels.gated_srmsnorm(y, u)
            with torch.no_grad():
                assert kernels._fused_impl(x, delta) == "triton"
        s_r, y_r = ref.add_srmsnorm_ref(leaves[0], leaves[1])
        g_r = ref.gated_srmsnorm_ref(y_r, leaves[2])
        ds, dg = torch.randn_like(s_r), torch.randn_like(g_r)
        ((s.double() * ds).sum() + (g.double() * dg).sum()).backward()
        ((s_r * ds).sum() + (g_r * dg).sum()).backward()
        for name, t, r in zip(("dx", "ddelta", "du"), (x, delta, u), leaves):
            assert_close(name, r.grad, t.grad, rel=1e-5)


@requires_triton_interpret
class TestGluMul:
    @pytest.mark.parametrize("shape,dtype", [
        pytest.param((1, 1, 2 * 1500), torch.bfloat16, id="1x1x1500-bf16"),  # two blocks, the second masked
        pytest.param((5, 3, 2 * 37), torch.float32, id="5x3x37-fp32"),
        pytest.param((16, 2 * 200), torch.float16, id="16x200-fp16"),
    ])
    def test_equals_the_product_of_the_halves(self, shape, dtype):
        """One rounding of the exact product: torch's a * b, bit for bit (the interpreter casts fp32 to bf16 by
        truncation, so there within one bf16 unit of the last place)."""
        y = torch.randn(*shape, device=DEVICE).to(dtype)
        with kernels.use_impl("triton"):
            out = kernels.glu_mul(y)
        assert out.dtype == dtype and out.shape == (*shape[:-1], shape[-1] // 2)
        expected = ref.glu_mul_ref(y)
        if dtype == torch.bfloat16 and not ON_GPU:
            assert _bf16_ulps(out, expected) <= 1
        else:
            assert torch.equal(out, expected)

    def test_strided_rows_and_no_rows(self):
        wide = torch.randn(6, 100, device=DEVICE)
        y = wide[:, :64]  # rows 100 apart, last dim contiguous
        with kernels.use_impl("triton"):
            assert torch.equal(kernels.glu_mul(y), y[:, :32] * y[:, 32:])
            assert kernels.glu_mul(wide[:0, :64]).shape == (0, 32)
            with pytest.raises(ValueError, match="even"):
                kernels.glu_mul(wide[:, :63])
        with pytest.raises(ValueError, match="even"):
            ref.glu_mul_ref(wide[:, :63])

    def test_under_autograd_gradients_reach_both_halves(self):
        y = torch.randn(3, 8, device=DEVICE, requires_grad=True)
        with kernels.use_impl("triton"):
            kernels.glu_mul(y).sum().backward()
        assert torch.equal(y.grad, torch.cat([y[:, 4:], y[:, :4]], dim=-1).detach())


@requires_cuda
class TestGPUShapes:
    """Real shapes in bf16 on the GPU vs the fp32 chunked reference (also run by bench/kernels.py)."""

    @pytest.mark.parametrize("B,T,H,D,E", [
        pytest.param(2, 1000, 4, 128, 128, id="B2-T1000-H4-D128"),
        pytest.param(1, 3000, 2, 256, 128, id="B1-T3000-H2-D256-E128"),
        pytest.param(3, 500, 8, 64, 64, id="B3-T500-H8-D64"),
    ])
    def test_bf16_fwd_bwd(self, B, T, H, D, E):
        q, k, v, a, s0 = _attn_inputs(B, T, H, D, E, torch.bfloat16, n_state=B, rate_scale=0.1)
        q, k, v = (x / D ** 0.5 for x in (q, k, v))
        leaves = [x.float().requires_grad_() for x in (q, k, v)]
        o_r, f_r = ref.lightning_attn_chunked(*leaves, a, initial_state=s0, output_final_state=True)
        do = torch.randn_like(o_r)
        (o_r * do).sum().backward()
        for seg in (None, 256):
            xs = [x.detach().clone().requires_grad_() for x in (q, k, v)]
            o, f = lightning_attn_triton(*xs, a, initial_state=s0, output_final_state=True, _seg_len=seg)
            (o.float() * do).sum().backward()
            assert_close("o", o_r, o, rel=1e-2)
            assert_close("final", f_r, f, rel=1e-2)
            for name, lr, lt in zip(("dq", "dk", "dv"), leaves, xs):
                assert_close(name, lr.grad, lt.grad, rel=1e-2)

    def test_add_srmsnorm_bitwise_bf16(self):
        """On the GPU the fused add rounds to nearest even like torch's add, so s and y are bitwise the unfused ones."""
        from tnllm.kernels.triton_norm import add_srmsnorm_triton, srmsnorm_triton

        x, delta = (torch.randn(8, 4096, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        s, y = add_srmsnorm_triton(x, delta)
        assert torch.equal(s, x + delta)
        assert torch.equal(y, srmsnorm_triton(x + delta))

    def test_step_large_batch(self):
        B, H, D = 256, 8, 128
        q, k, v = (torch.randn(B, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        a = -torch.rand(H, device="cuda")
        state = torch.randn(B, H, D, D, device="cuda")
        s_ref = state.clone()
        with kernels.use_impl("triton"):
            o = kernels.lightning_attn_step(q, k, v, a, state)
        o_ref = ref.lightning_attn_step_ref(q, k, v, a, s_ref)
        assert_close("state", s_ref, state, rel=1e-5)
        assert_close("o", o_ref, o, rel=1e-2)

