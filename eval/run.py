"""Evaluate a model on the paper's benchmarks (and POPE), with or without describe-and-respond.

    accelerate launch eval/run.py --recipe recipes/X.yaml --model base|stage1|stage2|PATH [--dar]
                                  [--benchmarks pope scienceqa ...] [eval.key=value ...]

The command line is `stic eval`'s (stic/cli.py: eval_parser); `--help` describes it. See stic/evaluate.py for
what is written where.
"""

import sys

from stic.cli import close_process_group, eval_parser, parse_eval_args, run_eval_command
from stic.errors import SticError, one_line
from stic.evaluate import run_eval


def main(argv=None) -> int:
    args = parse_eval_args(eval_parser(), sys.argv[1:] if argv is None else list(argv))
    try:
        run_eval_command(args, run_eval)
    except (SticError, FileNotFoundError) as err:  # the toolkit's errors: one line, no traceback
        print(f"eval: error: {one_line(err)}", file=sys.stderr)
        return 2
    finally:
        close_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
