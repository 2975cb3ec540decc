"""`cifar-job`: train, check-config, fetch-data, evaluate, submit.

Errors the user can act on print one line naming what is wrong and exit with
the contract's code (2 config, 3 data, 4 storage, 5 diverged, 75 preempted);
`--debug` adds the traceback. Everything printed here passes through
common/redact.py: a presigned data URL or an endpoint's password, quoted in a
config or an error, is a credential.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

from common.redact import redact
from job.errors import JobError, Preempted


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
    check = sub.add_parser("check-config", parents=[with_config],
                           help="print the resolved config, or why it is invalid")
    check.add_argument("--explain", action="store_true",
                       help="print every key with its resolved value, type, default and meaning")
    fetch = sub.add_parser("fetch-data", parents=[with_config],
                           help="download, verify, cache and parse the config's data as train would; print a summary")
    fetch.add_argument("--to", metavar="URI",
                       help="also store the archive at this local path or s3://bucket/key, unless it already "
                            "holds an object (then nothing is downloaded)")
    ev = sub.add_parser("evaluate", parents=[with_config], help="score an exported model on the test split")
    ev.add_argument("--model", required=True, metavar="URI",
                    help="a version directory, or <export.uri>/<model_name> for its highest version")

    submit = sub.add_parser("submit", help="submit a training run to a cloud batch service")
    targets = submit.add_subparsers(dest="target", required=True)
    batch = targets.add_parser("aws-batch", parents=[with_config],
                               help="register an AWS Batch job definition and submit the job (boto3's settings)")
    batch.add_argument("--job-queue", required=True, metavar="QUEUE", help="job queue name or ARN")
    batch.add_argument("--image", required=True, metavar="IMAGE", help="the training image (entrypoint cifar-job)")
    batch.add_argument("--job-name", metavar="NAME", help="default: <export.model_name>-<UTC time>")
    batch.add_argument("--job-role-arn", metavar="ARN", help="IAM role the container runs as (S3 access)")
    batch.add_argument("--gpus", type=int, default=1, help="GPUs per attempt; 0 for CPU only (default 1)")
    batch.add_argument("--vcpus", type=int, default=4, help="vCPUs per attempt (default 4)")
    batch.add_argument("--memory", type=int, default=16384, metavar="MIB", help="memory in MiB (default 16384)")
    batch.add_argument("--nodes", type=int, default=1,
                       help="machines; more than 1 submits a multi-node parallel job that trains with "
                            "MultiWorkerMirroredStrategy (default 1)")
    batch.add_argument("--attempts", type=int, default=5, help="attempts, 1-10 (default 5)")
    batch.add_argument("--timeout-hours", type=float, default=24.0, metavar="HOURS",
                       help="limit per attempt (default 24)")
    batch.add_argument("--dry-run", action="store_true",
                       help="print the job definition and submit request as JSON; send nothing")
    return parser


def _print_redacted(kind, value, tb) -> None:
    """sys.excepthook for a crash that is no JobError: its traceback, redacted like every other line."""
    print(redact("".join(traceback.format_exception(kind, value, tb))), end="", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    sys.excepthook = _print_redacted
    if not args.debug and args.command in ("train", "evaluate"):
        from common.tfquiet import import_tensorflow_quietly

        import_tensorflow_quietly()
    from job.platform import write_failure

    try:
        return _dispatch(args)
    except JobError as exc:
        if args.debug:
            print(redact(traceback.format_exc()), end="", file=sys.stderr)
        print(f"cifar-job: error: {redact(str(exc))}", file=sys.stderr)
        if not isinstance(exc, Preempted):
            # Under SageMaker, the job's FailureReason; elsewhere nothing.
            # Preemption is no failure: the job is meant to be retried.
            write_failure(redact(str(exc)))
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        write_failure(redact(f"{type(exc).__name__}: {exc}"))
        raise


def _dispatch(args) -> int:
    from job.config import load_config
    from job.report import Console

    if args.command == "submit":
        return _submit(args)
    cfg = load_config(args.config, args.overrides)
    console = Console(args.log_format)
    if args.command == "check-config":
        if args.explain:
            from job.config_doc import explain

            print(redact(explain(cfg)), end="")
        else:
            print(cfg.dump(), end="")
        return 0
    if args.command == "fetch-data":
        from job import fetch

        summary = fetch.fetch(cfg, Console(args.log_format, stream=sys.stderr), args.to)
        if summary is not None:
            print(redact(json.dumps(summary)))
        return 0
    if args.command == "train":
        from job import controller
        from job.platform import detect

        platform = detect(os.environ)
        if platform:
            console.info(f"platform: {platform} (its container conventions set the config's locations)")
        console.info("resolved config:\n" + cfg.dump().rstrip(), config=cfg.model_dump(mode="json"))
        controller.run(cfg, console)
        return 0
    from job import evaluate

    print(redact(json.dumps(evaluate.evaluate(args.model, cfg))))
    return 0


def _submit(args) -> int:
    from job import submit
    from job.config import load_config

    # Resolved here for the container, so this machine's platform (if any) stays out of it.
    cfg = load_config(args.config, args.overrides, platform=False)
    opts = submit.BatchOptions(
        job_queue=args.job_queue, image=args.image, job_name=args.job_name, gpus=args.gpus, vcpus=args.vcpus,
        memory=args.memory, attempts=args.attempts, timeout_hours=args.timeout_hours,
        job_role_arn=args.job_role_arn, nodes=args.nodes,
    )
    opts.check()
    for warning in submit.warnings(cfg):
        print(f"cifar-job: warning: {redact(warning)}", file=sys.stderr)
    # Only what is shown is redacted: the job submitted gets the config's real values.
    if args.dry_run:
        print(redact(json.dumps(submit.dry_run(cfg, opts), indent=2)))
        return 0
    print(redact(json.dumps(submit.submit(cfg, opts))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
