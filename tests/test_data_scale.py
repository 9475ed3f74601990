"""Text corpora through the token cache: the same rows as encoding them one by one, a cache that
is hit, missed and invalidated when it should be, compressed files, the block-concatenation mode,
`llmexp prepare`, and ranks reading disjoint rows."""

from __future__ import annotations

import gzip
import json
import re
import random
from pathlib import Path
from typing import List

import pytest

from llmexp.testing import run_cli, typed

WORDS = "the a model learns tokens from text every step of training reads data corpus shard cache".split()


def write_corpus(path: Path, docs: int, seed: int = 0, compress: str = "") -> Path:
    """A JSONL corpus of ``docs`` documents of 5-120 words (optionally .gz or .zst)."""
    rng = random.Random(seed)
    lines = "".join(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 120)))}) + "\n"
                    for _ in range(docs))
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress == "gz":
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(lines)
    elif compress == "zst":
        import zstandard

        path.write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    else:
        path.write_text(lines)
    return path


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    d = tmp_path / "cache"
    monkeypatch.setenv("LLMEXP_CACHE", str(d))
    return d


def rows_both_ways(overrides: List[str]):
    """(rows encoded one by one as small data is, rows read from the token cache) of one config."""
    from llmexp.data.module import StageDataModule, load_examples
    from llmexp.run import prepared_text
    from llmexp.models.tokenizer import load_tokenizer
    from llmexp.stages import stage_class

    cfg = typed(["stage=pretrain", *overrides])
    tokenizer = load_tokenizer(None, None)
    prepared = load_examples(cfg.data, "pretrain")
    stage = stage_class("pretrain").create(cfg, tokenizer)
    old = StageDataModule(prepared, cfg.data, cfg.trainer, stage)
    old._encode()
    cached = StageDataModule(prepared_text(cfg.data, "pretrain", tokenizer, None, prepared), cfg.data, cfg.trainer,
                             stage)
    cached._from_cache()
    return old, cached


@pytest.mark.parametrize("overrides", [
    [],
    ["data.max_length=24"],                                   # truncation
    ["data.max_length=24", "data.overlong=drop"],
    ["data.max_length=24", "data.overlong=split"],
    ["data.packing=true"],
    ["data.packing=true", "data.max_length=32", "data.overlong=split"],
    ["data.num_proc=2", "data.max_length=48"],              # forked tokenizer workers, parts joined in order
])
def test_cached_rows_are_exactly_the_rows_encoded_one_by_one(cache_dir, tmp_path, overrides):
    corpus = write_corpus(tmp_path / "c.jsonl", 400)
    old, cached = rows_both_ways(["data=files", f"data.path={corpus}", *overrides])
    for split in ("train", "val"):
        want, got = getattr(old, f"{split}_rows"), getattr(cached, f"{split}_rows")
        assert len(got) == len(want) and [got[i] for i in range(len(got))] == want
        for key in ("truncated", "dropped_overlong", "split_chunks", "dropped_no_target", "rows", "tokens"):
            assert cached.stats[split][key] == old.stats[split][key], (split, key)
    assert cached.stats["cache"]["dtype"] == "uint16" and cached.stats["cache"]["hit"] is False


def test_concat_mode_cuts_the_eos_joined_stream_into_full_blocks(cache_dir, tmp_path):
    from llmexp.data.module import load_examples
    from llmexp.data.token_cache import TokenRows
    from llmexp.run import prepared_text
    from llmexp.models.tokenizer import load_tokenizer

    corpus = write_corpus(tmp_path / "c.jsonl", 300)
    cfg = typed(["stage=pretrain", "data=files", f"data.path={corpus}", "data.concat=true", "data.max_length=64"])
    tokenizer = load_tokenizer(None, None)
    prepared = load_examples(cfg.data, "pretrain")
    cache = prepared_text(cfg.data, "pretrain", tokenizer, None, prepared).cache
    rows = TokenRows(Path(cache["dir"]), "train", cache["mode"])
    stream = [t for text in prepared.train["text"] for t in tokenizer(text, add_special_tokens=False)["input_ids"]
              + [tokenizer.eos_token_id]]
    assert len(rows) == len(stream) // 64 and len(rows) > 50
    assert [t for i in range(len(rows)) for t in rows[i]["input_ids"]] == stream[: len(rows) * 64]
    assert all(len(rows[i]["input_ids"]) == 64 and rows[i]["labels"] == rows[i]["input_ids"] for i in range(len(rows)))
    assert "position_ids" not in rows[0]


def test_the_cache_is_hit_missed_and_invalidated_as_it_should(cache_dir, tmp_path):
    """Runs as users start them: the second run hits (without loading the corpus); a changed file
    prepares again; the record says which. The key changes with max_length, a preparation step,
    the row mode and the tokenizer, and not with what does not change the tokens."""
    corpus = write_corpus(tmp_path / "c.jsonl", 300)
    base = ["stage=pretrain", "data=files", f"data.path={corpus}", "trainer.max_steps=2", "logger=none",
            "trainer.val_check_interval=null", "task.check=none", "trainer.limit_val_batches=1"]

    def run(name: str, *extra: str) -> dict:
        r = run_cli([*base, *extra, f"hydra.run.dir={tmp_path / name}"], cwd=tmp_path,
                    env={"LLMEXP_CACHE": str(cache_dir)})
        assert r.returncode == 0, r.stderr[-3000:]
        return json.loads((tmp_path / name / "summary.json").read_text())["data_stats"]["cache"]

    first, second = run("a"), run("b", "optim.lr=1e-3")
    assert (first["hit"], second["hit"]) == (False, True) and first["dir"] == second["dir"]
    with open(corpus, "a") as f:
        f.write(json.dumps({"text": "one more document"}) + "\n")
    changed = run("c")
    assert changed["hit"] is False and changed["tokens_hit"] is False and changed["dir"] != first["dir"]
    assert len([p for p in (cache_dir / "tokens").iterdir() if p.is_dir()]) == 2
    # another max_length or row mode cuts new rows from the tokens already there (no tokenizing)
    shorter, packed = run("d", "data.max_length=64"), run("e", "data.packing=true")
    for other in (shorter, packed):
        assert (other["hit"], other["tokens_hit"]) == (False, True) and other["dir"] != changed["dir"]
        assert Path(other["dir"]).parent.parent == Path(changed["dir"]).parent.parent
    assert shorter["tokens"]["train"] < changed["tokens"]["train"] and packed["mode"] == "packed"
    assert len([p for p in (cache_dir / "tokens").iterdir() if p.is_dir()]) == 2

    from llmexp.data.token_cache import cache_key
    from llmexp.models.tokenizer import load_tokenizer

    tok = load_tokenizer(None, None)
    key = lambda *o: cache_key(typed([*base, *o]).data, tok, "pretrain")  # noqa: E731
    other = load_tokenizer(None, None)
    other.add_tokens(["shard"])  # one more token: other ids
    same = {key(), key("data.num_workers=2"), key("data.num_proc=2"), key("trainer.seed=9"), key("optim.lr=1e-3")}
    changed_keys = {key("data.max_length=64"), key("data.steps=[normalize]"), key("data.packing=true"),
                    key("data.concat=true"), key("data.max_val_samples=50"),
                    cache_key(typed(base).data, other, "pretrain")}
    assert len(same) == 1 and len(changed_keys) == 6 and not same & changed_keys


@pytest.mark.parametrize("compress", ["gz", "zst"])
def test_compressed_corpora_and_a_directory_of_files(cache_dir, tmp_path, compress):
    from llmexp.data.module import load_examples

    plain = write_corpus(tmp_path / "plain" / "a.jsonl", 200, seed=3)
    packed = write_corpus(tmp_path / "shards" / f"a.jsonl.{compress}", 200, seed=3, compress=compress)
    write_corpus(tmp_path / "shards" / f"b.jsonl.{compress}", 100, seed=4, compress=compress)
    one = load_examples(typed(["stage=pretrain", "data=files", f"data.path={plain}"]).data, "pretrain")
    alone = load_examples(typed(["stage=pretrain", "data=files", f"data.path={packed}"]).data, "pretrain")
    both = load_examples(typed(["stage=pretrain", "data=files", f"data.path={tmp_path / 'shards'}"]).data, "pretrain")
    assert sorted(alone.train["text"]) == sorted(one.train["text"])
    assert len(both.train) + len(both.val) > len(one.train) + len(one.val)


def test_prepare_command_builds_the_cache_a_run_then_hits(cache_dir, tmp_path):
    corpus = write_corpus(tmp_path / "c.jsonl", 300)
    args = ["stage=pretrain", "data=files", f"data.path={corpus}"]
    r = run_cli(["prepare", *args], cwd=tmp_path, env={"LLMEXP_CACHE": str(cache_dir)})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "prepared" in r.stdout and "train:" in r.stdout, r.stdout
    assert "cut to data.max_length" not in r.stdout
    short = run_cli(["prepare", *args, "data.max_length=16"], cwd=tmp_path, env={"LLMEXP_CACHE": str(cache_dir)})
    assert short.returncode == 0, short.stderr[-2000:]  # what max_length cuts away is said (it was not)
    assert re.search(r"train: .* \(\d+ cut to data.max_length=16: their other tokens are not trained on; "
                     r"data.overlong=split keeps them", short.stdout), short.stdout
    again = run_cli(["prepare", *args], cwd=tmp_path, env={"LLMEXP_CACHE": str(cache_dir)})
    assert again.returncode == 0 and "already prepared" in again.stdout, again.stdout
    run = run_cli([*args, "trainer.max_steps=2", "logger=none", "task.check=none", f"hydra.run.dir={tmp_path / 'r'}"],
                  cwd=tmp_path, env={"LLMEXP_CACHE": str(cache_dir)})
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["data_stats"]["cache"]["hit"] is True
    bad = run_cli(["prepare", "stage=pretrain", "data=files", f"data.path={tmp_path / 'none.jsonl'}"], cwd=tmp_path)
    assert bad.returncode == 2 and "data.path" in bad.stderr and "Traceback" not in bad.stderr
    # streaming reads the files as training goes: nothing to prepare (it was a TypeError traceback)
    streaming = run_cli(["prepare", *args, "data.streaming=true"], cwd=tmp_path, env={"LLMEXP_CACHE": str(cache_dir)})
    assert streaming.returncode == 0 and "nothing to prepare" in streaming.stdout, streaming.stderr[-2000:]


def test_ranks_read_disjoint_cached_rows_that_cover_one_process(cache_dir, tmp_path):
    """The window sampler over cached rows: two ranks' windows are disjoint and together are the
    global windows one process would read, and every rank opens the same cache."""
    from llmexp.data.sampler import WindowSampler

    old, cached = rows_both_ways(["data=files", f"data.path={write_corpus(tmp_path / 'c.jsonl', 400)}",
                                  "data.packing=true"])
    rows = cached.train_rows
    one = list(WindowSampler(len(rows), 8, seed=1, world_size=1))
    ranks = [list(WindowSampler(len(rows), 4, seed=1, rank=r, world_size=2)) for r in (0, 1)]
    for step, (a, b) in enumerate(zip(*ranks)):
        assert not set(a) & set(b) and sorted(a + b) == sorted(one[step])
    val = [cached.val_rows[r::2] for r in (0, 1)]
    assert sum(len(v) for v in val) == len(cached.val_rows)
    assert [v[i] for v in val for i in range(len(v))] != [] and val[0][0] == cached.val_rows[0]


def test_concat_refuses_chat_data_and_packing_together(tmp_path):
    r = run_cli(["stage=pretrain", "data.concat=true", "data.packing=true", "logger=none",
                 f"hydra.run.dir={tmp_path / 'x'}"], cwd=tmp_path)
    assert r.returncode == 2 and "data.concat and data.packing" in r.stderr
    r = run_cli(["stage=sft", "data.concat=true", "logger=none", f"hydra.run.dir={tmp_path / 'y'}"], cwd=tmp_path)
    assert r.returncode == 2 and "data.concat" in r.stderr and "format 'chat'" in r.stderr, r.stderr[-2000:]


def streamed_corpus(tmp_path: Path) -> Path:
    d = tmp_path / "stream"
    write_corpus(d / "a.jsonl", 150, seed=1)
    write_corpus(d / "b.jsonl.gz", 150, seed=2, compress="gz")
    write_corpus(d / "c.jsonl", 100, seed=3)
    return d


def epoch_documents(data_overrides: List[str], rank: int, world: int) -> List[tuple]:
    """The token sequences one rank's stream trains on in its first epoch (documents mode)."""
    from llmexp.data.streaming import DocumentStream
    from llmexp.models.tokenizer import load_tokenizer

    cfg = typed(["stage=pretrain", *data_overrides])
    stream = DocumentStream(cfg.data, load_tokenizer(None, None), window=1, seed=5, part=rank, parts=world)
    out = []
    for rows, _state in stream:
        if stream.state["epoch"] > 0:
            break
        out.append(tuple(rows[0]["input_ids"]))
    return out


def test_streaming_parts_read_disjoint_documents_that_cover_the_corpus_but_its_validation(tmp_path):
    """Two parts (two ranks, or one rank's two DataLoader workers) read disjoint documents that
    together are one part's; the validation documents are never among them."""
    corpus = streamed_corpus(tmp_path)
    data = ["data=files", f"data.path={corpus}", "data.streaming=true", "data.max_length=512",
            "data.shuffle_buffer=40", "data.max_val_samples=20"]
    one = epoch_documents(data, 0, 1)
    r0, r1 = epoch_documents(data, 0, 2), epoch_documents(data, 1, 2)
    assert not set(r0) & set(r1) and sorted(r0 + r1) == sorted(one)
    assert len(one) == 400 - 20 and len(set(one)) > 350  # every training document once (a few repeat by chance)
    from llmexp.data.streaming import DocumentStream
    from llmexp.models.tokenizer import load_tokenizer

    tok = load_tokenizer(None, None)
    val = DocumentStream(typed(["stage=pretrain", *data]).data, tok, 1, 5).validation_documents()
    val_ids = {tuple(tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]) for t in val}
    assert len(val) == 20 and not val_ids & set(one)
    assert one != sorted(one) and one[:50] != epoch_documents([*data[:-2], "data.shuffle_buffer=1",
                                                                "data.max_val_samples=20"], 0, 1)[:50]


@pytest.mark.slow
@pytest.mark.parametrize("mode", [[], ["data.concat=true", "data.num_workers=2"],
                                  ["strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu"]],
                         ids=["documents", "concat-two-workers", "ddp"])
def test_streaming_resume_after_sigkill_matches_uninterrupted(tmp_path, mode):
    from safetensors.torch import load_file

    from llmexp.testing import FAST, train_in_subprocess

    corpus = streamed_corpus(tmp_path)
    overrides = [*FAST, "stage=pretrain", "data=files", f"data.path={corpus}", "data.streaming=true",
                 "data.max_length=48", "data.shuffle_buffer=30", "data.max_val_samples=16", "trainer.max_steps=30",
                 "trainer.checkpoint_every_n_steps=5", "trainer.val_check_interval=10", "trainer.micro_batch_size=4",
                 "trainer.grad_accum=2", "task.check=none", *mode]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert train_in_subprocess(overrides, straight).returncode == 0
    assert train_in_subprocess(overrides, killed, kill_at=17).returncode == -9
    r = train_in_subprocess([*overrides, f"resume={killed}"], killed)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = load_file(straight / "model" / "model.safetensors"), load_file(killed / "model" / "model.safetensors")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    s = json.loads((killed / "summary.json").read_text())
    assert s["global_step"] == 30 and s["data_stats"]["streaming"]["files"] == 3


def test_streaming_a_corpus_that_is_all_validation_is_refused_not_read_forever(tmp_path):
    """200 documents under the default max_val_samples (500): every one is a validation row, and
    the stream read the files round and round for a training row (a run hung at 100% CPU)."""
    corpus = write_corpus(tmp_path / "small.jsonl", 200)
    r = run_cli(["stage=pretrain", "data=files", f"data.path={corpus}", "data.streaming=true", "logger=none",
                 "trainer.max_steps=2", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "holds 200 documents" in r.stderr and "lower data.max_val_samples" in r.stderr, r.stderr
    # A part that a whole pass over the corpus gives no document (more readers than documents) is
    # refused as well, where the stream would have looped.
    from llmexp.data.streaming import DocumentStream
    from llmexp.errors import UserError
    from llmexp.models.tokenizer import load_tokenizer

    cfg = typed(["stage=pretrain", "data=files", f"data.path={corpus}", "data.streaming=true",
                 "data.max_val_samples=199"]).data
    with pytest.raises(UserError, match="fewer than the 2 readers"):
        next(iter(DocumentStream(cfg, load_tokenizer(None, None), window=4, seed=1, part=1, parts=2)))
    # 120 of the 200 held out: said, with the share, as the stream is read only as far as that.
    cfg = typed(["stage=pretrain", "data=files", f"data.path={corpus}", "data.streaming=true",
                 "data.max_val_samples=120"]).data
    stream = DocumentStream(cfg, load_tokenizer(None, None), window=4, seed=1)
    assert stream.training_documents(up_to=120) == 80 and stream.training_documents(up_to=30) == 30
    r = run_cli(["stage=pretrain", "data=files", f"data.path={corpus}", "data.streaming=true", "logger=none",
                 "data.max_val_samples=120", "trainer.max_steps=1", "trainer.val_check_interval=null",
                 f"hydra.run.dir={tmp_path / 'run2'}"], cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    said = " ".join(r.stderr.split())
    assert "validation holds the first 120 documents" in said and "60% of its 200" in said, said
