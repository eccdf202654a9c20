"""The `falconet` command: parse, dispatch to the command's module, turn errors into one line.

Every user error (missing path, not a Falcon checkpoint, bad flag values) prints one
line on stderr and exits 2; the library raises typed errors and only this package prints.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from falconet.cli import access, batch, finetune, generate, models, perplexity, rag, serve, train
from falconet.cli.common import EXIT_USAGE, Parser, UsageError
from falconet.errors import FalconetError

# command -> function(args, out); each module registers its own subcommands.
COMMANDS = {
    "generate": generate.cmd_generate,
    "chat": generate.cmd_chat,
    "serve": serve.cmd_serve,
    "info": models.cmd_info,
    "convert": models.cmd_convert,
    "train": train.cmd_train,
    "finetune": finetune.cmd_finetune,
    "perplexity": perplexity.cmd_perplexity,
    "rag": rag.cmd_rag,
    "batch": batch.cmd_batch,
    "users": access.cmd_users,
    "collections": access.cmd_collections,
    "audit": access.cmd_audit,
}


def build_parser() -> Parser:
    parser = Parser(prog="falconet", description="Run Falcon LLMs on your own machine.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for module in (generate, serve, models, train, finetune, perplexity, access):
        module.add_parsers(sub)
    rag.add_rag_parser(sub, Parser)
    batch.add_batch_parser(sub, Parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    def out(s: str) -> None:
        sys.stdout.write(s)
        sys.stdout.flush()

    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args, out)
    except UsageError as e:
        print(f"falconet: error: {e}", file=sys.stderr)
    except FalconetError as e:
        print(f"falconet: error: {e}", file=sys.stderr)
    except OSError as e:  # the machine's, not the user's: a full disk, a vanished file
        print(f"falconet: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
