"""``llmexp serve <run dir>``: a run's model behind an OpenAI-compatible API, and a page where
people compare its answers; their judgements become preference data for the next round.

    llmexp serve runs/sft-llama/<time>                      # http://127.0.0.1:8000
    llmexp serve runs/sft-llama/<time> --port 8080 --api-key $KEY --prompts prompts.jsonl

``/v1/chat/completions`` (streaming too) and ``/v1/models`` speak OpenAI's API; ``/`` is the
feedback page; judgements go to ``<run dir>/feedback/`` (``--feedback DIR``): ``pairs.jsonl`` for
stage=dpo, ``ratings.jsonl`` for stage=kto (docs/serving.md).
"""

import argparse
import json
import os
import socket
import signal
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from llmexp.argtypes import command_summary
from llmexp.argtypes import positive_int
from llmexp.errors import UserError, quiet_exits, report

HOSTS = ("127.0.0.1", "0.0.0.0", "::")
PAGE = Path(__file__).with_name("page.html")
DEFAULT_TEMPERATURE = 0.7  # for a run without rollout settings (LitServe's default too)


def run_defaults(target: Path) -> Dict[str, Any]:
    """The served run's generation settings and prompts: its task probe's answer length, its
    rollout temperature (if it sampled), and whether it trained on the bundled skill."""
    from llmexp.record import RunDir

    import yaml

    config = RunDir(target).config
    cfg = yaml.safe_load(config.read_text()) if config.is_file() else {}
    cfg = cfg if isinstance(cfg, dict) else {}
    stage = cfg.get("stage") or {}
    # the temperature it sampled at, where it sampled: distill samples only with lmbda > 0
    sampled = stage.get("name") != "distill" or float(stage.get("lmbda") or 0) > 0
    rollout = (stage.get("rollout") or {}) if sampled else {}
    data = cfg.get("data") or {}
    return {"max_new_tokens": int((cfg.get("task") or {}).get("max_new_tokens") or 24),
            "temperature": float(rollout.get("temperature", DEFAULT_TEMPERATURE)),
            "bundled_skill": (str(data.get("name", "")).startswith("arithmetic") or data.get("source") == "mixture"
                              or _measured_on_the_skill(RunDir(target))),
            "run_name": cfg.get("run_name"), "stage": stage.get("name")}


def _measured_on_the_skill(record) -> bool:
    """Whether the run's task metric was the skill's (a dpo run on judgements of its questions)."""
    import json

    try:
        summary = json.loads(record.summary_file.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(summary, dict) and (summary.get("task") or {}).get("check") == "arithmetic_correct"


def load_prompts(path: Optional[str], bundled_skill: bool) -> List[Dict[str, Any]]:
    """The page's prompts: ``{"id", "text", "columns"}``. From a JSONL file (``prompt``: text or a
    list of messages, other fields kept as columns), else the bundled skill's questions for a run
    trained on it, else none (people type their own)."""
    if path is None:
        if not bundled_skill:
            return []
        from llmexp.data.skill import task_prompts

        # every question in each of its wordings, as the run's task metric asks them (judgements of
        # one wording each taught DPO that wording: 0.35 -> 0.47 on the 620, where the 155 rose to 0.60)
        rows = task_prompts(every_wording=True)
        return [{"id": i, "text": r["prompt"][-1]["content"], "columns": r["columns"]} for i, r in enumerate(rows)]
    file = Path(path)
    if not file.is_file():
        raise UserError(f"--prompts: no file {path!r}; give a JSONL file with one {{\"prompt\": ...}} per line")
    out = []
    for n, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"--prompts: {path} line {n} is not JSON ({e.msg}); one JSON object per line") from None
        prompt = row.get("prompt") if isinstance(row, dict) else None
        if isinstance(prompt, list) and prompt and isinstance(prompt[-1], dict):
            prompt = prompt[-1].get("content")
        if not isinstance(prompt, str) or not prompt.strip():
            raise UserError(f"--prompts: {path} line {n} has no 'prompt' text (a string, or a list of messages "
                            f"ending with the user's)")
        out.append({"id": len(out), "text": prompt, "columns": {k: v for k, v in row.items() if k != "prompt"}})
    if not out:
        raise UserError(f"--prompts: {path} has no prompts")
    return out


def check_feedback_dir(path: Path, key: str) -> None:
    """The judgements' directory can be written (every judgement was a bare 500 when it was a file)."""
    from llmexp.overrides import _unwritable

    if path.exists() and not path.is_dir():
        raise UserError(f"{key}: {str(path)!r} is a file; give a directory for the judgements (it is created)")
    why = _unwritable(path)
    if why:
        raise UserError(f"{key}: cannot write judgements in {str(path)!r} ({why}); give a directory you can write "
                        f"with --feedback")


def check_address(host: str, port: int) -> None:
    if host not in HOSTS:
        raise UserError(f"--host: {host!r} is not one llmexp serve can bind; use 127.0.0.1 (this machine only, the "
                        f"default), 0.0.0.0 (every IPv4 interface) or :: (every interface)")
    low = 1 if os.geteuid() == 0 else 1024  # below 1024 only root may bind (in a container, say)
    if not low <= port <= 65535:
        raise UserError(f"--port: {port} is outside {low}-65535; pick a free port in that range")
    family = socket.AF_INET6 if host == "::" else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise UserError(f"--port: {host}:{port} is not free ({e.strerror}); stop what uses it or give "
                            f"another --port") from None


def stopping_server_class():
    """LitServer whose worker monitor ends when shutdown begins. LitServe's monitor polls the
    shutdown event, a proxy in its manager process, every 2 s. At Ctrl+C or kill it went on polling:
    it saw the workers the shutdown had just stopped and logged "Worker died; shutting down", or
    its poll reached the manager after it had stopped and printed a BrokenPipeError traceback (once
    in a test run). An event that is already set, in this process, ends its loop at the next poll."""
    import threading

    import litserve as ls

    class StoppingServer(ls.LitServer):
        def _perform_graceful_shutdown(self, manager, uvicorn_workers, shutdown_reason="normal"):
            stopping = threading.Event()
            stopping.set()
            self._shutdown_event = stopping
            super()._perform_graceful_shutdown(manager, uvicorn_workers, shutdown_reason)

    return StoppingServer


def build_server(served, prompts: List[Dict[str, Any]], feedback_dir: Path):
    """The LitServer: the chat API (LitServe's OpenAI spec), /v1/models, the page and its routes."""
    from fastapi import Depends, HTTPException, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse

    from starlette.exceptions import HTTPException as StarletteHTTPException

    from llmexp.serving.api import ChatAPI, http_error, openai_error, require_key, validation_error
    from llmexp.serving.feedback import BadJudgement, FeedbackLog, judgement_rows

    StoppingServer = stopping_server_class()

    api = ChatAPI(served)
    server = StoppingServer(api, accelerator="auto", timeout=600, enable_shutdown_api=False)
    app = server.app
    app.router.routes = [r for r in app.router.routes if getattr(r, "path", None) != "/"]  # LitServe's greeting
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    log = FeedbackLog(feedback_dir)

    def check_key(request: Request) -> None:
        require_key(request, served.api_key)

    keyed = [Depends(check_key)]
    by_id = {p["id"]: p for p in prompts}

    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    async def config(request: Request) -> Dict[str, Any]:
        """Open, since the page asks it whether a key is needed; where the judgements are written (a
        path on the server) only with the key, when there is one."""
        facts = {"model": served.name, "temperature": served.temperature, "max_tokens": served.max_new_tokens,
                 "key_required": bool(served.api_key)}
        try:
            require_key(request, served.api_key)
        except HTTPException:
            return facts
        return {**facts, "feedback_dir": str(feedback_dir)}

    async def models() -> Dict[str, Any]:
        return {"object": "list", "data": [{"id": served.name, "object": "model", "created": 0,
                                            "owned_by": "llmexp"}]}

    async def prompt_list() -> Dict[str, Any]:
        return {"prompts": [{"id": p["id"], "text": p["text"]} for p in prompts]}

    def record(body: Any) -> Dict[str, int]:
        picked = None
        if isinstance(body, dict) and body.get("prompt_id") is not None:
            given = body["prompt_id"]  # true is 1 to a dict: it took prompt 1's answer columns
            picked = by_id.get(given) if isinstance(given, int) and not isinstance(given, bool) else None
            if picked is None:  # a typo, a stale page or "49" for 49: its fields would be missing, silently
                raise BadJudgement(f"prompt_id: {body['prompt_id']!r} is not the id of a prompt on this page "
                                   f"(GET /feedback/prompts lists them); leave it out for a prompt of your own")
            if picked["text"] != body.get("prompt"):
                raise BadJudgement(f"prompt: is not the text of prompt_id {body['prompt_id']!r}; send it as GET "
                                   f"/feedback/prompts gives it, or leave prompt_id out for a prompt of your own")
        columns = picked["columns"] if picked else {}
        reserved = {"prompt", "chosen", "rejected", "completion", "label", "judged_at", "judgement", "model"}
        extra = {"model": served.name, **{k: v for k, v in columns.items() if k not in reserved}}
        return log.append(judgement_rows(body, extra))

    async def judgements(request: Request) -> JSONResponse:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return openai_error(400, "the body is not JSON; send a JSON object with kind, prompt and the answers")
        try:
            from starlette.concurrency import run_in_threadpool

            counts = await run_in_threadpool(record, body)
        except BadJudgement as e:
            return openai_error(400, str(e), e.param)
        return JSONResponse({"recorded": True, "pairs": counts["pairs.jsonl"], "ratings": counts["ratings.jsonl"]})

    app.add_api_route("/", page, methods=["GET"], include_in_schema=False)
    app.add_api_route("/feedback/config", config, methods=["GET"])
    app.add_api_route("/v1/models", models, methods=["GET"], dependencies=keyed)
    app.add_api_route("/feedback/prompts", prompt_list, methods=["GET"], dependencies=keyed)
    app.add_api_route("/feedback/judgements", judgements, methods=["POST"], dependencies=keyed)
    return server


@quiet_exits
def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="llmexp serve", description=command_summary(__doc__))
    ap.add_argument("target", help="a run directory (its model/) or a model directory")
    ap.add_argument("--host", default="127.0.0.1", help="127.0.0.1 (default: this machine only), 0.0.0.0 or ::")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--api-key", default=os.environ.get("LLMEXP_API_KEY"),
                    help="clients must send it (Authorization: Bearer); default: $LLMEXP_API_KEY, else none")
    ap.add_argument("--prompts", help="JSONL of prompts for the page (default: the bundled skill's questions for "
                                      "a run trained on it)")
    ap.add_argument("--feedback", help="directory for the judgements (default: <run dir>/feedback)")
    ap.add_argument("--max-batch-size", type=positive_int, default=8,
                    help="requests answered together (and the most answers one request may ask for)")
    args = ap.parse_args(argv)
    from llmexp.env import configure_environment

    configure_environment(offline=True)
    try:
        from llmexp.record import RunDir, model_dir_of, run_of_model
        from llmexp.serving.api import ServedModel

        model_dir = model_dir_of(args.target)
        target, run = Path(args.target), run_of_model(model_dir)
        if run is not None and run.model == model_dir:
            target = run.path  # <run>/model is served as its run: its name, prompts and feedback/
        from llmexp.models.tokenizer import holds_no_tokenizer, no_tokenizer_error

        if holds_no_tokenizer(model_dir):  # found by the inference worker: two tracebacks, after the banner
            raise no_tokenizer_error(model_dir, "run")
        defaults = run_defaults(target if run is None else run.path)  # a checkpoint's export: its run's settings
        if run is not None and run.model != model_dir and defaults["run_name"]:
            defaults["run_name"] = f"{defaults['run_name']}-{model_dir.name}"  # e.g. sft-llama-step-400
        if defaults["stage"] == "pretrain":  # it continues text; the chat API wrapped it in role headers
            raise UserError(f"{args.target}: a stage=pretrain run's model continues text, and llmexp serve asks "
                            f"through the chat template (its answers were not generate's); continue text with "
                            f"python -m llmexp.generate {args.target} \"<text>\", or serve a model trained on "
                            f"chat (stage=sft model.pretrained={model_dir})")
        check_address(args.host, args.port)
        prompts = load_prompts(args.prompts, defaults["bundled_skill"])
        is_run = RunDir(target).model == model_dir
        feedback_dir = Path(args.feedback) if args.feedback else (target / "feedback" if is_run else Path("feedback"))
        check_feedback_dir(feedback_dir, "--feedback" if args.feedback else "the feedback directory")
        name = defaults["run_name"] or (target.name if not is_run else target.parent.name)
        served = ServedModel(str(model_dir.resolve()), name, defaults["max_new_tokens"], defaults["temperature"],
                             max(2, args.max_batch_size), args.api_key or None)
    except UserError as e:
        return report(e)
    from rich.console import Console

    url = f"http://{'127.0.0.1' if args.host != '::' else '[::1]'}:{args.port}"
    Console(stderr=True, soft_wrap=True).print(
        f"serving [bold]{name}[/] ({model_dir}) at {url}\n"
        f"  OpenAI API: {url}/v1 (chat/completions, models){' - API key required' if served.api_key else ''}\n"
        f"  feedback page: {url}/  -> judgements in {feedback_dir.resolve()}\n"
        f"  {len(prompts)} prompt(s) on the page; Ctrl+C stops", highlight=False)
    if args.host != "127.0.0.1" and not served.api_key:
        Console(stderr=True).print("[yellow]warning[/]: listening beyond this machine without --api-key")
    server = build_server(served, prompts, feedback_dir.resolve())
    signal.signal(signal.SIGTERM, stop_as_on_ctrl_c(os.getpid()))
    server.run(host=args.host, port=args.port, log_level="warning", generate_client_file=False)
    return 0


def stop_as_on_ctrl_c(main_pid: int):
    """The SIGTERM handler: (kill, systemd, docker stop) stops the server as Ctrl+C does, and
    LitServe then ends its inference and HTTP workers, which the signal's default action left
    running, still answering. The workers, forked with the handler, end as SIGTERM ends a process
    (a KeyboardInterrupt there printed a traceback from each)."""

    def handler(signum, frame) -> None:
        if os.getpid() != main_pid:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise KeyboardInterrupt

    return handler


if __name__ == "__main__":
    sys.exit(main())
