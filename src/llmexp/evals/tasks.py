"""llmexp's bundled lm-eval tasks on the arithmetic skill, written where lm-eval can read them.

lm-eval resolves relative ``data_files`` against the current directory, so the task YAMLs are
rendered with absolute paths into a cache directory (keyed by the generator version) and given to
``TaskManager(include_path=...)``. Three tasks:

- ``arithmetic_mc`` (multiple_choice, ``acc``): the right solution against three near misses;
- ``arithmetic_gen`` (generate_until, ``exact_match`` on the number, token ``f1`` on the solution);
- ``arithmetic_ppl`` (loglikelihood_rolling, ``word_perplexity`` / ``bits_per_byte``) on held-out text.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Dict, List

from llmexp.data import skill

VERSION = 2
BUNDLED_TASKS = ("arithmetic_mc", "arithmetic_gen", "arithmetic_ppl")

UTILS = r'''"""Metrics for arithmetic_gen (written by llmexp.evals.tasks)."""
import re

_NUMBER = re.compile(r"=\s*(-?\d+)")


def _tokens(text):
    return text.replace("=", " = ").split()


def process_results(doc, results):
    completion = results[0].strip()
    found = _NUMBER.search(completion)
    pred = found.group(1) if found else None
    ref, got = _tokens(doc["solution"]), _tokens(completion.split("\n")[0])
    common = sum(min(ref.count(t), got.count(t)) for t in set(ref))
    f1 = 0.0 if not common else 2 * common / (len(ref) + len(got))
    return {"exact_match": float(pred == doc["answer"]), "f1": f1}
'''


def _docs(seed: int = 4321) -> List[Dict]:
    rng = random.Random(seed)
    docs = []
    for p in skill.problems(9):
        t = rng.randrange(len(skill.QUESTION_TEMPLATES[p.op]))
        wrong = set()
        while len(wrong) < 3:
            wrong.add(skill.wrong_answer(p, rng))
        choices = [p.solution()] + [p.solution(w) for w in sorted(wrong)]
        rng.shuffle(choices)
        docs.append({"question": p.question(t), "solution": p.solution(), "answer": str(p.answer),
                     "choices": choices, "label": choices.index(p.solution())})
    return docs


def _yaml(name: str, data: Path, body: str) -> str:
    return (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n"
            f"test_split: test\n{body}")


def bundled_task_dir() -> Path:
    """The directory of the bundled task YAMLs and data (written once per generator version)."""
    root = Path(os.environ.get("LLMEXP_CACHE", Path.home() / ".cache" / "llmexp")) / "lm_eval_tasks" / f"v{VERSION}"
    if (root / "arithmetic_ppl.yaml").is_file():
        return root
    tmp = root.with_name(f"{root.name}.tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    final_data = root / "arithmetic.jsonl"
    (tmp / "arithmetic.jsonl").write_text("".join(json.dumps(d) + "\n" for d in _docs()))
    texts = [d["text"] for d in skill.text_corpus(60, seed=98765)]
    (tmp / "arithmetic_text.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    (tmp / "utils.py").write_text(UTILS)
    (tmp / "arithmetic_mc.yaml").write_text(_yaml("arithmetic_mc", final_data, (
        "output_type: multiple_choice\ndoc_to_text: \"{{question}}\"\ndoc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: label\ntarget_delimiter: \"\"\nmetric_list:\n"
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")))
    (tmp / "arithmetic_gen.yaml").write_text(_yaml("arithmetic_gen", final_data, (
        "output_type: generate_until\ndoc_to_text: \"{{question}}\"\ndoc_to_target: \"{{solution}}\"\n"
        "target_delimiter: \"\"\ngeneration_kwargs:\n  until: [\"\\n\"]\n  do_sample: false\n  max_gen_toks: 16\n"
        "process_results: !function utils.process_results\nmetric_list:\n"
        "  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: f1\n    aggregation: mean\n    higher_is_better: true\n")))
    (tmp / "arithmetic_ppl.yaml").write_text(_yaml("arithmetic_ppl", root / "arithmetic_text.jsonl", (
        "output_type: loglikelihood_rolling\ndoc_to_text: \"{{text}}\"\ndoc_to_target: \"{{text}}\"\n"
        "metric_list:\n"  # lm-eval's own defaults for these metrics, stated (else it warns of each)
        "  - metric: word_perplexity\n    aggregation: weighted_perplexity\n    higher_is_better: false\n"
        "  - metric: byte_perplexity\n    aggregation: weighted_perplexity\n    higher_is_better: false\n"
        "  - metric: bits_per_byte\n    aggregation: bits_per_byte\n    higher_is_better: false\n")))
    try:
        tmp.rename(root)
    except OSError:  # another process wrote it first
        pass
    return root


def task_names(include_path: str | None) -> List[str]:
    """Task names declared by the YAMLs of the bundled tasks and of ``include_path`` (no lm-eval import)."""
    names = list(BUNDLED_TASKS)
    if include_path and Path(include_path).is_dir():
        for f in sorted(Path(include_path).rglob("*.yaml")):
            for line in f.read_text(errors="ignore").splitlines():
                if line.startswith("task:"):
                    names.append(line.split(":", 1)[1].strip().strip("'\""))
    return names


def missing_data_files(include_path: str | None, tasks: List[str]) -> List[str]:
    """Why a task of ``include_path`` would fail to find its data (a message per file): lm-eval reads a
    YAML's relative ``dataset_kwargs.data_files`` from the current directory, not the YAML's, and
    failed mid-run with a traceback (FileNotFoundError: Unable to find '<cwd>/mydata.jsonl')."""
    import yaml

    if not include_path or not Path(include_path).is_dir():
        return []

    class Loader(yaml.SafeLoader):  # lm-eval's YAMLs carry !function tags
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    out = []
    for f in sorted(Path(include_path).rglob("*.yaml")):
        try:
            doc = yaml.load(f.read_text(errors="ignore"), Loader=Loader)
        except yaml.YAMLError:
            continue  # lm-eval reports it
        if not isinstance(doc, dict) or doc.get("task") not in tasks:
            continue
        files = (doc.get("dataset_kwargs") or {}).get("data_files") if isinstance(doc.get("dataset_kwargs"), dict) \
            else None
        named = files.values() if isinstance(files, dict) else [files]
        for entry in named:
            for path in entry if isinstance(entry, list) else [entry]:
                if not isinstance(path, str) or "://" in path or any(c in path for c in "*?[") or Path(path).exists():
                    continue
                beside = f.parent / path
                out.append(f"task {doc['task']!r} ({f}) reads data_files {path!r}, which lm-eval looks for in the "
                           f"current directory ({Path.cwd()}), not beside the YAML; give its absolute path in the "
                           f"YAML" + (f" ({beside.resolve()})" if beside.exists() else ""))
    return out
