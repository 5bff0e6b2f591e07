"""Sweep of the weight-only int8 kernel's launch configurations (kernels/triton_int8.py) on the GPU.

    python bench/int8_sweep.py --out bench/results/int8-sweep-h200.json.gz     # H200: under 5 minutes
    TRITON_INTERPRET=1 python bench/int8_sweep.py --tiny --out /tmp/s.json   # CPU, Triton interpreter, seconds
    python bench/int8_sweep.py --weights bf16 --prefill-rows "" --out bench/results/float-sweep-h200.json.gz

--weights bf16 sweeps the same kernel on bf16 weights (what decode products fused with the op before them run on
a float model, `prologue_linear_triton`): decode M only, no `magic` conversion, tiles sized for 2-byte weights,
checked against the bf16 weight in fp32; its table is `FLOAT_CONFIGS`.

For every decoder Linear shape of --preset plus its lm_head (tnl-7b: qkvu_proj 4096->16384, out_proj 4096->4096,
l1/l2 4096->11008, l3 11008->4096, lm_head 4096->64000), at decode M in --decode-rows and prefill M in
--prefill-rows (bf16 activations, no bias), it times:
* bf16: `F.linear` on the bf16 weight (cuBLAS);
* chosen: the kernel with the configuration `choose_config` picks now (the `CONFIGS` table);
* candidates (`Config` of triton_int8): decode M: the split-K "dot" grid (BN 32-256, BK 128-512, SPLIT_K 1-8,
  warps 4/8, stages 2-4), "dot_t" (the weight as the left dot operand), "dot" with `magic` int8 conversion, and
  the tensor-core-free "gemv" / "gemv_once" (BM rows of x per program, reduce per tile / once) and "gemv_word"
  (int32 words of the int8 weight, converted four bytes at a time); every candidate
  at M = 1, then at larger M the best --top of each family at M = 1 and the gemv tiles made for that many rows;
  prefill M: "dot" / "dot_t" GEMM tiles and "deq" (dequantise into a workspace, then cuBLAS).
Each timing: quant_gpu.time_us, i.e. a CUDA graph of one call on each of R weight copies (R copies >= --rotate-mib,
so L2 never holds the weight) replayed --reps times, median / R. Rows: us, tb_s (weight bytes / us: int8 q and
scales, or the bf16 weight), max_rel_err and rel_l2 against fp32 dequantise-then-matmul of the same int8 weight
(for bf16: the quantisation error itself), deterministic (two calls bitwise equal), ok (both checks pass).
The best five candidates of each (shape, M) are timed again with --confirm-reps; the best of those (status
"best") is printed as a `CONFIGS` row of triton_int8, with a "*" row per M bucket (best geometric mean of
time / per-shape best over the shapes that timed it).

Time: the kernels of every candidate are compiled first by --compile-workers processes into Triton's disk cache
(no worker failure can stop the sweep: what they miss compiles on first use). --budget-s bounds the whole run:
each shape gets its share of the time left (and each M its share of the shape's: M = 1 the most), and the
candidates a shape could not reach are counted in `skipped`. The JSON (--out; gzipped where its name ends in .gz,
as bench/results keeps the sweeps) is rewritten after every (shape, M); rows name their shape, whose sizes and
class are under `shapes`.
"""

from __future__ import annotations

import os
import sys

if "--tiny" in sys.argv:  # before anything imports Triton: its interpreter is chosen when kernels are defined
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import datetime  # noqa: E402
import functools  # noqa: E402
import gc  # noqa: E402
import gzip  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402
from quant_gpu import layer_copies, linear_shapes, time_us  # noqa: E402

from tnllm import TNLConfig  # noqa: E402
from tnllm.kernels import triton_int8 as ti  # noqa: E402
from tnllm.kernels.triton_int8 import Config, config_src, m_bucket, shape_class  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MID_M = 96  # prefill M up to this also times M- and M/2-row tiles and a 4-way K split (packed steps' rows)
SMEM = 220 * 1024  # bytes of shared memory a candidate may ask for (H200: 227 KiB per block)


def shapes(preset: str, tiny: bool = False) -> dict[str, tuple[int, int]]:
    """Name -> (in, out): the decoder Linears and the lm_head of `preset`; --tiny: two small ones, one of them
    odd (partial tiles everywhere)."""
    if tiny:
        return {"square": (64, 64), "odd": (70, 45)}
    cfg = TNLConfig.from_name(preset)
    return {**linear_shapes(cfg), "lm_head": (cfg.dim, cfg.vocab_size)}


def _dot_fits(bm: int, bn: int, bk: int, stages: int, weight_bytes: int = 1) -> bool:
    # pipelined operand buffers: (stages - 1) x (weight tile + 16-bit x tile)
    return max(stages - 1, 1) * bk * (weight_bytes * bn + 2 * bm) <= SMEM


def _gemv_fits(cfg: Config, lo: int, hi: int) -> bool:
    per_thread = cfg.BM * cfg.BN * cfg.BK // (32 * cfg.num_warps)  # fp32 products (or accumulators) per thread
    return lo <= per_thread <= hi


def decode_families(tiny: bool, float_weights: bool = False) -> dict[str, list[Config]]:
    """Family -> candidate tiles for decode M at M = 1 (SPLIT_K left 1: `splits` adds the K splits); float
    weights: no `magic` conversion (it converts int8), dot tiles sized for 2-byte weights."""
    if float_weights:
        return {family: [c for c in cs if not c.magic and (c.kind != "dot" or _dot_fits(16, c.BN, c.BK,
                                                                                     c.num_stages, 2))]
                for family, cs in decode_families(tiny).items() if family not in ("dot_magic", "gemv_word")}
    if tiny:  # the interpreter: a few small tiles of every kind
        return {"dot": [Config(16, 16, 16, num_stages=1), Config(16, 32, 32, num_stages=1)],
                "dot_t": [Config(16, 16, 32, num_stages=1, kind="dot_t")],
                "dot_magic": [Config(16, 16, 16, num_stages=1, magic=True)],
                "gemv": [Config(1, 16, 16, num_stages=1, kind="gemv"),
                         Config(1, 16, 32, num_stages=1, kind="gemv_once", magic=True)],
                "gemv_word": [Config(1, 16, 32, num_stages=1, kind="gemv_word")]}
    fam = {"dot": [Config(16, bn, bk, num_warps=w, num_stages=st)
                   for bn, bk, w, st in itertools.product((32, 64, 128, 256), (128, 256, 512), (4, 8), (2, 3, 4))
                   if _dot_fits(16, bn, bk, st)]}
    fam["dot_t"] = [Config(16, bn, bk, num_warps=4, num_stages=st, kind="dot_t", magic=mg)
                    for bn, bk, st, mg in itertools.product((64, 128), (128, 256, 512), (3, 4), (False, True))
                    if _dot_fits(16, bn, bk, st)]
    fam["dot_magic"] = [Config(16, bn, bk, num_warps=4, num_stages=st, magic=True)
                        for bn, bk, st in itertools.product((64, 128), (128, 256), (3, 4))]
    fam["gemv"] = gemv_tiles(1)
    fam["gemv_word"] = [Config(1, bn, bk, num_warps=w, num_stages=1, kind="gemv_word")
                        for bn, bk, w in itertools.product((8, 16, 32, 64, 128), (256, 512), (4, 8))
                        if 16 <= bn * bk // 4 // (32 * w) <= 128]  # accumulators per thread (one per word)
    return fam


def gemv_tiles(bm: int) -> list[Config]:
    """gemv tiles for BM rows of x: "gemv" with 32..128 fp32 products per thread (more spill), "gemv_once" (BM 1)
    with 16..64 accumulators per thread; BM > 1: `magic` conversion only (it needs fewer registers)."""
    out = []
    for kind, bn, bk, w, mg in itertools.product(("gemv", "gemv_once"), (8, 16, 32, 64), (256, 512, 1024), (4, 8),
                                                 (False, True)):
        cfg = Config(bm, bn, bk, num_warps=w, num_stages=1, kind=kind, magic=mg)
        if bm > 1 and (kind == "gemv_once" or not mg or bk > 512 or bn > 32):
            continue
        if _gemv_fits(cfg, 32, 128) if kind == "gemv" else (w == 4 and _gemv_fits(cfg, 16, 64)):
            out.append(cfg)
    return out


def row_tiles(m: int, tiny: bool) -> list[Config]:
    """gemv tiles made for M > 1 rows: BM = M and M / 2 (from 2 to 16)."""
    if tiny:
        return [Config(min(triton.next_power_of_2(m), 4), 16, 16, num_stages=1, kind="gemv")]
    return [c for bm in sorted({m // 2, m}) if 2 <= bm <= 16 for c in gemv_tiles(bm)]


def prefill_tiles(m: int, tiny: bool) -> list[Config]:
    """GEMM tiles for prefill M (SPLIT_K 1; `splits` adds 2 at M <= 512, and 4 at M <= MID_M); M <= MID_M (a
    packed step's decode rows plus a short prompt chunk) adds tiles of M and M / 2 rows (powers of 2) first."""
    if tiny:
        return [Config(16, 16, 16, num_stages=1), Config(16, 16, 16, num_stages=1, kind="dot_t"),
                Config(1, 16, 32, kind="deq")]
    rows = triton.next_power_of_2(m)
    mid = [] if m > MID_M else [
        Config(bm, bn, bk, num_warps=w, num_stages=3, kind=kind, magic=mg)
        for bm, bn, bk, w, kind, mg in itertools.product(sorted({rows, max(16, rows // 2)}), (128, 256), (64, 128),
                                                          (4, 8), ("dot", "dot_t"), (True, False))]
    dot = [(128, 128, 64, 4, 4), (128, 128, 64, 8, 4), (128, 256, 64, 8, 3), (128, 256, 64, 8, 4),
           (256, 128, 64, 8, 3), (256, 128, 64, 8, 4), (128, 128, 128, 8, 3), (128, 256, 128, 8, 3),
           (64, 256, 64, 4, 4), (64, 128, 64, 4, 4), (64, 128, 128, 4, 3), (128, 64, 64, 4, 4)]
    out = [Config(bm, bn, bk, num_warps=w, num_stages=st) for bm, bn, bk, w, st in dot]
    out += [Config(bm, bn, bk, num_warps=w, num_stages=st, magic=True) for bm, bn, bk, w, st in dot[:6]]
    out += [Config(bm, bn, bk, num_warps=w, num_stages=st, kind="dot_t")
            for bm, bn, bk, w, st in [(128, 128, 64, 4, 3), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3),
                                      (64, 256, 64, 8, 3), (256, 128, 64, 8, 2), (128, 128, 64, 8, 4)]]
    out += [Config(1, 32, 256, num_warps=4, kind="deq"), Config(1, 64, 256, num_warps=8, kind="deq"),
            Config(1, 16, 1024, num_warps=4, kind="deq")]
    return mid + out


def splits(cfg: Config, m: int, n: int, k: int, tiny: bool) -> list[Config]:
    """`cfg` at each K split worth timing: decode 1-8 (no empty slice), prefill 1 (and 2 at M <= 512)."""
    if cfg.kind == "deq":
        return [cfg]
    if tiny:
        options = (1, 2) if m <= ti.DECODE_MAX_M else (1,)
    elif m <= ti.DECODE_MAX_M:
        options = (1, 2, 4, 8) if cfg.kind in ("dot", "dot_t") else (1, 2, 4)
    else:
        options = (1, 2, 4) if m <= MID_M else (1, 2) if m <= 512 else (1,)
    return [cfg._replace(SPLIT_K=s) for s in options if s == 1 or triton.cdiv(k, cfg.BK) >= s]


def interleave(*lists):
    """Round-robin merge: a time cut leaves every family some candidates."""
    out = []
    for group in itertools.zip_longest(*lists):
        out += [c for c in group if c is not None]
    return out


def all_configs(args, n: int, k: int) -> list[Config]:
    """Every candidate a shape can time (what the compile workers build), most used first."""
    out = [s for cs in decode_families(args.tiny).values() for c in cs for s in splits(c, 1, n, k, args.tiny)]
    for m in args.decode_rows:
        out += [s for c in row_tiles(m, args.tiny) for s in splits(c, m, n, k, args.tiny)]
    for m in args.prefill_rows:
        out += [s for c in prefill_tiles(m, args.tiny) for s in splits(c, m, n, k, args.tiny)]
    return list(dict.fromkeys(out))


def compile_worker(args) -> None:
    """--compile-worker I/N: compile the I-th of every N candidates, for every shape, into Triton's disk cache."""
    i, n_workers = map(int, args.compile_worker.split("/"))
    device = torch.device(args.device)
    sizes = shapes(args.preset, args.tiny)
    cfgs = list(dict.fromkeys(c for n_in, n_out in sizes.values() for c in all_configs(args, n_out, n_in)))
    mine = cfgs[i::n_workers]
    errors = 0
    for name, (n_in, n_out) in sizes.items():
        w = torch.empty(n_out, n_in, dtype=torch.int8 if args.weights == "int8" else torch.bfloat16, device=device)
        s = torch.empty(n_out, dtype=torch.bfloat16, device=device) if args.weights == "int8" else None
        x = torch.empty(1, n_in, dtype=torch.bfloat16, device=device)  # M is not a specialisation key
        for cfg in mine:
            try:
                ti._int8_linear(x, w, s, None, config=cfg, warmup=True)
            except Exception as exc:  # noqa: BLE001 (the timing run reports it)
                errors += 1
                if errors <= 3:
                    print(f"compile worker {i}: {name} {config_src(cfg)}: {type(exc).__name__}: {exc}"[:500],
                          file=sys.stderr)
        del w, s, x


def precompile(args, results: dict) -> None:
    """Run --compile-workers worker processes for at most --compile-s seconds."""
    if args.tiny or args.compile_workers <= 0:
        return
    import tempfile

    start = time.perf_counter()
    cmd = [sys.executable, str(Path(__file__).resolve()), *args.argv, "--compile-worker"]
    logs = [tempfile.TemporaryFile(mode="w+") for _ in range(args.compile_workers)]
    procs = [subprocess.Popen(cmd + [f"{i}/{args.compile_workers}"], stdout=subprocess.DEVNULL, stderr=log)
             for i, log in enumerate(logs)]
    codes, errors = [], []
    for p, log in zip(procs, logs):
        try:
            codes.append(p.wait(timeout=max(1.0, args.compile_s - (time.perf_counter() - start))))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            codes.append("timeout")
        log.seek(0)
        text = log.read()
        log.close()
        if codes[-1] != 0 or "compile worker" in text:
            errors.append(text[-1500:])
    results["precompile"] = {"workers": args.compile_workers, "seconds": time.perf_counter() - start,
                             "exit_codes": codes, "stderr_tails": errors}
    print(f"precompile: {results['precompile']['seconds']:.0f} s, exit codes {codes}", flush=True)
    for text in errors[:2]:
        print(text[-600:], file=sys.stderr)


class Sweep:
    """The rows of one run and their JSON file."""

    def __init__(self, args, meta: dict):
        self.args, self.data = args, {**meta, "shapes": {}, "rows": [], "best": [], "skipped": {}, "notes": []}
        self.start = time.perf_counter()

    def save(self) -> None:
        self.args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.args.out.with_suffix(".tmp")
        text = json.dumps(self.data, separators=(",", ":")) + "\n"
        if self.args.out.suffix == ".gz":  # a sweep's rows are megabytes of JSON; the repository keeps them gzipped
            tmp.write_bytes(gzip.compress(text.encode(), mtime=0))
        else:
            tmp.write_text(text)
        tmp.replace(self.args.out)

    def left_s(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.start)


def measure(calls, ref, device, reps: int) -> dict:
    """us, errors against `ref` and determinism of one method (`calls`: one per weight copy, copy 0 is `ref`'s)."""
    y, y2 = calls[0](), calls[0]()
    err = (y.float() - ref).abs().max() / ref.abs().max()
    l2 = (y.float() - ref).norm() / ref.norm()
    row = {"max_rel_err": err.item(), "rel_l2": l2.item(), "deterministic": bool(torch.equal(y, y2))}
    row["us"] = time_us(calls, device, reps, graph=device.type == "cuda")
    return row


def _ok(row: dict, tol: float) -> bool:
    return row.get("deterministic", False) and row.get("rel_l2", 1.0) < tol and row.get("max_rel_err", 1.0) < 4 * tol


class Shape:
    """One Linear shape: its weight copies, the oracle's weight, and the rows timed on it."""

    def __init__(self, sw: Sweep, name: str, n_in: int, n_out: int, device: torch.device):
        self.sw, self.args, self.device = sw, sw.args, device
        self.n_in, self.n_out = n_in, n_out
        copies = max(2, min(16, math.ceil(self.args.rotate_mib * 2**20 / (n_in * n_out))))
        layers = layer_copies(n_in, n_out, copies, device, threshold=6.0)
        self.bf16, self.q8 = layers["bf16"], layers["int8"]
        self.float_weights = self.args.weights == "bf16"
        if self.float_weights:
            self.w_deq = self.bf16[0][0].weight.float()  # [out, in]: the oracle's weight
        else:
            q = self.q8[0][0]
            self.w_deq = q.weight.float() * q.scales.float()[:, None]  # [out, in]: the oracle's weight
        self.int8_bytes, self.bf16_bytes = self.q8[0][2], self.bf16[0][2]
        self.kernel_bytes = self.bf16_bytes if self.float_weights else self.int8_bytes
        self.name = name
        self.base = {"shape": name, "in": n_in, "out": n_out, "class": shape_class(n_out, n_in), "copies": copies}
        sw.data["shapes"][name] = self.base
        self.fam = decode_families(self.args.tiny, self.float_weights)
        self.best_tiles: dict[str, list[Config]] = {}  # family -> its best tiles at M = 1 (split 1), for larger M
        self.skipped = 0

    def int8_calls(self, x, cfg: Config | None = None) -> list:
        """The kernel's call on each weight copy: the int8 ones, or (--weights bf16) the bf16 ones."""
        if self.float_weights:
            return [functools.partial(ti._linear, x, lin.weight, None, None, config=cfg) for lin, _, _ in self.bf16]
        return [functools.partial(ti._int8_linear, x, q.weight, q.scales, q.bias, config=cfg) for q, _, _ in self.q8]

    def candidates(self, m: int) -> list[Config]:
        """M = 1: every decode family; larger decode M: each family's best tiles at M = 1 and the row tiles;
        prefill M: the GEMM tiles. Families interleaved, so a time cut leaves each some candidates."""
        def split_all(cfgs):
            return [s for c in cfgs for s in splits(c, m, self.n_out, self.n_in, self.args.tiny)]

        if m > ti.DECODE_MAX_M:
            return split_all(prefill_tiles(m, self.args.tiny))
        if m == 1:
            return interleave(*(split_all(cs) for cs in self.fam.values()))
        groups = [split_all(self.best_tiles.get(f, [])) for f in self.fam]
        rows = [c for c in row_tiles(m, self.args.tiny) if not (self.float_weights and c.magic)]
        return interleave(*groups, split_all(rows))

    def time_rows(self, m: int, deadline: float) -> list[dict]:
        """bf16, the chosen configuration and the candidates at M = m (candidates stop at `deadline`)."""
        args = self.args
        gen = torch.Generator(device="cpu").manual_seed(m)
        x = torch.randn(m, self.n_in, generator=gen).to(device=self.device, dtype=torch.bfloat16)
        ref = x.float() @ self.w_deq.T  # [m, out]
        rows = []

        def add(method, calls, nbytes, cfg=None):
            row = {"shape": self.name, "M": m, "method": method}
            if cfg is not None:
                row.update(kind=cfg.kind, config=list(cfg), config_src=config_src(cfg))
            try:
                row.update(measure(calls, ref, self.device, args.reps))
            except Exception as exc:  # noqa: BLE001 (e.g. a tile that needs more shared memory than a block has)
                row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
            if "us" in row:
                row.update(tb_s=nbytes / row["us"] / 1e6, ok=_ok(row, args.tol))
            rows.append(row)

        add("bf16", [functools.partial(call, x) for _, call, _ in self.bf16], self.bf16_bytes)
        chosen = ti.choose_config(m, self.n_out, self.n_in, self.device, int8=not self.float_weights)
        add("chosen", self.int8_calls(x, chosen), self.kernel_bytes, chosen)
        cands = self.candidates(m)
        for i, cfg in enumerate(cands):
            if time.perf_counter() > deadline:
                self.skipped += len(cands) - i
                break
            add("candidate", self.int8_calls(x, cfg), self.kernel_bytes, cfg)
        self.confirm(rows, x)
        return rows

    def confirm(self, rows: list[dict], x) -> None:
        """The best five again with --confirm-reps; the best of those gets status "best" and a `best` entry."""
        timed = sorted((r for r in rows if r["method"] != "bf16" and r.get("ok")), key=lambda r: r["us"])[:5]
        for r in timed:
            try:
                us = time_us(self.int8_calls(x, Config(*r["config"])), self.device, self.args.confirm_reps,
                             graph=self.device.type == "cuda")
            except Exception as exc:  # noqa: BLE001 (keep the screening figure)
                r["confirm_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                continue
            r["screen_us"], r["us"], r["tb_s"] = r["us"], us, self.kernel_bytes / us / 1e6
        if not timed:
            return
        best = min(timed, key=lambda r: r["us"])
        best["status"] = "best"
        b16, chosen = (next(r for r in rows if r["method"] == k) for k in ("bf16", "chosen"))
        self.sw.data["best"].append({
            **self.base, "M": best["M"], "bucket": m_bucket(best["M"]), "config": best["config"],
            "config_src": best["config_src"], "us": best["us"], "tb_s": best["tb_s"], "bf16_us": b16.get("us"),
            "chosen_us": chosen.get("us"), "speedup_vs_bf16": b16["us"] / best["us"] if "us" in b16 else None})

    def rank_tiles(self, rows: list[dict]) -> None:
        """After M = 1: each family's best --top tiles (any split) carry on to the larger decode M."""
        for f, cs in self.fam.items():
            mine = {c._replace(SPLIT_K=1) for c in cs}
            tiles = (Config(*r["config"])._replace(SPLIT_K=1)
                     for r in sorted((r for r in rows if r.get("ok") and r["method"] == "candidate"),
                                     key=lambda r: r["us"]))
            self.best_tiles[f] = [c for c in dict.fromkeys(tiles) if c in mine][:self.args.top]


def _summary(name: str, m: int, rows: list[dict], left_s: float) -> str:
    nan = float("nan")
    b = next(r for r in rows if r["method"] == "bf16")
    ranked = sorted((r for r in rows if r.get("ok") and r["method"] != "bf16"), key=lambda r: r["us"])
    top = ranked[0] if ranked else {}
    errors = sum(1 for r in rows if "error" in r)
    wrong = sum(1 for r in rows if "us" in r and not r["ok"])
    return (f"{name:<10} M={m:<5} bf16 {b.get('us', nan):8.1f} us | best kernel {top.get('us', nan):8.1f} us "
            f"{top.get('tb_s', nan):5.2f} TB/s {top.get('config_src', '-')} | {len(rows)} rows, {errors} errors, "
            f"{wrong} wrong | {left_s:.0f} s left")


@torch.inference_mode()
def sweep_shape(sw: Sweep, name: str, n_in: int, n_out: int, device: torch.device) -> None:
    """Every M of one shape; its share of the time left; the JSON saved after every M."""
    args = sw.args
    t_shape = time.perf_counter()
    shapes_left = max(1, len(args.shapes) - args.shapes.index(name))
    deadline = time.perf_counter() + max(0.0, sw.left_s()) / shapes_left
    shape = Shape(sw, name, n_in, n_out, device)
    ms = args.decode_rows + args.prefill_rows
    weight = {m: 3.0 if m == 1 else 2.0 if m <= ti.DECODE_MAX_M else 1.0 for m in ms}  # shares of the time
    for i, m in enumerate(ms):
        now = time.perf_counter()
        rows = shape.time_rows(m, now + max(0.0, deadline - now) * weight[m] / sum(weight[k] for k in ms[i:]))
        if m == 1:
            shape.rank_tiles(rows)
        sw.data["rows"] += rows
        print(_summary(name, m, rows, sw.left_s()), flush=True)
        sw.save()
    sw.data["skipped"][name] = shape.skipped
    sw.data.setdefault("shape_seconds", {})[name] = time.perf_counter() - t_shape
    del shape
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    sw.save()


def table(data: dict) -> list[str]:
    """`CONFIGS` rows: the best per (M bucket, shape class), then a "*" row per bucket."""
    name = "FLOAT_CONFIGS" if data.get("weights") == "bf16" else "CONFIGS"
    lines = [f"# {name} rows (kernels/triton_int8.py): (M bucket, shape class): Config"]
    def us(v):
        return "-" if v is None else f"{v:.1f}"

    for b in data["best"]:
        lines.append(f'    ({b["bucket"]}, "{b["class"]}"): {b["config_src"]},  # {b["shape"]} M={b["M"]}: '
                     f'{b["us"]:.1f} us {b["tb_s"]:.2f} TB/s; bf16 {us(b["bf16_us"])} us; chosen '
                     f'{us(b["chosen_us"])} us')
    by_m: dict[int, dict[str, dict[str, float]]] = {}  # M -> config_src -> shape -> us
    for r in data["rows"]:
        if r["method"] != "bf16" and r.get("ok"):
            d = by_m.setdefault(r["M"], {}).setdefault(r["config_src"], {})
            d[r["shape"]] = min(d.get(r["shape"], float("inf")), r["us"])
    for m, per_cfg in sorted(by_m.items()):
        names = {s for d in per_cfg.values() for s in d}
        best = {s: min(d[s] for d in per_cfg.values() if s in d) for s in names}
        full = {c: d for c, d in per_cfg.items() if set(d) == names}
        if not full:
            continue
        score = {c: math.exp(sum(math.log(d[s] / best[s]) for s in names) / len(names)) for c, d in full.items()}
        c = min(score, key=score.get)
        lines.append(f'    ({m_bucket(m)}, "*"): {c},  # M={m}: geomean {score[c]:.3f}x of each shape\'s best')
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "int8-sweep-h200.json.gz")
    parser.add_argument("--tiny", action="store_true", help="CPU, Triton interpreter, tiny shapes, few configs")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--preset", default="tnl-7b")
    parser.add_argument("--shapes", default="", help="comma-separated subset of the shape names (default all)")
    parser.add_argument("--decode-rows", default="1,2,4,8,16")
    parser.add_argument("--prefill-rows", default="512,4096")
    parser.add_argument("--reps", type=int, default=5, help="timed graph replays per candidate (median)")
    parser.add_argument("--confirm-reps", type=int, default=25, help="replays of the best five per (shape, M)")
    parser.add_argument("--top", type=int, default=8, help="best tiles per family at M = 1 timed at larger M")
    parser.add_argument("--rotate-mib", type=float, default=256.0, help="weight bytes cycled per timed run")
    parser.add_argument("--tol", type=float, default=1e-2, help="ok: rel_l2 below this, max_rel_err below 4x")
    parser.add_argument("--budget-s", type=float, default=240.0, help="wall seconds for the whole run")
    parser.add_argument("--compile-workers", type=int, default=max(1, min(14, (os.cpu_count() or 2) - 2)))
    parser.add_argument("--compile-s", type=float, default=90.0, help="at most this long compiling up front")
    parser.add_argument("--compile-worker", default="", help=argparse.SUPPRESS)
    parser.add_argument("--weights", default="int8", choices=("int8", "bf16"), help="the kernel's weights")
    args = parser.parse_args()
    args.argv = [a for a in sys.argv[1:]]
    if args.tiny:
        args.device, args.preset, args.rotate_mib, args.reps, args.confirm_reps = "cpu", "tiny", 0.0, 1, 1
        args.decode_rows = args.decode_rows if "--decode-rows" in sys.argv else "1,3"
        args.prefill_rows = args.prefill_rows if "--prefill-rows" in sys.argv else "40"
    args.decode_rows = [int(r) for r in args.decode_rows.split(",") if r]
    args.prefill_rows = [int(r) for r in args.prefill_rows.split(",") if r]
    if args.weights == "bf16" and args.prefill_rows:
        parser.error('--weights bf16 sweeps decode M only: pass --prefill-rows ""')
    if args.compile_worker:
        return compile_worker(args)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU, or pass --tiny")
    all_shapes = shapes(args.preset, args.tiny)
    args.shapes = [s for s in args.shapes.split(",") if s] or list(all_shapes)
    sw = Sweep(args, {
        "bench": "int8_sweep", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine(),
        "torch": torch.__version__, "triton": triton.__version__, "command": "python " + " ".join(sys.argv),
        "preset": args.preset, "weights": args.weights, "reps": args.reps, "confirm_reps": args.confirm_reps,
        "budget_s": args.budget_s})
    sw.save()
    precompile(args, sw.data)
    for name in args.shapes:
        n_in, n_out = all_shapes[name]
        try:
            sweep_shape(sw, name, n_in, n_out, device)
        except Exception as exc:  # noqa: BLE001 (one shape's failure must not lose the others)
            import traceback

            traceback.print_exc()
            sw.data["notes"].append(f"{name} failed: {type(exc).__name__}: {exc}")
            sw.save()
    sw.data["table"] = table(sw.data)
    sw.data["seconds"] = time.perf_counter() - sw.start
    sw.save()
    print("\n".join(sw.data["table"]))
    print(f"{len(sw.data['rows'])} rows in {sw.data['seconds']:.0f} s; skipped {sw.data['skipped']}; "
          f"notes {sw.data['notes']}")


if __name__ == "__main__":
    main()
