"""Train llmexp's bundled byte-level BPE tokenizer on the project's own data.

    python scripts/train_tokenizer.py            # writes src/llmexp/assets/tokenizer/

The corpus is the bundled arithmetic skill (text and chat renderings) plus a short English
paragraph set, so common words get merges and any other text still encodes byte by byte.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from llmexp.data import skill
from llmexp.models.tokenizer import BUNDLED_TOKENIZER_DIR, train_bpe

ENGLISH = """The quick brown fox jumps over the lazy dog. A language model predicts the next token
of a text from the tokens before it. Training minimises the cross entropy of those predictions.
Questions and answers, instructions and responses, documents and summaries: each is a sequence
of words and numbers that the model learns to continue. What is the answer? The answer is yes.
User asks, assistant answers. Please compute the result and explain your reasoning step by step."""


def corpus(seed: int = 0):
    for doc in skill.text_corpus(3000, seed=seed):
        yield doc["text"]
    for ex in skill.chat_examples(3000, seed=seed + 1):
        yield "\n".join(m["content"] for m in ex["messages"])
    for _ in range(20):
        yield ENGLISH


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab-size", type=int, default=512)
    ap.add_argument("--out", type=Path, default=BUNDLED_TOKENIZER_DIR)
    args = ap.parse_args()
    tok = train_bpe(corpus(), vocab_size=args.vocab_size)
    tok.save_pretrained(str(args.out))
    print(f"saved a {len(tok)}-token tokenizer to {args.out}")


if __name__ == "__main__":
    main()
