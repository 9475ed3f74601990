"""``llmexp prepare [overrides]``: tokenize a run's text corpus into the token cache, and nothing
else, so that a cluster job prepares once and every training run, resumed run, sweep trial and
rank then starts from the cache.

    llmexp prepare stage=pretrain data=files data.path='corpus/*.jsonl.zst' data.max_length=512
    python -m llmexp stage=pretrain data=files data.path='corpus/*.jsonl.zst' data.max_length=512   # hits it

The overrides are a run's (the cache key is its data config, the files' sizes and times, and the
tokenizer); datasets' progress bars show the tokenization.
"""

from __future__ import annotations

import sys
from typing import List, Optional

from llmexp.errors import UserError, counted, quiet_exits, report


@quiet_exits
def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if {"-h", "--help"} & set(argv):
        print(__doc__)
        return 0
    try:
        from llmexp.env import configure_environment
        from llmexp.overrides import resolve_overrides, split_overrides
        from llmexp.preflight import preflight

        cfg, _ = resolve_overrides(split_overrides(argv))
        typed = preflight(cfg)
        configure_environment(typed.offline)
        from llmexp.run import prepare_data

        prepared, _tokenizer = prepare_data(typed)
    except UserError as e:
        return report(e)
    cache = prepared.cache
    if typed.data.streaming:
        print("data.streaming=true: the files are read as training goes, so there is nothing to prepare "
              "(data.streaming=false prepares a token cache that every later run reuses)")
        return 0
    if cache is None:
        print(f"format {prepared.format!r}: prepared rows are encoded by each run (the token cache is for text "
              f"corpora); {len(prepared.train)} training and {len(prepared.val)} validation rows checked")
        return 0
    state = ("already prepared" if cache["hit"] else
             f"rows cut in {cache['rows_seconds']:.1f}s from tokens already prepared" if cache["tokens_hit"] else
             f"prepared in {cache['prepare_seconds']:.1f}s with {cache['num_proc']} process(es)")
    print(f"{state}: {cache['dir']} ({cache['mode']} rows, {cache['dtype']} token ids)")
    for split in ("train", "val"):
        st = cache["splits"][split]
        counts = f"{counted(st['samples'], 'document')}, {counted(st['rows'], 'row')}, {counted(st['tokens'], 'token')}"
        print(f"  {split}: {counts}"
              + (f" ({st['truncated']} cut to data.max_length={typed.data.max_length}: their other tokens are not "
                 f"trained on; data.overlong=split keeps them as rows of their own)" if st.get("truncated") else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
