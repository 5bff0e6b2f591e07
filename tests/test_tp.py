"""Tensor parallelism on CPU: a real 2-process gloo group against the unsharded model (fp32).

One `torch.multiprocessing` spawn (module fixture) runs every distributed scenario and saves each
rank's results; the tests compare them with the single-process model. Checkpoints are written with
`tnllm.save_model` (sharded safetensors) and as an official-style `pytorch_model.bin`.
"""

from __future__ import annotations

import faulthandler
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.conftest import assert_close, free_port
from tnllm import TNLConfig, TransNormerLLM, save_model
from tnllm.sampling import SamplingParams
from tnllm.tp import TPGroup, empty_tp_model, local_config, shard_from_model

WORLD = 2
IDS = torch.randint(0, 250, (2, 21), generator=torch.Generator().manual_seed(1))
PREFILL = 13  # then IDS[:, 13:] one token at a time
LONG_PROMPT = torch.randint(3, 250, (80,), generator=torch.Generator().manual_seed(2)).tolist()  # > 64 ids
GREEDY = SamplingParams(temperature=0, max_new_tokens=12)
SAMPLED = SamplingParams(temperature=0.8, top_p=0.9, max_new_tokens=12, seed=7)

# name -> (config, how it is saved). "tiny": vocab-parallel tied embedding, LRPE on layers 0 and 2.
# "bias": biases, untied lm_head, odd vocab (255 -> replicated), LRPE on layer 1, read from a .bin.
CONFIGS = {
    "tiny": (TNLConfig.from_name("tiny"), "safetensors"),
    "bias": (TNLConfig.from_name("tiny", vocab_size=255, bias=True, tie_word_embeddings=False,
                                 lrpe_layers=[0, 1, 0], n_heads=8, hidden_dim=128, glu_dim=96), "bin"),
}


def reference_model(name: str) -> TransNormerLLM:
    torch.manual_seed(10)
    model = TransNormerLLM(CONFIGS[name][0]).eval()
    if model.config.bias:  # non-zero biases, so a bias added twice would show
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, torch.nn.Linear) and module.bias is not None:
                    module.bias.normal_(0, 0.1)
    return model


def save(model: TransNormerLLM, directory, how: str) -> None:
    if how == "safetensors":
        save_model(model, directory, max_shard_bytes=30_000)  # several files + index
    else:
        model.config.save(directory / "config.json")
        torch.save({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}, directory / "pytorch_model.bin")


def engine_replies(model) -> dict:
    """Three replies decoded as one batch by a threadless engine (greedy, seeded sampling, and a prompt longer
    than a command's inline ids, prefilled in chunks between the others' decode steps), then one session's
    snapshot, a reply, a restore and the same reply again."""
    from tnllm.engine import Engine, EngineConfig
    from tnllm.tokenizer import BUNDLED_TOKENIZER, Tokenizer

    config = EngineConfig(max_sessions=3, prefill_budget=32, solo_prefill_budget=32, threaded=False)
    engine = Engine(model, Tokenizer(BUNDLED_TOKENIZER), config, eos_ids=set())
    sessions = [engine.open() for _ in range(3)]
    prompts = [(IDS[0].tolist(), GREEDY), (IDS[1].tolist(), SAMPLED), (LONG_PROMPT, GREEDY)]
    replies = [s.feed_ids(ids, params) for s, (ids, params) in zip(sessions, prompts)]
    engine.run_until_idle()
    snapshot = sessions[0].snapshot()
    again = [sessions[0].feed_ids([5, 6], GREEDY).wait().sampled]
    sessions[0].restore(snapshot)
    again.append(sessions[0].feed_ids([5, 6], GREEDY).wait().sampled)
    result = {"batched": [r.sampled for r in replies], "after_restore": again}
    try:  # under TP a slot's tensors are one rank's heads: a session file of them would be unloadable
        sessions[0].save(os.devnull)
        result["save"] = "written"
    except NotImplementedError:
        result["save"] = "refused"
    return result


def teacher_forced_decode(model, ids: torch.Tensor, state) -> torch.Tensor:
    """Prefill ids[:, :PREFILL], then one step per remaining token; logits of every step [B, steps, V]."""
    out = [model(ids[:, :PREFILL], state, logits_to_keep=1)]
    for t in range(PREFILL, ids.shape[1]):
        out.append(model(ids[:, t:t + 1], state))
    return torch.cat(out, dim=1)


# -- what each rank runs ------------------------------------------------------------------------
class RecordingSafeOpen:
    """safe_open wrapper: forbids get_tensor (a full read), records the shape of every slice read."""

    reads: list[tuple[str, tuple[int, ...]]] = []

    def __init__(self, path, framework):
        from safetensors import safe_open

        self.inner = safe_open(path, framework=framework)

    def __enter__(self):
        self.f = self.inner.__enter__()
        return self

    def __exit__(self, *exc):
        return self.inner.__exit__(*exc)

    def keys(self):
        return self.f.keys()

    def get_tensor(self, name):
        raise AssertionError(f"{name} read whole")

    def get_slice(self, name):
        sl = self.f.get_slice(name)
        reads = self.reads

        class Slice:
            def __getitem__(self, index):
                t = sl[index]
                reads.append((name, tuple(t.shape)))
                return t
        return Slice()


def _worker(rank: int, port: int, root: str) -> None:
    from pathlib import Path

    import tnllm.tp.load as tp_load
    from tnllm.tp import load_tp_model
    from tnllm.tp.serve import DrivenModel, Driver, follow

    faulthandler.enable()  # a C++ abort in a rank prints its Python stack into the test's stderr
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # gloo pairs on loopback, whatever the hostname resolves to
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    tp = TPGroup(rank, WORLD, torch.device("cpu"), dist.group.WORLD)
    results = {}
    try:  # rank 0 fails to open it; the other ranks must get an error too, not wait forever
        load_tp_model(Path(root) / "missing", tp)
    except Exception as exc:  # noqa: BLE001
        results["missing_error"] = type(exc).__name__
    tp_load.safe_open = RecordingSafeOpen
    for name in CONFIGS:
        RecordingSafeOpen.reads = []
        model = load_tp_model(Path(root) / name, tp)
        r = results[name] = {"reads": list(RecordingSafeOpen.reads),
                             "shapes": {k: tuple(v.shape) for k, v in model.state_dict().items()},
                             "decay": model.log_decay.clone()}
        with torch.inference_mode():
            r["logits"] = model(IDS)  # 42 rows: norm all-reduce folded into out_proj's
            model.set_fuse_norm_rows(0)
            r["logits_unfused"] = model(IDS)  # separate [B, T, 1] all-reduce
            model.set_fuse_norm_rows(64)
            state = model.allocate_state(IDS.shape[0])
            r["decode"] = teacher_forced_decode(model, IDS, state)
        r["kv_shapes"] = [tuple(t.shape) for t in state.kv]
        r["state_nbytes"] = state.nbytes
        # Generation: rank 0 drives the engine, rank 1 follows.
        if rank == 0:
            driver = Driver(model)
            driven = DrivenModel(driver)
            r["engine"] = engine_replies(driven)
            state = driven.allocate_state(1)
            driven(torch.tensor([LONG_PROMPT]), state)
            fork = state.clone()
            r["fork_logits"] = [driven(torch.tensor([[5]]), s)[:, -1] for s in (state, fork)]
            r["stateless"] = driven(IDS[:1], None, logits_to_keep=3)
            del state, fork
            driven(IDS[:1, :2])  # frees the collected states on every rank
            driver.stop()
        else:
            follow(model)
    torch.save(results, Path(root) / f"rank{rank}.pt")
    # Both ranks leave together (rank 0 hosts the TCP store), then skip interpreter teardown: a
    # store/gloo thread still joinable at static destruction aborts the process ("terminate called
    # without an active exception"), which CI hit once after every result had been saved.
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)



@pytest.fixture(scope="module")
def tp_run(tmp_path_factory):
    """(reference models, per-rank results) of one 2-process gloo run over both checkpoints."""
    root = tmp_path_factory.mktemp("tp")
    models = {}
    for name, (_, how) in CONFIGS.items():
        models[name] = reference_model(name)
        (root / name).mkdir()
        save(models[name], root / name, how)
        if how == "bin":  # the .bin holds bf16: compare against what was actually saved
            models[name] = models[name].to(torch.bfloat16).float()
    mp.spawn(_worker, args=(free_port(), str(root)), nprocs=WORLD)
    return models, [torch.load(root / f"rank{r}.pt") for r in range(WORLD)]


# -- the tests ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", CONFIGS)
def test_sharded_forward_equals_unsharded(tp_run, name):
    models, ranks = tp_run
    with torch.inference_mode():
        ref = models[name](IDS)
    for r in ranks:
        assert_close(f"{name} logits", ref, r[name]["logits"], rel=1e-5)
        assert_close(f"{name} logits, unfused norm", ref, r[name]["logits_unfused"], rel=1e-5)
    assert torch.equal(ranks[0][name]["logits"], ranks[1][name]["logits"])  # every rank sees the same logits


@pytest.mark.parametrize("name", CONFIGS)
def test_prefill_and_decode_equal_unsharded(tp_run, name):
    models, ranks = tp_run
    model = models[name]
    with torch.inference_mode():
        ref = teacher_forced_decode(model, IDS, model.allocate_state(IDS.shape[0]))
    assert_close(f"{name} decode", ref, ranks[0][name]["decode"], rel=1e-5)


@pytest.mark.parametrize("name", CONFIGS)
def test_each_rank_holds_only_its_heads_state(tp_run, name):
    models, ranks = tp_run
    full = models[name].allocate_state(IDS.shape[0])
    for r in ranks:
        expected = [(t.shape[0], t.shape[1] // WORLD, *t.shape[2:]) for t in full.kv]
        assert r[name]["kv_shapes"] == expected
        kv_bytes = sum(t.numel() * t.element_size() for t in full.kv)
        assert r[name]["state_nbytes"] == kv_bytes // WORLD + full.positions.numel() * 8


@pytest.mark.parametrize("name", CONFIGS)
def test_decay_uses_global_head_indices(tp_run, name):
    models, ranks = tp_run
    full = models[name].log_decay  # [L, H]
    assert torch.equal(torch.cat([r[name]["decay"] for r in ranks], dim=1), full)


@pytest.mark.parametrize("name", CONFIGS)
def test_generation_under_tp_equals_unsharded(tp_run, name):
    models, ranks = tp_run
    model, out = models[name], ranks[0][name]
    single = engine_replies(model)
    assert (out["engine"].pop("save"), single.pop("save")) == ("refused", "written")
    assert out["engine"] == single
    first, restored = out["engine"]["after_restore"]
    assert first == restored and len(first) == GREEDY.max_new_tokens
    a, b = out["fork_logits"]
    assert torch.equal(a, b)  # a clone continues exactly like its original
    with torch.inference_mode():
        assert_close("stateless", model(IDS[:1])[:, -3:], out["stateless"], rel=1e-5)


@pytest.mark.parametrize("name", CONFIGS)
def test_checkpoint_loads_sharded(tp_run, name):
    """No rank ever holds a full-size Linear weight: its parameters are 1/N, and from safetensors it
    reads only slices (get_tensor is forbidden by the recording wrapper)."""
    models, ranks = tp_run
    full = {k: tuple(v.shape) for k, v in models[name].state_dict().items()}
    split = 0
    for r in ranks:
        for key, shape in r[name]["shapes"].items():
            if key.endswith(".weight") and "norm" not in key and full[key] != shape:
                split += 1
                assert torch.Size(shape).numel() * WORLD == torch.Size(full[key]).numel(), key
        linear = [k for k in full if k.endswith(("proj.weight", "l1.weight", "l2.weight", "l3.weight"))]
        assert all(r[name]["shapes"][k] != full[k] for k in linear)
        if CONFIGS[name][1] == "safetensors":
            assert r[name]["reads"], "the recording safe_open saw no reads"
            for key, shape in r[name]["reads"]:
                if key in linear:
                    assert torch.Size(shape).numel() * WORLD <= torch.Size(full[key]).numel(), key
    assert split > 0


def test_open_failure_reaches_every_rank(tp_run):
    _, ranks = tp_run
    assert ranks[0]["missing_error"] == "FileNotFoundError"
    assert ranks[1]["missing_error"] == "CheckpointError"


def test_shard_slices_by_heads_in_process():
    """Without a process group: rank r's qkvu rows are its heads' rows of each quarter; size 1 = identity."""
    cfg = TNLConfig.from_name("tiny")
    full = TransNormerLLM(cfg).eval()
    hd, dh = cfg.hidden_dim, cfg.head_dim
    w = full.model.layers[0].token_mixer.qkvu_proj.weight
    for rank in range(WORLD):
        shard = shard_from_model(empty_tp_model(cfg, TPGroup(rank, WORLD)), full)
        got = shard.model.layers[0].token_mixer.qkvu_proj.weight.view(4, hd // WORLD, -1)
        heads = range(rank * cfg.n_heads // WORLD, (rank + 1) * cfg.n_heads // WORLD)
        rows = torch.tensor([h * dh + j for h in heads for j in range(dh)])
        for q in range(4):
            assert torch.equal(got[q], w[q * hd + rows])
        assert shard.config == local_config(cfg, WORLD)
    one = shard_from_model(empty_tp_model(cfg, TPGroup()), full)
    with torch.inference_mode():
        assert torch.equal(one(IDS.clamp(max=255)), full(IDS.clamp(max=255)))


def test_indivisible_sizes_are_rejected():
    with pytest.raises(ValueError, match="n_heads 4 is not divisible"):
        empty_tp_model(TNLConfig.from_name("tiny"), TPGroup(0, 3))
