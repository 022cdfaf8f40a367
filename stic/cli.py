"""The `stic` command: one subcommand per stage plus small tools.

    stic selfgen --recipe recipes/default.yaml [section.key=value ...] [--overwrite]
    stic dpo --recipe recipes/default.yaml [dpo.key=value ...]
    stic infuse-sft --recipe recipes/default.yaml [infuse_sft.key=value ...]
    stic dar --recipe recipes/default.yaml --image IMG --question "..."
    stic eval --recipe recipes/default.yaml --model base|stage1|stage2|PATH [--dar] [--benchmarks ...]
    stic score --benchmark mmvet --predictions RUN/mmvet/predictions.jsonl [--recipe R] [--judge MODEL|mock]
    stic merge --recipe recipes/default.yaml [--adapter DIR] -o OUT
    stic rounds --recipe recipes/default.yaml [--rounds N] [rounds.key=value ...]
    stic tiny-model --family llava -o DIR
    stic corrupt IMG --kind color_jitter -o out.png [--seed N] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

from stic.config import RecipeError, parse_override
from stic.errors import SticError, one_line

EVAL_DESCRIPTION = """Evaluate a model on the paper's benchmarks (and POPE), with or without describe-and-respond.

    accelerate launch eval/run.py --recipe recipes/X.yaml --model base|stage1|stage2|PATH [--dar]
                                  [--benchmarks pope scienceqa ...] [eval.key=value ...]
    stic eval --recipe recipes/X.yaml ...                (the same command line)

--benchmarks takes names separated by spaces or commas; a key=value word is always an override, also right
after the names (`make eval EVAL_ARGS="--benchmarks pope" ARGS="eval.limit=50"` puts it there).
Benchmarks of the recipe's eval.plugins modules (e.g. stic.shapes.benchmarks) are known once the recipe is read.
See stic/evaluate.py for what is written where.
"""


def load_recipe_dict(path, overrides, default_section: str) -> dict:
    """The recipe mapping with its overrides, its unknown keys refused before the stage's heavy imports (from
    stic.recipe_cache's key lists, when present)."""
    from stic.config import load_recipe_dict as load
    from stic.recipe_cache import refuse_unknown

    data = load(path, overrides, default_section=default_section)
    refuse_unknown(data)
    return data


def _selfgen(args) -> int:
    data = load_recipe_dict(args.recipe, args.overrides, default_section="selfgen")
    from stic.selfgen import parse_recipe, run_selfgen

    recipe = parse_recipe(data)
    run_selfgen(recipe, overwrite=args.overwrite)
    return 0


def _dpo(args) -> int:
    data = load_recipe_dict(args.recipe, args.overrides, default_section="dpo")
    from stic.dpo import parse_recipe, run_dpo
    from stic.models import refuse_sharding_without_cuda

    refuse_sharding_without_cuda()  # before the section is built: TrainingArguments sets up DeepSpeed itself
    run_dpo(parse_recipe(data))
    return 0


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _preflight(args) -> int:
    from stic.preflight import FAIL, STAGES, run_checks
    from stic.recipe import parse_recipe

    stages = STAGES if args.stage == "all" else (args.stage,)
    # each stage's section built as its command builds it (a TRL section only for the training stages); rounds for
    # the further pair constructions `stic rounds` makes
    build = {"selfgen": ("selfgen", "rounds"), "dpo": ("selfgen", "dpo"), "infuse-sft": ("infuse_sft",),
             "eval": ("eval",)}
    recipe = parse_recipe(load_recipe_dict(args.recipe, args.overrides, default_section="dpo"),
                          build=tuple(dict.fromkeys(section for stage in stages for section in build[stage])))
    checks = run_checks(recipe, stages, as_json=args.json, device_memory_gib=args.device_memory,
                        model_spec=args.model)
    failed = [c for c in checks if c.status == FAIL]
    for c in failed:  # one line per failed check, naming the fix
        print(f"stic: preflight: {c.stage} {c.name} failed: {c.detail}; fix: {c.fix}", file=sys.stderr)
    return 2 if failed else 0


def _merge(args) -> int:
    data = load_recipe_dict(args.recipe, args.overrides, default_section="dpo")
    from stic.dpo import parse_recipe
    from stic.models import merge_adapter

    recipe = parse_recipe(data)
    adapter = args.adapter or recipe.dpo.output_dir
    out, report = merge_adapter(recipe.model, adapter, args.output, dtype=args.dtype, force=args.force,
                                overwrite=args.overwrite)
    print(f"merged {adapter} into {recipe.model.name_or_path} ({report['dtype']}): {out}")
    return 0


def _rounds(args) -> int:
    data = load_recipe_dict(args.recipe, args.overrides, default_section="rounds")
    from stic.models import refuse_sharding_without_cuda
    from stic.rounds import run_rounds

    refuse_sharding_without_cuda()  # before stage 1's section is built: TrainingArguments sets up DeepSpeed itself
    run_rounds(data, args.rounds)
    return 0


def _infuse_sft(args) -> int:
    data = load_recipe_dict(args.recipe, args.overrides, default_section="infuse_sft")
    from stic.infuse import parse_recipe, run_infuse_sft
    from stic.models import refuse_sharding_without_cuda

    refuse_sharding_without_cuda()  # before the section is built: TrainingArguments sets up DeepSpeed itself
    run_infuse_sft(parse_recipe(data))
    return 0


def _dar(args) -> int:
    data = load_recipe_dict(args.recipe, args.overrides, default_section="infuse_sft")
    import torch

    from stic.generation import BatchGenerator, SamplingConfig
    from stic.images import decode_image
    from stic.infuse import default_dar_adapters, describe_and_respond, parse_recipe, stage1_model_config
    from stic.models import load_for_inference

    recipe = parse_recipe(data)
    adapters = [] if args.base else (args.adapter or default_dar_adapters(recipe))
    if not args.base and not args.adapter:  # stage 2's adapters go on the model it trained on
        recipe.model = stage1_model_config(recipe)
    from stic.serving import make_engine, served_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    engine = make_engine(recipe.generation, served_model(recipe.generation, recipe.model, adapters, job="dar"),
                         recipe.model.system_prompt, lambda: BatchGenerator(
                             *load_for_inference(recipe.model, adapters, device), system_prompt=recipe.model.system_prompt))
    image = decode_image(args.image, max_pixels=2048 * 2048, max_decode_pixels=16384 * 16384)
    cfg = recipe.infuse_sft
    [(description, answer)] = describe_and_respond(
        engine, [image], [args.question],
        keys=[args.image], describe=cfg.describe, template=cfg.template, seed=cfg.seed, answer_sampling=SamplingConfig(max_new_tokens=args.max_new_tokens))
    print(json.dumps({"adapters": adapters, "description": description, "answer": answer.text,
                      "finish_reason": answer.finish_reason}, indent=2))
    return 0


def _score(args) -> int:
    from pathlib import Path

    data = load_recipe_dict(args.recipe, args.overrides, default_section="eval")
    from stic.evaluate import fill_awaiting_entry, load_items, read_predictions, score_predictions
    from stic.judge import JudgeUnavailable, load_judge_rules, make_judge
    from stic.recipe import parse_recipe

    section = data["eval"] = dict(data.get("eval") or {})  # the recipe's eval section, then the options
    section["benchmarks"] = [args.benchmark]
    section["plugins"] = list(section.get("plugins") or []) + args.plugin
    if args.data_root:
        section["data_root"] = args.data_root
    if args.judge:
        section["judge"] = {**(section.get("judge") or {}),
                            **({"mock": True} if args.judge == "mock" else {"model": args.judge})}
    cfg = parse_recipe(data, build=("eval",)).eval
    rules = load_judge_rules(args.benchmark, cfg.source(args.benchmark).rule_file)
    items = load_items(cfg, args.benchmark)
    predictions = read_predictions(args.predictions)
    known = {it.id for it in items}
    predictions = [p for p in predictions if p["question_id"] in known]
    # with a recipe, eval's own judge cache: what an eval run already asked costs nothing again
    cache = Path(cfg.output_dir if args.recipe else Path(args.predictions).parent) / "judge_cache.jsonl"
    scores = score_predictions(args.benchmark, items, predictions, make_judge(cfg.judge, cache), rules)
    if "awaiting_judge" in scores:
        raise JudgeUnavailable(f"{args.benchmark} is scored by an LLM judge: {scores['awaiting_judge']}; set "
                               f"${cfg.judge.base_url_env}, or pass --judge mock for an offline stand-in")
    if scores.get("missing_predictions"):
        print(f"warning: {scores['missing_predictions']} of {len(items)} {args.benchmark} items have no prediction "
              f"in {args.predictions}; scored as FAILED, as the official scorer does", file=sys.stderr)
    updated = fill_awaiting_entry(args.predictions, args.benchmark, scores)
    if updated:
        print(f"{args.benchmark}: judged; {updated} and results.md updated", file=sys.stderr)
    print(json.dumps({k: v for k, v in scores.items() if k != "per_item"}, indent=2))
    return 0


class StageParser(argparse.ArgumentParser):
    """A stage's parser; its --help ends with the recipe keys of `recipe_sections`, built only when help is shown
    (they import the training stages' TRL configs)."""

    recipe_sections: tuple[str, ...] = ()
    late_epilog: Callable[[], str] | None = None  # another epilog built only for --help (its imports are heavy)

    def format_help(self) -> str:
        if self.recipe_sections and not self.epilog:
            from stic.recipe_cache import cached_help

            def render(sections):  # imports TRL: only when the cache lacks this help
                from stic.recipe import recipe_keys_help

                return recipe_keys_help(sections)

            self.epilog = cached_help(list(self.recipe_sections), render)
        elif self.late_epilog and not self.epilog:
            self.epilog = self.late_epilog()
        return super().format_help()


def stage_parser(sub, name: str, sections: tuple[str, ...], **kwargs) -> StageParser:
    p = sub.add_parser(name, formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)
    p.recipe_sections = sections
    return p


class BenchmarkNames(argparse.Action):
    """--benchmarks a b / a,b. nargs='+' also takes the overrides that follow the names: those go back to the
    overrides instead of being read as benchmark names."""

    def __call__(self, parser, namespace, values, option_string=None):
        names = [n for v in values if "=" not in v for n in v.split(",") if n]
        if not names:
            parser.error(f"{option_string}: no benchmark name given")
        setattr(namespace, self.dest, (getattr(namespace, self.dest) or []) + names)
        namespace.benchmark_overrides = namespace.benchmark_overrides + [v for v in values if "=" in v]


def eval_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The command line of eval/run.py and `stic eval`; parse it with `parse_eval_args`."""
    from stic.benchmarks import BENCHMARKS

    ap = StageParser(prog=prog, description=EVAL_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.recipe_sections = ("eval", "model", "generation")
    ap.add_argument("--recipe", required=True)
    ap.add_argument("--model", default="base", help="base, stage1, stage2, an adapter folder or a model folder")
    ap.add_argument("--dar", action="store_true", help="describe the image first, then answer with it infused")
    ap.add_argument("--benchmarks", nargs="+", action=BenchmarkNames, metavar="NAME",
                    help=f"default: the recipe's eval.benchmarks; known: {', '.join(BENCHMARKS)}, and those of "
                         "the recipe's eval.plugins")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. eval.limit=50")
    ap.set_defaults(benchmark_overrides=[])
    return ap


def parse_eval_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Intermixed, so overrides may come anywhere; `overrides` holds them all in command-line order, so the last
    of two overrides of one key wins."""
    args = parser.parse_intermixed_args(argv)
    args.overrides = sorted(args.overrides + args.benchmark_overrides,
                            key=lambda word: argv.index(word) if word in argv else len(argv))
    return args


def run_eval_command(args: argparse.Namespace, run: Callable | None = None) -> None:
    """Read the recipe (importing its eval.plugins), refuse unknown --benchmarks, then evaluate with `run`
    (default stic.evaluate.run_eval; eval/run.py passes its own name for it, which its tests replace)."""
    data = load_recipe_dict(args.recipe, args.overrides, default_section="eval")
    from stic.benchmarks import check_known
    from stic.evaluate import parse_recipe, run_eval

    recipe = parse_recipe(data, args.model, args.dar)
    check_known(args.benchmarks or [])
    (run or run_eval)(recipe, args.model, args.dar, args.benchmarks)


def _eval(args) -> int:
    run_eval_command(args)
    return 0


def _compare(args) -> int:
    from stic.report import compare_runs

    print(compare_runs(args.runs, args.plot))
    if args.plot:
        print(f"chart: {args.plot}")
    return 0


def _shapes(args) -> int:
    from stic.shapes import calibrate, model, world

    if args.shapes_command == "calibrate":
        calibrate.main(args.world, args.base, args.scenes, args.output)
        return 0
    w = world.load_world(args.world)
    if args.shapes_command == "world-hash":
        print(w.digest())
    elif args.shapes_command == "make-data":
        world.make_split(f"{args.output}/train", args.train, seed=args.seed, prefix="train", world=w)
        world.make_split(f"{args.output}/eval/shapesworld", args.heldout, seed=args.seed + 1_000_003, prefix="test",
                         world=w)
        print(f"ShapesWorld ({w.name}, {w.digest()}): {args.train} training scenes in {args.output}/train, "
              f"{args.heldout} held-out scenes in {args.output}/eval/shapesworld")
    else:
        out = model.pretrain(args.output, steps=args.steps, batch_size=args.batch_size, seed=args.seed, world=w)
        print(f"ShapesWorld base model ({w.name}, {w.digest()}) written to {out}")
    return 0


def _tiny_model(args) -> int:
    from stic.tiny import save_tiny_model

    out = save_tiny_model(args.family, args.output, seed=args.seed)
    print(f"tiny {args.family} model written to {out}")
    return 0


def _corrupt(args) -> int:
    from corruptions import corrupt
    from stic.images import decode_image

    settings = {}
    for text in args.set or []:
        path, value = parse_override(text)
        settings[".".join(path)] = value
    image = decode_image(args.image, max_pixels=2048 * 2048, max_decode_pixels=16384 * 16384)
    out, record = corrupt(image, args.kind, seed=args.seed, **settings)
    out.save(args.output)
    print(json.dumps(record))
    return 0


def _corruption_kinds() -> str:
    from corruptions import REGISTRY

    return "corruption kinds: " + ", ".join(sorted(REGISTRY))


def build_parser() -> argparse.ArgumentParser:
    from stic.tiny import FAMILIES

    parser = argparse.ArgumentParser(prog="stic", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=StageParser)

    p = stage_parser(sub, "selfgen", ("selfgen", "model", "generation"), help="build STIC preference pairs from unlabeled images")
    p.add_argument("--recipe", required=True, help="recipe YAML (selfgen uses its model:, generation: and selfgen: sections; all are checked)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete an earlier selfgen output in the folder (only the toolkit's files) and start over")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. selfgen.batch_size=4 model.dtype=float32")
    p.set_defaults(func=_selfgen)

    p = stage_parser(sub, "dpo", ("dpo", "model"), help="stage 1: DPO + SFT regulariser on the self-generated pairs")
    p.add_argument("--recipe", required=True, help="recipe YAML (stage 1 uses its model: and dpo: sections; all are checked)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. dpo.learning_rate=1e-6 dpo.resume=true")
    p.set_defaults(func=_dpo)

    p = stage_parser(sub, "infuse-sft", ("infuse_sft", "model", "generation"), help="stage 2: description-infused fine-tuning")
    p.add_argument("--recipe", required=True, help="recipe YAML (stage 2 uses its model:, generation: and infuse_sft: sections; all are checked)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. infuse_sft.subset.size=100")
    p.set_defaults(func=_infuse_sft)

    p = stage_parser(sub, "preflight", ("dpo", "model"),
                     help="check that stage 1 is wired right on the recipe's data, model and trainer, before a run")
    p.add_argument("--recipe", required=True, help="recipe YAML (its model: and dpo: sections)")
    p.add_argument("--stage", choices=["selfgen", "dpo", "infuse-sft", "eval", "all"], default="dpo",
                   help="the stage to check, or all of them")
    p.add_argument("--model", default="base", help="eval: the model to check (base|stage1|stage2|PATH)")
    p.add_argument("--json", action="store_true", help="print the checks as JSON")
    p.add_argument("--device-memory", type=positive_float, metavar="GIB",
                   help="the memory of one device of the real run, when preflight runs elsewhere (default: this GPU's)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. dpo.max_length=2048")
    p.set_defaults(func=_preflight)

    p = sub.add_parser("dar", help="describe-and-respond: describe the image, then answer with the description")
    p.add_argument("--recipe", required=True, help="recipe whose model: is the base and infuse_sft: the template")
    p.add_argument("--image", required=True)
    p.add_argument("--question", required=True)
    p.add_argument("--adapter", action="append", help="adapter(s) merged in order (default: the stage-2 output)")
    p.add_argument("--base", action="store_true", help="use the base model without adapters")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=_dar)

    p = sub.add_parser("score", help="score a predictions file without a model (judged benchmarks too)")
    p.add_argument("--benchmark", required=True)
    p.add_argument("--predictions", required=True, help="JSONL: {question_id, text, ...} per line")
    p.add_argument("--recipe", help="a recipe whose eval section applies: data_root, plugins, judge, rule files "
                                    "(default: the toolkit's defaults)")
    p.add_argument("--data-root", help="where the benchmark's files live (default: the recipe's eval.data_root, "
                                       "or playground/data/eval)")
    p.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                   help="a module that registers more benchmarks, e.g. stic.shapes.benchmarks (repeatable)")
    p.add_argument("--judge", metavar="MODEL",
                   help="the judge model for llava_bench and mmvet (eval.judge.model); 'mock': the offline mock "
                        "judge, not a real score")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. eval.mmvet.rule_file=mmvet_prompt.txt")
    p.set_defaults(func=_score)

    # listed here for `stic --help`; main() parses an eval command line with eval_parser (see there)
    sub.add_parser("eval", help="evaluate a model on the recipe's benchmarks (as eval/run.py)", add_help=False)

    p = sub.add_parser("compare", help="set several eval runs side by side (markdown table + bar chart)")
    p.add_argument("runs", nargs="+", help="run folders written by eval/run.py")
    p.add_argument("--plot", default="comparison.png", help="bar chart PNG path ('' to skip)")
    p.set_defaults(func=_compare)

    p = sub.add_parser("merge", help="merge a trained adapter into its base model as a standalone folder")
    p.add_argument("--recipe", required=True, help="recipe whose model: is the base")
    p.add_argument("--adapter", help="adapter folder (default: the recipe's dpo.output_dir)")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="stored precision (default: model.dtype, or the checkpoint's own)")
    p.add_argument("--force", action="store_true", help="write it even if the dtype keeps < 99%% of the update")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier merge in the output folder")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=_merge)

    p = stage_parser(sub, "rounds", ("rounds",),
                     help="repeat selfgen, stage 1, eval and merge, each round generating with the last merged model",
                     description="Each round: selfgen with the previous round's merged model (round 1: the base), "
                                 "stage 1, eval of rounds.benchmarks, merge. Resumes at the last finished step; "
                                 "stops early when rounds.metric stops improving. The stages' own recipe keys apply "
                                 "as in their commands (see stic/rounds.py for the layout).")
    p.add_argument("--recipe", required=True, help="recipe YAML (its model:, selfgen:, dpo:, eval: and rounds: sections)")
    p.add_argument("--rounds", type=int, help="rounds at most (default: the recipe's rounds.count)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. rounds.min_improvement=0.01 dpo.max_steps=20")
    p.set_defaults(func=_rounds)

    p = sub.add_parser("shapes", help="ShapesWorld: scenes with ground truth, and its toy VLM")
    shapes = p.add_subparsers(dest="shapes_command", required=True)
    world_help = "world file (default: recipes/shapesworld/world.yaml)"
    q = shapes.add_parser("make-data", help="training scenes (unlabeled use) and held-out scenes with ground truth")
    q.add_argument("--world", help=world_help)
    q.add_argument("-o", "--output", default="data/shapesworld")
    q.add_argument("--train", type=int, default=1000)
    q.add_argument("--heldout", type=int, default=3000)
    q.add_argument("--seed", type=int, default=0)
    q.set_defaults(func=_shapes)
    q = shapes.add_parser("pretrain", help="pretrain the toy VLM from scratch on a CPU")
    q.add_argument("--world", help=world_help)
    q.add_argument("-o", "--output", default="models/shapesworld-base")
    q.add_argument("--steps", type=int, help="default: the world file's pretrain.steps")
    q.add_argument("--batch-size", type=int, help="default: the world file's pretrain.batch_size")
    q.add_argument("--seed", type=int, help="default: the world file's pretrain.seed")
    q.set_defaults(func=_shapes)
    q = shapes.add_parser("calibrate", help="base-model statistics of a world (no STIC run)")
    q.add_argument("--world", help=world_help)
    q.add_argument("--base", help="the base model (default: the world's, pretrained and cached on first use)")
    q.add_argument("--scenes", type=int, default=1000)
    q.add_argument("-o", "--output", help="write the statistics as JSON")
    q.set_defaults(func=_shapes)
    q = shapes.add_parser("world-hash", help="the digest that names a world (and keys its cached base)")
    q.add_argument("--world", help=world_help)
    q.set_defaults(func=_shapes)

    p = sub.add_parser("tiny-model", help="build a tiny random model offline")
    p.add_argument("--family", required=True, choices=FAMILIES)
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_tiny_model)

    # the kinds are listed by `stic corrupt --help` only (the registry imports torchvision); corrupt() refuses an
    # unknown kind in one line
    p = sub.add_parser("corrupt", help="preview one image corruption")
    p.late_epilog = _corruption_kinds
    p.add_argument("image")
    p.add_argument("--kind", required=True, help="a corruption name (see the list below)")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="a corruption setting, e.g. hue=0.1")
    p.set_defaults(func=_corrupt)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["eval"]:
        # eval/run.py's parser: overrides may follow --benchmarks, which needs an intermixed parse, and argparse
        # cannot parse a subcommand's arguments intermixed
        args = parse_eval_args(eval_parser("stic eval"), argv[1:])
        args.func = _eval
    else:
        args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except RecipeError as err:
        print(f"stic: recipe error: {one_line(err)}", file=sys.stderr)
        code = 2
    except (SticError, FileNotFoundError, PermissionError, NotADirectoryError, IsADirectoryError) as err:
        # the toolkit's errors, and folders the user cannot write: one line, no traceback
        print(f"stic: error: {one_line(err)}", file=sys.stderr)
        code = 2
    finally:
        close_process_group()
    sys.exit(code)


def close_process_group() -> None:
    """Destroy the process group a command started (`accelerate launch`), so that its threads end before the
    interpreter does: left to exit, a rank that finished first can abort ("terminate called without an active
    exception") while the main rank still writes its reports."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
