"""The generation engine: sessions in a state slot pool, one scheduler batching every decoding session.

    from tnllm.engine import Engine, EngineConfig
    engine = Engine(model, tokenizer, EngineConfig(max_sessions=16))
    session = engine.open()
    for event in session.send("hello", SamplingParams(temperature=0)):
        print(event.text, end="")            # event.stats: live ReplyStats; event.finish on the last one

See engine.py (requests, thread), scheduler.py (one step), pool.py (slots), sampler.py (batched sampling),
graphs.py (CUDA graphs per batch bucket), session.py (Session, Reply, Event).
"""

from tnllm.engine.engine import Engine, EngineConfig, single_reply
from tnllm.engine.pool import PoolFullError, StatePool
from tnllm.engine.sampler import BatchSampler
from tnllm.engine.session import FINISH_REASONS, Event, Reply, ReplyStats, Session, Snapshot

__all__ = ["FINISH_REASONS", "BatchSampler", "Engine", "EngineConfig", "Event", "PoolFullError", "Reply",
           "ReplyStats", "Session", "Snapshot", "StatePool", "single_reply"]
