"""Import hygiene: CPU-only importability, and the checkout's top-level `kernels/` folder shadowing PyPI `kernels`.

transformers and bitsandbytes optionally import the PyPI `kernels` package (Hugging Face Kernel Hub); from
the repo root the name `kernels` finds this checkout's folder instead (docs/architecture.md#the-kernels-folder-name;
the installed package has it as `tnllm.kernels` only). These checks run the same probe from the repo root and
from a neutral directory and require identical results.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = r"""
import json, sys, hashlib, logging
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
import torch
torch.manual_seed(0)
import bitsandbytes as bnb
from transformers import LlamaConfig, LlamaForCausalLM
lin = torch.nn.Linear(64, 64)
q = bnb.nn.Linear8bitLt(64, 64, has_fp16_weights=False)
q.load_state_dict(lin.state_dict()); q = q.to("cpu")
x = torch.randn(3, 64)
cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=2)
llama = LlamaForCausalLM(cfg).eval()
out = torch.cat([q(x).flatten().float(), llama(torch.tensor([[1, 2, 3]])).logits.flatten()])
print(json.dumps({"hash": hashlib.sha256(out.detach().numpy().tobytes()).hexdigest()}))
"""


def _run(code: str, cwd: Path, extra_path: bool) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT) if extra_path else ""}
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_tnllm_and_kernels_import_without_triton_or_cuda():
    code = ("import sys, tnllm, tnllm.engine, tnllm.train\n"
            "from tnllm import kernels\n"
            "assert 'triton' not in sys.modules, 'triton imported at import time'\n"
            "import torch; assert not torch.cuda.is_initialized()\n"
            "print(kernels.backend_for('cpu'))")
    result = _run(code, ROOT, extra_path=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "torch"


def test_transformers_and_bitsandbytes_unaffected_by_our_kernels_package(tmp_path):
    from_root = _run(PROBE, ROOT, extra_path=False)  # repo root on sys.path: `kernels` is ours
    neutral = _run(PROBE, tmp_path, extra_path=False)
    assert from_root.returncode == 0, from_root.stderr
    assert neutral.returncode == 0, neutral.stderr
    assert json.loads(from_root.stdout) == json.loads(neutral.stdout)
    assert "Traceback" not in from_root.stderr
