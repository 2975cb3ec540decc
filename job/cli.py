"""`cifar-job`: train, check-config, evaluate.

Errors the user can act on print one line naming what is wrong and exit with
the contract's code (2 config, 3 data, 4 storage, 5 diverged, 75 preempted);
`--debug` adds the traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

from job.errors import JobError


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks and TensorFlow's own logs")
    common.add_argument("--log-format", choices=["text", "json"], default="text")

    with_config = argparse.ArgumentParser(add_help=False, parents=[common])
    with_config.add_argument("--config", metavar="FILE", help="YAML config file (defaults apply without one)")
    with_config.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                             help="override a config key, e.g. --set train.epochs=3 (repeatable)")

    parser = argparse.ArgumentParser(prog="cifar-job", description="Train, evaluate and export a CIFAR-10 model.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("train", parents=[with_config], help="train, checkpoint and export")
    sub.add_parser("check-config", parents=[with_config], help="print the resolved config, or why it is invalid")
    ev = sub.add_parser("evaluate", parents=[with_config], help="score an exported model on the test split")
    ev.add_argument("--model", required=True, metavar="URI",
                    help="a version directory, or <export.uri>/<model_name> for its highest version")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not args.debug:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        return _dispatch(args)
    except JobError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"cifar-job: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


def _dispatch(args) -> int:
    from job.config import load_config
    from job.report import Console

    cfg = load_config(args.config, args.overrides)
    console = Console(args.log_format)
    if args.command == "check-config":
        print(cfg.dump(), end="")
        return 0
    if args.command == "train":
        from job import train

        console.info("resolved config:\n" + cfg.dump().rstrip(), config=cfg.model_dump(mode="json"))
        train.run(cfg, console)
        return 0
    from job import evaluate

    print(json.dumps(evaluate.evaluate(args.model, cfg)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
