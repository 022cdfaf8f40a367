"""Evaluate a model on the paper's benchmarks (and POPE), with or without describe-and-respond.

    accelerate launch eval/run.py --recipe recipes/X.yaml --model base|stage1|stage2|PATH [--dar]
                                  [--benchmarks pope scienceqa ...] [eval.key=value ...]

See stic/evaluate.py for what is written where.
"""

import argparse
import sys

from stic.config import RecipeError, load_recipe_dict
from stic.evaluate import parse_recipe, run_eval


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", required=True)
    ap.add_argument("--model", default="base", help="base, stage1, stage2, an adapter folder or a model folder")
    ap.add_argument("--dar", action="store_true", help="describe the image first, then answer with it infused")
    ap.add_argument("--benchmarks", nargs="+", help="default: the recipe's eval.benchmarks")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. eval.limit=50")
    args = ap.parse_args(argv)
    from stic.benchmarks import BenchmarkFileError

    try:
        recipe = parse_recipe(load_recipe_dict(args.recipe, args.overrides, default_section="eval"))
        run_eval(recipe, args.model, args.dar, args.benchmarks)
    except (RecipeError, BenchmarkFileError, FileNotFoundError) as err:
        print(f"eval: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
