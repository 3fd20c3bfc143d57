"""The exllamav2 backend's page accounting and prefix-cache scopes, on the library's own page table, on a CPU.

exllamav2's dynamic generator keeps its page table (hashes, references, reuse) in plain Python; only the
model's forward pass needs CUDA. This test imports the installed exllamav2 with its CUDA extension replaced by
a stand-in that fails if called, builds a generator's page table without a model, and drives it the way
``iterate()`` would around prefill: jobs prepared, pages allocated, full prompt pages marked as computed,
pages released. What it shows, with the library's code:

- the same user's next turn reuses the prompt's whole pages; another user's identical prompt reuses none;
- ``ExLlamaV2Backend.admit`` reserves prompt + max_new_tokens in pages, waits when the batch or the cache is
  full, refuses what can never fit, and ``cancel`` gives the pages back at once.

It runs where exllamav2 is installed (``pip install --no-deps exllamav2==0.3.2`` is enough: nothing here needs
its other dependencies) and is skipped elsewhere; tests/gpu/test_exllamav2.py checks the same on a GPU.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("exllamav2") is None,
    reason="exllamav2 is not installed (pip install --no-deps exllamav2==0.3.2)",
)

ROOT = Path(__file__).resolve().parents[2]

# Run in its own process: the stand-in extension must be in place before exllamav2 is first imported.
SCRIPT = r"""
import json, sys, types
import torch

class Missing:
    def __getattr__(self, name):
        def call(*args, **kwargs):
            raise RuntimeError(f"the CUDA extension was called: {name}")
        return call

ext = types.ModuleType("exllamav2.ext")
ext.exllamav2_ext = Missing()
ext.none_tensor = torch.empty((1, 1), device="meta")
sys.modules["exllamav2.ext"] = ext
try:
    import PIL.Image  # noqa: F401  (exllamav2's vision code imports it)
except ImportError:
    for name in ("PIL", "PIL.Image"):
        module = types.ModuleType(name)
        module.Image = object
        sys.modules[name] = module

from exllamav2.generator import dynamic
from node.backends import exllamav2_backend as eb
from node.backends.base import CacheScope, NeverFits, SamplingParams

eb._install_scoped_hash()
Scoped = eb._scoped_job_class()


def generator(batch):
    gen = object.__new__(dynamic.ExLlamaV2DynamicGenerator)
    gen.page_size, gen.paged, gen.max_pages, gen.max_total_tokens = 256, True, 16, 4096
    gen.max_batch_size, gen.padded_vocab_size, gen.draft_model, gen.num_draft_tokens = batch, 2304, None, 0
    gen.pending_jobs, gen.active_jobs, gen.job_serial = [], [], 0
    gen.defrag_cache = lambda: None  # moves KV between pages: the GPU's business
    gen.reset_page_table()
    return gen


out = {}
gen = generator(8)
prompt = list(range(1, 700))  # two full pages and part of a third


def turn(scope):
    args = dict(input_ids=torch.tensor([prompt]), max_new_tokens=8, stop_conditions=[], identifier=0)
    job = Scoped(**args, scope=scope) if scope is not None else dynamic.ExLlamaV2DynamicJob(**args)
    job.prepare_for_queue(gen, gen.job_serial)
    gen.job_serial += 1
    job.allocate_pages()
    cached = job.cached_pages
    for seq in job.sequences:  # as prefill leaves them: the prompt's full pages hold their KV
        for page in seq.allocated_pages[: (len(seq.sequence_ids) - 1) // gen.page_size]:
            page.kv_position = gen.page_size
    job.deallocate_pages()
    return cached


out["turns"] = [turn(s) for s in (b"user:alice", b"user:alice", b"user:bob", b"user:alice", None, None)]
out["count_match"] = dynamic.ext_c.count_match(None, None, 5)

gen = generator(3)
backend = eb.ExLlamaV2Backend(
    model=None, cache=None, tokenizer=None, generator=gen, context_length=4096, chat_template=None,
    eos_ids=frozenset({2}), paged=True,
)
params = SamplingParams(max_new_tokens=500)
free = [backend.cache().free_tokens]
seqs = []
for _ in range(4):
    seqs.append(backend.admit(list(range(1, 300)), params, CacheScope.private()))
    free.append(backend.cache().free_tokens)
out["admitted"], out["free"] = seqs, free
backend.cancel(seqs[1])
out["after_cancel"] = backend.cache().free_tokens
out["waits"] = backend.admit(list(range(1, 2000)), SamplingParams(max_new_tokens=2000), CacheScope.private())
try:
    backend.admit(list(range(1, 4000)), SamplingParams(max_new_tokens=2000), CacheScope.private())
    out["never"] = None
except NeverFits as exc:
    out["never"] = str(exc)
out["stops"] = sorted(backend._jobs[seqs[0]].stop_tokens)
print(json.dumps(out))
"""


def test_scopes_and_admission_on_the_librarys_page_table() -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    # alice, alice again, bob, alice, then two jobs without a scope (exllamav2's own behaviour).
    assert out["turns"] == [0, 2, 0, 2, 0, 2], "whole pages are reused within a scope and never across"
    assert out["count_match"] == 0, "the scope-blind partial-page match is off"
    # Each job reserves 299 + 500 tokens: 4 pages of 256. The batch holds three.
    assert out["admitted"] == [0, 1, 2, None]
    assert out["free"] == [4096, 3072, 2048, 1024, 1024]
    assert out["after_cancel"] == 2048, "a cancelled job's pages are free at once"
    assert out["waits"] is None, "16 pages with 8 free: the job waits"
    assert out["never"] == "5999 tokens; the cache holds 4096"
    assert out["stops"] == [2]
