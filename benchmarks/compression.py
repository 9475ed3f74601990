"""Compression as shipped, measured before -> after in one table: the default SFT (the teacher),
a half-width student trained by plain SFT (at its best lr) and by distillation from the teacher, the teacher
pruned (shipped stage=prune: 40 % of the MLP neurons, 200 recovery steps), the teacher made 50 %
sparse (stage.sparsity=0.5, magnitude, 200 recovery steps), each of the teacher and the
distilled student quantized to int8 (torchao), and the teacher as llama.cpp's 8- and 4-bit GGUF
(stage.method=q8_0 / q4_0; measured as transformers reads the file back, and, where
llama-cpp-python is installed, in llama.cpp itself: exact match, tokenization, tokens/s), the
teacher in AutoRound's tuned 4 bits (stage.method=autoround), and the 200-step SFT (where 4-bit
rounding shows) as q4_0, as AutoRound untuned (stage.iters=0) and tuned. For every model: parameters, the fraction of weights that
are zero, weight bytes on disk and zstd-compressed, greedy generation tokens/s, the task metric (exact match on the skill's 155
held-out questions) and validation perplexity.

    python benchmarks/compression.py              # about 4 minutes on a 2-core CPU
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

from common import REPO, save

HALF = ["model.hidden_size=32", "model.intermediate_size=128"]


def run(args: List[str], run_dir: Path) -> Dict[str, Any]:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "llmexp", "logger=csv", *args, f"hydra.run.dir={run_dir}"], check=True,
                   capture_output=True, cwd=REPO)
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["_wall"] = time.perf_counter() - started
    return summary


def generation_speed(model_dir: Path) -> float:
    """Greedy tokens/s of an exported model on 32 task prompts (plain transformers + llmexp's sampler)."""
    import torch

    from llmexp.data.collate import collate_prompts
    from llmexp.data.encode import render_prompt
    from llmexp.data.skill import task_prompts
    from llmexp.record import load_language_model
    from llmexp.sampler import Sampler

    model, tok = load_language_model(model_dir)
    rows = [{"input_ids": render_prompt(tok, r["prompt"]), "prompt": r["prompt"], "columns": {}}
            for r in task_prompts()[:32]]
    batch = collate_prompts(rows, tok.pad_token_id)
    sampler = Sampler(model, tok.eos_token_id, tok.pad_token_id)
    with torch.no_grad():
        sampler(batch["prompt_ids"][:4], batch["prompt_mask"][:4], 4, greedy=True)  # warm-up
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            out = sampler(batch["prompt_ids"], batch["prompt_mask"], 24, greedy=True).responses
            best = min(best, time.perf_counter() - started)
    tokens = int((out != tok.pad_token_id).sum())
    return tokens / best


def llama_cpp_check(gguf: Path, model_dir: Path) -> Dict[str, Any]:
    """The GGUF file in llama.cpp itself (llama-cpp-python, where installed): exact match on the
    155 questions (greedy, the prompts tokenized by transformers and fed as ids), whether llama.cpp
    tokenizes every rendered prompt as transformers does, and greedy tokens/s one question at a
    time on 2 threads. Empty without llama-cpp-python."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return {}
    from transformers import AutoTokenizer

    from llmexp.data.encode import render_prompt
    from llmexp.data.skill import correctness_reward, task_prompts

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    llm = Llama(model_path=str(gguf), n_ctx=256, n_threads=2, verbose=False)
    right = same_tokens = tokens = 0
    rows = task_prompts()
    started = time.perf_counter()
    for r in rows:
        ids = render_prompt(tok, r["prompt"])
        same_tokens += llm.tokenize(tok.decode(ids).encode(), add_bos=False, special=True) == list(ids)
        out = llm.create_completion(list(ids), max_tokens=24, temperature=0.0, top_k=1)
        tokens += out["usage"]["completion_tokens"]
        right += correctness_reward(out["choices"][0]["text"].strip(), **r["columns"])
    seconds = time.perf_counter() - started
    return {"llama_cpp_task_score": round(right / len(rows), 4),
            "llama_cpp_same_tokens": f"{same_tokens}/{len(rows)}",
            "llama_cpp_tokens_per_second": round(tokens / seconds, 1)}


def zero_fraction_and_zstd_bytes(model_dir: Path) -> tuple:
    """The fraction of the weights that are exactly zero, and the safetensors' zstd size (what
    unstructured sparsity saves when the file is stored or shipped compressed)."""
    import zstandard
    from safetensors.torch import load_file

    files = sorted(model_dir.glob("*.safetensors"))
    tensors = [t for f in files for t in load_file(str(f)).values() if t.is_floating_point()]
    zeros = sum(int((t == 0).sum()) for t in tensors) / max(1, sum(t.numel() for t in tensors))
    packed = sum(len(zstandard.ZstdCompressor(level=19).compress(f.read_bytes())) for f in files)
    return round(zeros, 4), packed


def row(name: str, run_dir: Path, s: Dict[str, Any]) -> Dict[str, Any]:
    metrics, model_dir = s["final"], Path(s["model_dir"])
    zeros, packed = zero_fraction_and_zstd_bytes(model_dir)
    gguf = s.get("quantization", {}).get("gguf")
    if gguf:  # the file is the model shipped; model/ holds its weights dequantized
        import zstandard

        packed = len(zstandard.ZstdCompressor(level=19).compress(Path(gguf).read_bytes()))
    return {"model": name, "parameters": s["parameters"], "zero_fraction": zeros, "zstd_bytes": packed,
            "weight_bytes": (s["compression"]["weight_bytes_after"] if gguf else
                             sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))),
            "tokens_per_second": None if gguf else round(generation_speed(model_dir), 1),
            "task_score": round(metrics["val/task_score"], 4), "perplexity": round(metrics["val/perplexity"], 4),
            **(llama_cpp_check(Path(gguf), model_dir) if gguf else {}),
            "run_seconds": round(s["_wall"], 1), "run_dir": str(run_dir)}


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="llmexp-compression-"))
    teacher = run(["stage=sft"], root / "teacher")
    # at 3e-3, the lr this student learns best with by plain SFT (stage=sft's own 1e-3, tuned for the
    # default model, left it at 0.57)
    student_sft = run(["stage=sft", *HALF, "optim.lr=3e-3"], root / "student-sft")
    student_kd = run(["stage=distill", f"stage.teacher={root / 'teacher'}", *HALF], root / "student-distill")
    teacher_pruned = run(["stage=prune", f"model.pretrained={root / 'teacher' / 'model'}"], root / "teacher-pruned")
    teacher_sparse = run(["stage=prune", f"model.pretrained={root / 'teacher' / 'model'}", "stage.mlp_keep=1",
                          "stage.sparsity=0.5"], root / "teacher-sparse")
    teacher_q = run(["stage=quantize", f"model.pretrained={root / 'teacher' / 'model'}"], root / "teacher-int8")
    teacher_q8_0 = run(["stage=quantize", f"model.pretrained={root / 'teacher' / 'model'}", "stage.method=q8_0"],
                       root / "teacher-q8_0")
    teacher_q4_0 = run(["stage=quantize", f"model.pretrained={root / 'teacher' / 'model'}", "stage.method=q4_0"],
                       root / "teacher-q4_0")
    student_q = run(["stage=quantize", f"model.pretrained={root / 'student-distill' / 'model'}"],
                    root / "student-distill-int8")
    teacher_ar = run(["stage=quantize", f"model.pretrained={root / 'teacher' / 'model'}", "stage.method=autoround"],
                     root / "teacher-autoround")
    # 4-bit where rounding shows: the 200-step SFT the post-training pipelines start from
    short = run(["stage=sft", "experiment=sft_short"], root / "short-sft")
    short_4bit = {name: run(["stage=quantize", f"model.pretrained={root / 'short-sft' / 'model'}", *extra],
                            root / f"short-{name}")
                  for name, extra in (("q4_0", ["stage.method=q4_0"]),
                                      ("autoround-untuned", ["stage.method=autoround", "stage.iters=0"]),
                                      ("autoround", ["stage.method=autoround"]))}
    rows = [row("teacher: default sft (hidden 64)", root / "teacher", teacher),
            row("teacher int8", root / "teacher-int8", teacher_q),
            row("teacher q8_0 GGUF", root / "teacher-q8_0", teacher_q8_0),
            row("teacher q4_0 GGUF", root / "teacher-q4_0", teacher_q4_0),
            row("teacher autoround 4-bit", root / "teacher-autoround", teacher_ar),
            row("teacher pruned (mlp 0.4) + recovery", root / "teacher-pruned", teacher_pruned),
            row("teacher 50% sparse + recovery", root / "teacher-sparse", teacher_sparse),
            row("half-width student, plain sft", root / "student-sft", student_sft),
            row("half-width student, distilled", root / "student-distill", student_kd),
            row("distilled student int8", root / "student-distill-int8", student_q),
            row("200-step sft", root / "short-sft", short),
            *[row(f"200-step sft {name}", root / f"short-{name}", s) for name, s in short_4bit.items()]]
    base = rows[0]
    for r in rows:
        r["size_ratio_to_teacher"] = round(base["weight_bytes"] / r["weight_bytes"], 2)
        r["speed_ratio_to_teacher"] = (round(r["tokens_per_second"] / base["tokens_per_second"], 2)
                                       if r["tokens_per_second"] else None)
    print(f"{'model':36} {'params':>8} {'zeros':>6} {'weights':>9} {'zstd':>8} {'size x':>7} {'tok/s':>8} "
          f"{'speed x':>8} {'exact match':>12} {'perplexity':>11}")
    for r in rows:
        print(f"{r['model']:36} {r['parameters']:>8} {r['zero_fraction']:>6} {r['weight_bytes']:>9} "
              f"{r['zstd_bytes']:>8} {r['size_ratio_to_teacher']:>7} {str(r['tokens_per_second'] or '-'):>8} "
              f"{str(r['speed_ratio_to_teacher'] or '-'):>8} {r['task_score']:>12.3f} {r['perplexity']:>11.4f}")
    for r in rows:
        if "llama_cpp_task_score" in r:
            print(f"  in llama.cpp: {r['model']}: exact match {r['llama_cpp_task_score']:.3f}, "
                  f"{r['llama_cpp_tokens_per_second']} tokens/s, tokenized as transformers: {r['llama_cpp_same_tokens']}")
    save("compression", {"rows": rows, "pruning": teacher_pruned["pruning"],
                         "sparsity": teacher_sparse["pruning"]["sparsity"],
                         "quantization": {"teacher": teacher_q["quantization"], "student": student_q["quantization"],
                                      "teacher_q8_0": teacher_q8_0["quantization"],
                                      "teacher_q4_0": teacher_q4_0["quantization"],
                                      "teacher_autoround": teacher_ar["quantization"],
                                      **{f"short_{k}": v["quantization"] for k, v in short_4bit.items()}}})


if __name__ == "__main__":
    main()
