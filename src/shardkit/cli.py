"""``shardkit``: run recipes, reproduce the table, diff results against it, and the CPU smoke job."""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
from pathlib import Path

from .errors import EXIT_ERROR, EXIT_USAGE, ArgumentParser, UsageError

DESCRIPTION = "Run recipes, reproduce the table, diff results against it, and the CPU smoke job."
RESULTS_ROOT = "results"


# Value checks of the flags, as argparse types: argparse names the flag in the one-line error.
def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be at least 1")
    return value


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r}: must be a finite number")
    return value


def _seconds(text: str) -> float:
    value = _number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a time limit must be more than 0 seconds")
    return value


def _tolerance(text: str) -> float:
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a tolerance cannot be negative")
    return value


def _folder(text: str) -> Path:
    from .spec.paths import folder_problem

    problem = folder_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(f"{text!r}: {problem}")
    return Path(text)


def _tolerance_flags(parser: argparse.ArgumentParser) -> None:
    from .verdict.diff import Tolerances

    defaults = Tolerances()
    parser.add_argument("--memory-tol", type=_tolerance, default=defaults.memory_rel,
                        help="relative tolerance on peak GPU memory (default %(default)s)")
    parser.add_argument("--time-tol", type=_tolerance, default=defaults.time_rel,
                        help="relative tolerance on normalized wall time (default %(default)s)")
    parser.add_argument("--loss-tol", type=_tolerance, default=defaults.loss_abs,
                        help="absolute per-step loss tolerance for tiny CPU rows (default %(default)s)")
    parser.add_argument("--strict", action="store_true",
                        help="also fail on rows better than the reference (the table reproduced as printed)")
    parser.add_argument("--report", type=_folder, default=None,
                        help="write report.md/.csv/.png and verdicts.json here")
    parser.add_argument("--json", action="store_true",
                        help='print the verdicts as JSON ({"verdicts": [...]}, as verdicts.json) instead of a table')


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="shardkit", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("recipes", help="list the recipes and the table row each reproduces")
    sub.add_parser("models", help="list the catalogued models (hub ids), their families and parameter counts")
    sub.add_parser("cards", help="list the GPU cards the planner knows, with their datasheet figures")
    run = sub.add_parser("run", help="run one recipe (extra flags override its values, e.g. --max_steps 10)")
    run.add_argument("recipe")
    run.add_argument("--results", type=_folder, default=RESULTS_ROOT, help="results root (default %(default)s)")
    run.add_argument("--probe", type=_count, default=None, help="measure N steps and project the full run")
    run.add_argument("--timeout", type=_seconds, default=None, help="kill the row after this many seconds")
    run.add_argument("--print-command", action="store_true", help="print the seed-style torchrun command and exit")
    _runner_flags(run)
    repro = sub.add_parser("reproduce", help="run recipes (default: all table rows) on the visible GPUs, then diff")
    repro.add_argument("recipes", nargs="*")
    repro.add_argument("--results", type=_folder, default=RESULTS_ROOT, help="results root (default %(default)s)")
    repro.add_argument("--probe", type=_count, default=None, help="measure N steps per row and project full runs")
    repro.add_argument("--force", action="store_true", help="rerun rows that already have results")
    repro.add_argument("--timeout", type=_seconds, default=None, help="per-row time limit in seconds")
    repro.add_argument("--run-predicted-oom", action="store_true",
                       help="also run rows the planner expects not to fit on these GPUs (skipped by default)")
    _runner_flags(repro)
    _tolerance_flags(repro)
    diff = sub.add_parser("diff", help="compare results with their reference rows")
    diff.add_argument("results", nargs="*", type=Path,
                      help=f"results.json files, or folders searched for them below (default {RESULTS_ROOT})")
    _tolerance_flags(diff)
    smoke = sub.add_parser("smoke", help="the tiny recipes on 2 CPU ranks, diffed against their reference curves")
    smoke.add_argument("--results", type=_folder, default=f"{RESULTS_ROOT}/smoke",
                       help="where the runs and the report go (default %(default)s)")
    smoke.add_argument("--update-reference", action="store_true",
                       help="write these runs as recipes/reference_tiny.json (with provenance)")
    image = sub.add_parser("image", help="make the local base image, fetch wheels, or build the image")
    image.add_argument("action", choices=["base", "wheels", "build"])
    image.add_argument("--flavour", choices=["cuda", "cpu", "period"], default="cuda",
                       help="cuda: today's stack; cpu: the same on a local Debian base; period: the table's 2023 "
                            "stack for A100-class cards (torch 2.0.1, transformers 4.28.1, DeepSpeed 0.9.2)")
    image.add_argument("--tag", default=None, help="image tag (default shardkit:FLAVOUR)")
    image.add_argument("--base", default=None, help="base image (the cpu flavour needs the local base)")
    slurm = sub.add_parser("slurm", help="print a Slurm batch script that runs a recipe on several nodes")
    slurm.add_argument("recipe")
    slurm.add_argument("--nodes", type=_count, required=True)
    slurm.add_argument("--image", default=None, help="run in this container image (pyxis/enroot --container-image)")
    slurm.add_argument("--time", default="48:00:00")
    slurm.add_argument("--partition", default=None)
    slurm.add_argument("--results", default="results")
    _plan_parser(sub)
    sub.add_parser("train", help="python -m shardkit.train (the seed's flags)", add_help=False)
    return parser


def _plan_parser(sub) -> None:
    plan = sub.add_parser("plan", help="predict peak memory per GPU and run time for recipes, or rank what fits "
                                       "for a model by time (docs/planner.md)")
    plan.add_argument("recipes", nargs="*", help="recipe names (shardkit recipes lists them)")
    plan.add_argument("--model", help="rank the configurations of this model that fit by predicted time, e.g. llama-30b")
    plan.add_argument("--gpus", type=int, default=None, help="GPUs (default: the recipe's; needed with --model)")
    plan.add_argument("--gpu-mem", default=None,
                      help="memory per GPU (default: the --gpu card's; GB means GiB, as on an '80GB' card, and so "
                           "does a number without a unit)")
    plan.add_argument("--host-mem", default=None, help="host memory of the node, checked against what offload needs")
    plan.add_argument("--stack", choices=["today", "2023"], default="today",
                      help="today: shardkit's engine (FSDP2); 2023: the table's HF Trainer + torch 2.0 FSDP stack")
    plan.add_argument("--global-batch", type=_count, default=None,
                      help="with --model: sequences per optimizer step, split into micro-batch x accumulation")
    plan.add_argument("--gpu", default="a100",
                      help="the card planned for, its memory and rates (default %(default)s, the table's A100 SXM "
                           "80GB; shardkit cards lists them)")
    plan.add_argument("--link", choices=["nvlink", "pcie"], default=None,
                      help="what the GPUs' collectives run over (default: NVLink where the card has it, else PCIe)")
    plan.add_argument("--calibration", action="store_true",
                      help="every table row: the 2023 prediction against the table's memory and time, with residuals")
    plan.add_argument("--figure", default=None, help="with --calibration: also write the memory figure (PNG)")
    plan.add_argument("--time-figure", default=None, help="with --calibration: also write the time figure (PNG)")
    plan.add_argument("--json", action="store_true", help="one JSON object per prediction (docs/planner.md); with "
                      "--model, every configuration considered, ranked or with the reason it was rejected")
    plan.add_argument("--seq-len", type=_count, default=None,
                      help="tokens per sequence (default: the recipe's, or the model's context)")
    plan.add_argument("--beyond-context", action="store_true",
                      help="plan a --seq-len longer than the model's context (max_position_embeddings)")
    plan.add_argument("--attention", choices=["eager", "sdpa"], default=None,
                      help="with --model: the attention kernel (default: sdpa today where transformers runs the "
                           "model with it, eager in 2023)")
    plan.add_argument("--examples", type=_count, default=6000,
                      help="with --model: sequences in the data set (default %(default)s, the seed's)")
    plan.add_argument("--allocator", choices=["default", "expandable"], default=None,
                      help="the caching allocator's configuration (default: expandable segments on today's stack, "
                           "as the native engine runs; the default allocator in 2023, torch 2.0 has no other)")
    plan.add_argument("--trace", action="store_true",
                      help="also run one rank of the FSDP configuration for real on fake tensors (the fastest "
                           "that fits, with --model) and print its figures beside the analytic ones (needs "
                           "torch and transformers; about 10 s for 8B, 1-2 min for 70B on 2 cores)")


def _runner_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runner", choices=["auto", "native", "docker"], default="auto",
                        help="auto: in a container when the Docker daemon can give it GPUs and the image exists, "
                             "else here")
    parser.add_argument("--docker", dest="runner", action="store_const", const="docker",
                        help="the same as --runner docker")
    parser.add_argument("--image", default="shardkit:cuda", help="image for --runner docker (default %(default)s)")


def _verdicts_out(verdicts, args) -> int:
    from .verdict import diff, report

    if args.json:
        print(json.dumps(report.verdicts_document(verdicts), indent=2))
    else:
        width = max(len(v.recipe) for v in verdicts) if verdicts else 10
        for v in verdicts:
            print(f"{v.recipe:<{width}}  {v.verdict:<24}  {v.reason}")
    if args.report:
        paths = report.write(verdicts, args.report)
        print(f"report: {', '.join(str(p) for p in paths.values())}", file=sys.stderr)
    return diff.exit_code(verdicts, args.strict)


def _tolerances(args):
    from .verdict.diff import Tolerances

    return Tolerances(memory_rel=args.memory_tol, time_rel=args.time_tol, loss_abs=args.loss_tol)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:
        from .train import main as train_main

        return train_main(argv[1:])
    from .orchestration.containers import BuildFailed

    try:
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
        if extra and args.command != "run":
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        code = _dispatch(args, extra)
        sys.stdout.flush()  # inside the try: a reader that left must not surface at interpreter exit
        return code
    except KeyboardInterrupt:
        # The row that was running recorded itself as interrupted, with its steps; nothing else to say.
        print("shardkit: interrupted", file=sys.stderr)
        return 130
    except UsageError as error:
        print(f"shardkit: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except BuildFailed as error:
        print(f"shardkit: error: {error}", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:
        # The reader of stdout left (plan --json | head): stop without a word and with the status of a
        # process ended by SIGPIPE, as CLI tools do; stdout goes nowhere so the final flush cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE


def _dispatch(args, extra: list[str]) -> int:
    from .orchestration import campaign
    from .spec import recipes, reference
    from .verdict import diff

    if args.command == "models":
        print(_models_table())
        return 0
    if args.command == "cards":
        print(_cards_table())
        return 0
    if args.command == "recipes":
        for name in recipes.all_names():
            print(f"{name:<40} {recipes.load_recipe(name).description}")
        return 0
    if args.command == "run":
        recipe = recipes.load_recipe(args.recipe)
        folder = campaign.row_dir(args.results, recipe, args.probe, campaign.row_stack(extra, campaign.period_here()))
        if args.print_command:
            print(f"cd {recipes.RECIPES_DIR} && {recipes.torchrun_command(recipe, str(folder.resolve()))}")
            return 0
        row = campaign.resolve_row(recipe, folder, extra, args.probe, checks_here=False)
        if row.run.config.dry_run:  # what the row would run, and nothing started or written
            from .spec.resolve import dry_run_text

            campaign.check_row(row)
            print(dry_run_text(row.run))
            return 0
        runner = campaign.row_runner(args.runner, args.image, args.results)
        if runner.period != campaign.period_here():  # the image's stack is not this one: its folder
            folder = campaign.row_dir(args.results, recipe, args.probe, campaign.row_stack(extra, runner.period))
            row = campaign.resolve_row(recipe, folder, extra, args.probe, checks_here=False)
        if runner.here:  # what this machine lacks matters only to a row that runs here; a container checks its own
            campaign.check_row(row)
        code = runner(row, args.timeout)
        result = folder / "results.json"
        print(f"results: {result}" if result.is_file() else f"no results in {folder}", file=sys.stderr)
        return code
    if args.command == "reproduce":
        names = args.recipes or list(reference.load_table())
        runner = campaign.row_runner(args.runner, args.image, args.results)
        folders, not_run = campaign.reproduce(names, args.results, args.probe, args.force, args.timeout, [],
                                              runner=runner, run_predicted_oom=args.run_predicted_oom)
        stack = campaign.row_stack([], runner.period)
        found = diff.load_results(list(folders.values()))
        keys = {name: diff.result_key(name, stack) for name in names}
        verdicts = diff.compare(list(keys.values()), found, reference.load_table(), reference.load_tiny(),
                                _tolerances(args), {keys[name]: why for name, why in not_run.items()})
        if args.report is None:
            args.report = campaign.campaign_dir(args.results, args.probe, stack)
        return _verdicts_out(verdicts, args)
    if args.command == "diff":
        paths = args.results or [Path(RESULTS_ROOT)]
        found = diff.load_results(diff.results_files(paths))
        if not found:
            raise UsageError(f"no results.json in or below {', '.join(map(str, paths))}")
        verdicts = diff.compare(list(found), found, reference.load_table(), reference.load_tiny(), _tolerances(args))
        return _verdicts_out(verdicts, args)
    if args.command == "image":
        from .orchestration import containers

        if args.action == "base":
            print(containers.make_local_base())
        elif args.action == "wheels":
            print(containers.fetch_wheels(args.flavour))
        else:
            base = args.base or (containers.LOCAL_BASE if args.flavour == "cpu" else None)
            print(containers.build_image(args.flavour, args.tag, base))
        return 0
    if args.command == "slurm":
        from .orchestration.slurm import batch_script

        print(batch_script(recipes.load_recipe(args.recipe), args.nodes, args.image, args.time, args.partition,
                           args.results), end="")
        return 0
    if args.command == "plan":
        return _plan(args)
    if args.command == "smoke":
        from .orchestration.smoke import smoke

        return smoke(args.results, args.update_reference)
    raise AssertionError(args.command)


def _plan(args) -> int:
    from . import planner
    from .spec import recipes
    from .spec.typed import dump, validate

    card = planner.card_for(args.gpu)
    gpu_memory = planner.parse_size(args.gpu_mem, "--gpu-mem") if args.gpu_mem else card.memory_bytes
    if gpu_memory != card.memory_bytes:
        # Said on stderr, so that --json stays one object per line on stdout.
        print(f"shardkit: planning against --gpu-mem {gpu_memory / 2**30:g} GiB, not the {card.name}'s "
              f"{card.memory_bytes / 2**30:g} GiB; times are the {card.name}'s", file=sys.stderr)
    host_memory = planner.parse_size(args.host_mem, "--host-mem") if args.host_mem else None
    link = args.link or ("nvlink" if card.nvlink_bytes_per_s else "pcie")
    if link == "nvlink" and not card.nvlink_bytes_per_s:
        raise UsageError(f"--link nvlink: the {card.name} has no NVLink among all GPUs of a node; use pcie")
    hardware = planner.Hardware(card, link=link)
    allocator = args.allocator or ("expandable" if args.stack == "today" else "default")
    if args.stack == "2023" and allocator == "expandable":
        raise UsageError("--allocator expandable --stack 2023: torch 2.0's caching allocator has no expandable "
                         "segments")
    if args.calibration:
        rows = planner.calibration()
        if args.figure:
            planner.calibration_figure(rows, args.figure)
        if args.time_figure:
            planner.time_calibration_figure(rows, args.time_figure)
        print(json.dumps(rows, indent=1) if args.json else
              planner.calibration_markdown(rows) + "\n\n" + planner.zero3_lead_markdown(rows) + "\n\n"
              + planner.time_calibration_markdown(rows))
        return 0
    if args.model:
        if args.recipes:
            raise UsageError("give recipes or --model, not both")
        if args.gpus is None:
            raise UsageError("--model needs --gpus")
        found = planner.search(args.model, args.gpus, gpu_memory, args.stack, args.global_batch, host_memory,
                               hardware, args.seq_len, args.attention, args.beyond_context, args.examples,
                               allocator)
        fitting, _ = planner.ranked(found)
        traced = [_traced(args.model, p) for p in _to_trace(fitting or found)] if args.trace else []
        if args.json:
            for rank, p in enumerate(fitting, start=1):
                print(json.dumps({"rank": rank, **p.to_dict(), **_trace_dict(traced, p)}))
            for p in found:
                if p.rejected is not None:
                    print(json.dumps({"rejected": p.rejected, **p.to_dict(), **_trace_dict(traced, p)}))
        else:
            print(planner.render_search(found, args.model, args.gpus, gpu_memory, args.stack))
            for p, t in traced:
                print("\n" + planner.render_trace(p, t))
        return 0
    if not args.recipes:
        raise UsageError("name recipes to plan, or --model MODEL --gpus N")
    for name in args.recipes:
        recipe = recipes.load_recipe(name)
        if args.seq_len:
            recipe = validate(type(recipe), {**dump(recipe), "seq_len": args.seq_len})
        p = planner.predict_recipe(recipe, args.stack, gpu_memory, host_memory, args.gpus, hardware, allocator)
        traced = [_traced(recipe.model, p)] if args.trace else []
        print(json.dumps({**p.to_dict(), **_trace_dict(traced, p)}) if args.json else planner.render(p) + "\n")
        for p, t in traced if not args.json else ():
            print(planner.render_trace(p, t) + "\n")
    return 0


def _models_table() -> str:
    from .spec.architecture import architecture_of
    from .spec.presets import catalogue

    lines = [f"{'model':32} {'family':10} {'params':>8} {'matmul':>8} {'active':>8} {'layers':>6} {'hidden':>6} "
             f"{'heads':>5} {'kv':>3} {'vocab':>7} {'context':>7}  notes"]
    for hub_id, entry in catalogue().items():
        a = architecture_of(entry["config"], hub_id)
        notes = [n for n, on in (("tied", a.tied), ("qkv bias", a.qkv_bias), ("qk norm", a.qk_norm),
                                 (f"{a.experts} experts, {a.experts_per_token} per token", a.moe),
                                 ("eager only", not a.sdpa)) if on]
        notes += [f"aka {alias}" for alias in entry.get("aliases", ())[:1]]
        lines.append(f"{hub_id:32} {entry['family']:10} {a.params / 1e9:7.2f}B {a.matmul_params / 1e9:7.2f}B "
                     f"{a.active_matmul_params / 1e9:7.2f}B {a.layers:6d} {a.hidden:6d} {a.heads:5d} {a.kv_heads:3d} "
                     f"{a.vocab:7d} {a.context:7d}  {', '.join(notes)}")
    lines.append("Any of these by hub id (or the part after the owner), or a local folder with a config.json; "
                 "sources: src/shardkit/spec/data/models.json")
    return "\n".join(lines)


def _cards_table() -> str:
    from .planner.hardware import CATALOGUE

    lines = [f"{'card':16} {'name':22} {'memory':>7} {'bf16 peak':>10} {'matmul':>8} {'HBM':>9} {'NVLink':>9} "
             f"{'PCIe':>8}  aliases"]
    for key, c in CATALOGUE.items():
        nvlink = f"{2 * c.nvlink_bytes_per_s / 1e9:.0f} GB/s" if c.nvlink_bytes_per_s else "none"
        lines.append(f"{key:16} {c.name:22} {c.memory_bytes / 2**30:4.0f} GiB {c.peak_bf16_flops / 1e12:6.0f} TF/s "
                     f"{c.matmul_flops / 1e12:5.0f} TF {c.hbm_bytes_per_s / 1e9:5.0f} GB/s {nvlink:>9} "
                     f"{2 * c.pcie_bytes_per_s / 1e9:3.0f} GB/s  {', '.join(c.aliases)}")
    lines.append("matmul: the achievable dense bf16 rate the time model uses (measured, or a measured card's fraction "
                 "of its peak); sources: src/shardkit/planner/data/cards.json")
    return "\n".join(lines)


def _to_trace(predictions):
    """What a trace can run: FSDP without offload; the first such configuration, or the first at all (whose
    rendering then says why it was not traced)."""
    runnable = [p for p in predictions if p.workload.method == "fsdp" and not p.workload.offload]
    return runnable[:1] or predictions[:1]


def _traced(model: str, p):
    from .planner import trace
    from .spec.presets import ModelSpec, resolve_name

    w = p.workload
    if w.method != "fsdp" or w.offload:
        return p, None
    name, hf_config, _ = resolve_name(model, "--model")
    return p, trace.trace(ModelSpec(name, hf_config, None), w.method, w.gpus, w.micro_batch, w.seq_len, p.stack,
                          w.attention, w.grad_ckpt, w.offload, w.accumulation)


def _trace_dict(traced, p) -> dict:
    for q, t in traced:
        if q is p:
            return {"trace": None if t is None else {
                "allocated_bytes": t.allocated, "reserved_bytes": t.reserved,
                "nvidia_smi_bytes": t.reserved + p.context + p.communicator, "seconds": t.seconds,
                "host_peak_bytes": t.host_peak_bytes}}
    return {}
