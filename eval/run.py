"""Evaluate a model on the paper's benchmarks (and POPE), with or without describe-and-respond.

    accelerate launch eval/run.py --recipe recipes/X.yaml --model base|stage1|stage2|PATH [--dar]
                                  [--benchmarks pope scienceqa ...] [eval.key=value ...]

--benchmarks takes names separated by spaces or commas; a key=value word is always an override, also right
after the names (`make eval EVAL_ARGS="--benchmarks pope" ARGS="eval.limit=50"` puts it there).
See stic/evaluate.py for what is written where.
"""

import argparse
import sys

from stic.benchmarks import BENCHMARKS
from stic.config import load_recipe_dict
from stic.errors import SticError, one_line
from stic.evaluate import parse_recipe, run_eval


class BenchmarkNames(argparse.Action):
    """--benchmarks a b / a,b. nargs='+' also takes the overrides that follow the names: those go back to the
    overrides instead of being read as benchmark names."""

    def __call__(self, parser, namespace, values, option_string=None):
        names = [n for v in values if "=" not in v for n in v.split(",") if n]
        if not names:
            parser.error(f"{option_string}: no benchmark name given")
        setattr(namespace, self.dest, (getattr(namespace, self.dest) or []) + names)
        namespace.benchmark_overrides = namespace.benchmark_overrides + [v for v in values if "=" in v]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", required=True)
    ap.add_argument("--model", default="base", help="base, stage1, stage2, an adapter folder or a model folder")
    ap.add_argument("--dar", action="store_true", help="describe the image first, then answer with it infused")
    ap.add_argument("--benchmarks", nargs="+", action=BenchmarkNames, metavar="NAME",
                    help=f"default: the recipe's eval.benchmarks; known: {', '.join(BENCHMARKS)}")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. eval.limit=50")
    ap.set_defaults(benchmark_overrides=[])
    args = ap.parse_intermixed_args(argv)
    # in command-line order, so the last of two overrides of one key wins
    overrides = sorted(args.overrides + args.benchmark_overrides,
                       key=lambda word: argv.index(word) if word in argv else len(argv))
    try:
        unknown = [b for b in args.benchmarks or [] if b not in BENCHMARKS]
        if unknown:
            raise SticError(f"unknown benchmark{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                            f"known: {', '.join(BENCHMARKS)}")
        recipe = parse_recipe(load_recipe_dict(args.recipe, overrides, default_section="eval"))
        run_eval(recipe, args.model, args.dar, args.benchmarks)
    except (SticError, FileNotFoundError) as err:  # the toolkit's errors: one line, no traceback
        print(f"eval: error: {one_line(err)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
