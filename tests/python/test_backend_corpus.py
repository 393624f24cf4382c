"""The onnx package's backend test models through ghostsr (issue 12's corpus run).

Runs scripts/backend_corpus.py over every backend test model of the installed onnx (~2,050:
the node and model cases regenerated into target/onnx-backend-corpus, plus the wheel's own):
no panic, no hang, every model ghostsr loads comes back byte for byte through an empty plan,
and every forced ghosting (`--include` each Conv) that succeeds passes onnx.checker and runs in
onnxruntime on the original test feed.
"""

from __future__ import annotations

import importlib.util
import json

from conftest import BIN, REPO

spec = importlib.util.spec_from_file_location("backend_corpus", REPO / "scripts" / "backend_corpus.py")
corpus = importlib.util.module_from_spec(spec)
spec.loader.exec_module(corpus)


def test_backend_corpus_never_panics_and_round_trips():
    cache = REPO / "target" / "onnx-backend-corpus"
    cache.mkdir(parents=True, exist_ok=True)
    s = corpus.run(cache, BIN, workers=2)
    print(json.dumps({k: v for k, v in s.items() if not isinstance(v, list)}))
    assert s["models"] > 1500, "the corpus was not generated"
    assert not corpus.failures(s), "\n".join(corpus.failures(s))
    # The round trip is exercised, not vacuous: nearly every model loads, and some get ghosted.
    assert s["loaded"] > 0.9 * s["models"]
    assert s["converted"] > 0 and s["run_checked"] > 0
