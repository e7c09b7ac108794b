"""``rgemma eval``: lm-evaluation-harness tasks on an rgemma checkpoint.

    rgemma eval --model PATH --tasks hellaswag,piqa --batch-size 16 --output results.json

The model is ``rgemma.evaluation.harness.RgemmaLM``. This module is also
lm-eval's own command line with the model name "rgemma" registered: the
``rgemma-lm-eval`` script, or::

    python -m rgemma.cli.evaluate --model rgemma --model_args pretrained=PATH,dtype=bfloat16 \
        --tasks hellaswag                       # exactly lm_eval's arguments

Both need the optional extra ``pip install 'rgemma[eval]'``.

Offline: the Hub is probed first (a TCP connection within 2.5 s, unless an
``HF_*_OFFLINE`` variable already says so); without it, datasets come only
from the local Hugging Face cache, and a task whose dataset is not there fails
at once with one line naming it.
"""

from __future__ import annotations

import json
import os
import sys

from rgemma.cli.common import (
    CLIError,
    add_model_args,
    load_model,
    report_error,
    resolve_model_path,
)
from rgemma.errors import one_line

# RgemmaLM's defaults (rgemma.evaluation.harness), spelled out here because --help
# imports no torch
DEFAULT_BATCH_SIZE = 16
DEFAULT_CHUNK_SIZE = 512


def register(subparsers) -> None:
    """Adds the ``eval`` verb."""
    # a table of flags, one call each with its continuation lines aligned
    # fmt: off
    p = subparsers.add_parser(
        "eval", help="benchmarks through lm-evaluation-harness",
        description="Runs lm-evaluation-harness tasks on an rgemma checkpoint "
                    "(a thin wrapper around lm_eval.simple_evaluate; needs rgemma[eval]).")
    add_model_args(p)
    p.add_argument("--tasks", "-t", required=True,
                   help="comma-separated lm-eval task or group names")
    p.add_argument("--num-fewshot", "-f", type=int, default=None,
                   help="few-shot examples (default: each task's own)")
    p.add_argument("--limit", "-L", type=float, default=None,
                   help="examples per task (an integer), or a fraction < 1 (for testing)")
    p.add_argument("--batch-size", "-b", default=str(DEFAULT_BATCH_SIZE),
                   help=f"rows per model call (default {DEFAULT_BATCH_SIZE}; 'auto' = default)")
    p.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE,
                   help=f"tokens per model call when prefilling (default {DEFAULT_CHUNK_SIZE})")
    p.add_argument("--no-share-context", action="store_true",
                   help="prefill each request's context separately (slower; for comparison)")
    p.add_argument("--apply-chat-template", action="store_true",
                   help="render prompts with the chat template (for -it models)")
    p.add_argument("--fewshot-as-multiturn", action="store_true",
                   help="with --apply-chat-template: few-shot examples as chat turns")
    p.add_argument("--system-instruction", default=None, help="system text for every prompt")
    p.add_argument("--gen-kwargs", default=None,
                   help="generation overrides, e.g. 'max_gen_toks=64,do_sample=false'")
    p.add_argument("--include-path", action="append", default=[], metavar="DIR",
                   help="extra folder of task YAML files (repeatable)")
    p.add_argument("--no-default-tasks", action="store_true",
                   help="only the tasks of --include-path (skips indexing lm-eval's ~15k tasks)")
    p.add_argument("--confirm-run-unsafe-code", action="store_true",
                   help="allow tasks that execute model-written code (humaneval, mbpp)")
    p.add_argument("--output", "-o", metavar="FILE", help="write the results as JSON")
    p.add_argument("--log-samples", action="store_true",
                   help="keep per-example inputs and outputs in --output")
    p.add_argument("--seed", type=int, default=1234, help="seed for lm-eval and for sampling")
    p.add_argument("--bootstrap-iters", type=int, default=100000,
                   help="bootstrap iterations for standard errors (0 = none)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    # fmt: on
    p.set_defaults(func=run)


def run(args) -> int:
    """``rgemma eval``: lm_eval.simple_evaluate on a loaded checkpoint."""
    try:
        results, make_table = _evaluate(args)
    except CLIError as e:
        return report_error("eval", e)
    _record_model(results, args)
    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    if args.output:
        write_results(results, args.output)
    return 0


def check_args(args) -> list[str]:
    """The task names; CLIError (exit 2) for flags out of range."""
    if args.no_default_tasks and not args.include_path:
        raise CLIError("--no-default-tasks needs --include-path", 2)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise CLIError("--tasks: no task names given", 2)
    if args.limit is not None and not args.limit > 0:
        raise CLIError(f"--limit must be > 0 (a count, or a fraction < 1), got {args.limit}", 2)
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise CLIError(f"--num-fewshot must be >= 0, got {args.num_fewshot}", 2)
    if args.chunk_size < 1:
        raise CLIError(f"--chunk-size must be >= 1, got {args.chunk_size}", 2)
    if args.bootstrap_iters < 0:
        raise CLIError(f"--bootstrap-iters must be >= 0, got {args.bootstrap_iters}", 2)
    if args.batch_size != "auto" and not (args.batch_size.isdigit() and int(args.batch_size)):
        raise CLIError(f"--batch-size must be an integer >= 1 or auto, got {args.batch_size}", 2)
    for folder in args.include_path:
        if not os.path.isdir(folder):
            raise CLIError(f"--include-path {folder}: no such folder", 2)
    return tasks


def _evaluate(args):
    """(lm-eval's results, make_table); CLIError (one line) for whatever goes wrong."""
    task_names = check_args(args)
    simple_evaluate, TaskManager, make_table = _import_lm_eval()
    path = resolve_model_path(args.model)
    if not os.path.exists(path):
        raise CLIError(
            f"model {path!r} not found: pass --model PATH to a checkpoint directory or file"
        )
    from rgemma.evaluation import hub
    from rgemma.evaluation.harness import RgemmaLM

    offline = hub.offline_reason()
    if offline:
        hub.go_offline()  # a dataset missing from the cache fails at once, no retries
    try:
        task_manager = TaskManager(
            include_path=args.include_path or None, include_defaults=not args.no_default_tasks
        )
        tasks = load_tasks(task_manager, task_names, offline)
        model, tokenizer = load_model(args)
        lm = RgemmaLM(
            pretrained=args.model or "demo",
            model=model,
            tokenizer=tokenizer,
            batch_size=args.batch_size,
            chunk_size=args.chunk_size,
            share_context=not args.no_share_context,
            seed=args.seed,
            progress=not args.no_progress,
        )
        results = simple_evaluate(
            model=lm,
            tasks=tasks,
            num_fewshot=args.num_fewshot,
            limit=_parse_limit(args.limit),
            task_manager=task_manager,
            apply_chat_template=args.apply_chat_template,
            fewshot_as_multiturn=args.fewshot_as_multiturn,
            system_instruction=args.system_instruction,
            gen_kwargs=args.gen_kwargs,
            log_samples=args.log_samples,
            bootstrap_iters=args.bootstrap_iters,
            random_seed=args.seed,
            numpy_random_seed=args.seed,
            torch_random_seed=args.seed,
            fewshot_random_seed=args.seed,
            confirm_run_unsafe_code=args.confirm_run_unsafe_code,
        )
    except CLIError:
        raise
    except (KeyError, ValueError) as e:  # lm-eval's bad argument errors
        raise CLIError(f"lm-eval: {e.args[0] if e.args else e}", 2) from None
    except Exception as e:  # anything else lm-eval raises: one line, not a traceback
        raise CLIError(f"lm-eval failed: {type(e).__name__}: {one_line(e)}") from None
    return results, make_table


def load_tasks(task_manager, names: list[str], offline: str | None) -> list:
    """The lm-eval tasks and groups of ``names``, loaded one name at a time so an error
    names its task (datasets are read, or downloaded, here); CLIError otherwise."""
    from rgemma.evaluation import hub

    known = set(task_manager.all_tasks)
    built: list = []
    for name in names:
        if name not in known and not os.path.isfile(name):
            raise CLIError(
                f"--tasks {name}: lm-eval knows no such task, group or tag (lm-eval ls tasks "
                "lists them; --include-path adds a folder of task YAML files)",
                2,
            )
        try:
            loaded = task_manager.load([name])
        except Exception as e:
            if hub.is_network_error(e) or (offline and isinstance(e, OSError)):
                why = offline or "the download failed"
                raise CLIError(
                    f"task {name}: its dataset must be in the local Hugging Face cache, which "
                    f"does not hold it, and the Hub is out of reach ({why}); run once with "
                    f"network to download it ({one_line(e)})"
                ) from None
            raise CLIError(
                f"task {name}: lm-eval cannot load it: {type(e).__name__}: {one_line(e)}"
            ) from None
        built += _top_level(loaded)
    return built


def _top_level(loaded: dict) -> list:
    """The groups and tasks of ``TaskManager.load``'s result that no group holds."""
    children = {c for names in loaded.get("group_map", {}).values() for c in names}
    groups = [g for name, g in loaded.get("groups", {}).items() if name not in children]
    in_groups = {t.task_name for g in groups for t in g.get_all_tasks()}
    tasks = [t for name, t in loaded["tasks"].items() if name not in in_groups]
    return groups + tasks


def _import_lm_eval():
    """(simple_evaluate, TaskManager, make_table), or CLIError saying how to install lm-eval."""
    from rgemma.evaluation import harness  # registers "rgemma" with lm-eval

    if harness.register_model is None:
        raise CLIError(
            f"rgemma eval needs lm-evaluation-harness: {harness.INSTALL_HINT} "
            f"(import failed: {harness.LM_EVAL_IMPORT_ERROR})",
            2,
        )
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import make_table

    return simple_evaluate, TaskManager, make_table


def _parse_limit(limit: float | None) -> int | float | None:
    """--limit: an integer count, or a fraction below 1."""
    if limit is None or limit < 1:
        return limit
    return int(limit)


def _record_model(results: dict, args) -> None:
    """Names the model in results["config"] like ``lm_eval --model rgemma`` would."""
    from rgemma.evaluation.harness import MODEL_NAME

    results["config"]["model"] = MODEL_NAME
    results["config"]["model_args"] = {
        "pretrained": args.model or "demo",
        "dtype": args.dtype or "auto",
        "batch_size": args.batch_size,
        "chunk_size": args.chunk_size,
        "share_context": not args.no_share_context,
    }


def write_results(results: dict, path: str) -> None:
    """lm-eval's results dict as JSON (non-JSON values written as strings)."""
    from lm_eval.utils import handle_non_serializable

    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2, default=handle_non_serializable, ensure_ascii=False)


def lm_eval_main() -> int:
    """lm-eval's own command line (``lm_eval ...`` arguments) with ``rgemma`` registered."""
    from rgemma.evaluation import harness  # registers "rgemma" with lm-eval

    if harness.register_model is None:
        print(
            f"lm-eval cannot be imported ({harness.LM_EVAL_IMPORT_ERROR}): {harness.INSTALL_HINT}",
            file=sys.stderr,
        )
        return 2
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
    return 0


if __name__ == "__main__":  # python -m rgemma.cli.evaluate --model rgemma --model_args ...
    sys.exit(lm_eval_main())
