"""`llmexp export`: a run's model, or one of its checkpoints, in another format.

    llmexp export <run> --format gguf [--type q8_0] [--out model.gguf]   its model/, one file for llama.cpp
    llmexp export <run> --checkpoint step-400 --format hf [--out DIR]     a checkpoint as a Hugging Face model
    llmexp export <run> --checkpoint last --format gguf                   a checkpoint for llama.cpp
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import List, Optional

from llmexp.export_gguf import TENSOR_TYPES


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmexp export", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("run", help="a run directory (its model/, or with --checkpoint its checkpoints/), or an "
                               "exported model directory")
    p.add_argument("--format", choices=["hf", "gguf"], required=True,
                   help="hf: a Hugging Face model directory (with --checkpoint); gguf: one file for llama.cpp")
    p.add_argument("--checkpoint", help="a checkpoint of the run instead of its model/: step-N (or N), last, best "
                                        "(trainer.keep_best's best validation so far), or a checkpoint's path; the run "
                                        "need not have finished")
    p.add_argument("--out", help="what to write (default: <run dir>/model.gguf; with --checkpoint "
                                 "<run dir>/exports/step-N/ or exports/step-N.gguf)")
    p.add_argument("--type", choices=TENSOR_TYPES, dest="tensor_type",
                   help="gguf: how the weights are stored (default f32; q8_0 and q4_0 are llama.cpp's 8- and 4-bit "
                        "blocks of 32 weights with one f16 scale)")
    return p


def write_gguf_file(source: Path, out: Path, tensor_type: str, name: str) -> dict:
    """``source`` (a model directory) as the GGUF file ``out``, written whole or not at all."""
    from llmexp.errors import UserError
    from llmexp.export_gguf import write_gguf

    partial = out.with_name(f".{out.name}.partial")
    try:
        facts = write_gguf(source, partial, tensor_type, name=name)
        partial.replace(out)
    except ValueError as e:
        partial.unlink(missing_ok=True)
        raise UserError(f"run: cannot write {e}") from None
    except OSError as e:
        partial.unlink(missing_ok=True)
        raise UserError(f"--out: cannot write {str(out)!r}: {e.strerror or e}; give a writable --out") from None
    return facts


def gguf_of_model(run: str, given_out: Optional[str], tensor_type: str) -> str:
    """The run's model/ (or a model directory) as GGUF."""
    from llmexp.export_gguf import merged_copy, model_name, output_file
    from llmexp.record import model_dir_of

    model_dir = model_dir_of(run, "run")
    out = output_file(given_out, model_dir)
    with scratch_beside(out, ".merged-") as scratch:
        source = model_dir
        if not (model_dir / "config.json").is_file():  # LoRA adapters alone (peft.merge_on_export=false)
            print(f"merging the LoRA adapters of {model_dir} onto their base", file=sys.stderr)
            source = merged_copy(model_dir, Path(scratch) / "model")
        facts = write_gguf_file(source, out, tensor_type, model_name(model_dir))
    return gguf_line(out, facts)


def scratch_beside(out: Path, prefix: str):
    """A temporary directory next to ``out`` (a merge or an export written there is renamed over
    nothing: the same disk); one that cannot be made is a UserError naming --out."""
    from llmexp.errors import UserError

    try:
        return tempfile.TemporaryDirectory(dir=out.parent, prefix=prefix)
    except OSError as e:
        raise UserError(f"--out: cannot write {str(out)!r}: {e.strerror or e}; give a writable --out") from None


def gguf_line(out: Path, facts: dict) -> str:
    return (f"wrote {out} ({facts['tensors']} tensors, {facts['bytes']} bytes, {facts['architecture']}, "
            + ", ".join(f"{n} {t}" for t, n in facts["tensor_types"].items()) + ")")


def checkpoint_as(fmt: str, run: str, which: str, given_out: Optional[str], tensor_type: str) -> str:
    """A checkpoint of the run as a Hugging Face directory or a GGUF file."""
    from llmexp.checkpoint_export import default_out, described, export_checkpoint, out_directory, resolve
    from llmexp.export_gguf import merged_copy, model_name, output_file

    record, ckpt, step, best = resolve(run, which)
    if fmt == "hf":
        out = out_directory(given_out, record, step, "hf")
        facts = export_checkpoint(record, ckpt, out, best)
        which = f"the best validation by {best.get('monitor')}, " if best else ""
        return f"wrote {out} ({which}step {step} of {record.path}{described(facts)})"
    if not given_out:
        default_out(record, step, "gguf").parent.mkdir(parents=True, exist_ok=True)
    out = output_file(given_out or str(default_out(record, step, "gguf")), record.model)
    with scratch_beside(out, ".checkpoint-") as scratch:
        source = Path(scratch) / "model"
        export_checkpoint(record, ckpt, source, best)
        if not (source / "config.json").is_file():  # LoRA adapters alone: a GGUF file holds a whole model
            source = merged_copy(source, Path(scratch) / "merged")
        facts = write_gguf_file(source, out, tensor_type, model_name(record.path / "exports" / f"step-{step}"))
    return gguf_line(out, facts)


def main(argv: Optional[List[str]] = None) -> int:
    from llmexp.errors import UserError, report

    args = parser().parse_args(argv)
    from llmexp.env import configure_environment

    configure_environment(offline=True)  # local files only; no progress bars from the model's save
    try:
        if args.tensor_type and args.format != "gguf":
            raise UserError("--type: sets how a GGUF file stores its weights; a Hugging Face export keeps the "
                            "checkpoint's dtype: drop --type, or give --format gguf")
        tensor_type = args.tensor_type or "f32"
        if args.checkpoint is not None:
            line = checkpoint_as(args.format, args.run, args.checkpoint, args.out, tensor_type)
        elif args.format == "hf":
            raise UserError("--format hf: a run's model/ is a Hugging Face model already; give --checkpoint step-N "
                            "(or last) to export one of its checkpoints")
        else:
            line = gguf_of_model(args.run, args.out, tensor_type)
    except UserError as e:
        return report(e)
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
