"""`configbus backup` and `configbus restore`: everything configbus keeps in Kafka, in one
file, and back into a cluster that lost it (configbus/ops/backup.py, docs/backup.md).

Exit codes: 0 done; 1 a backup written whose records do not all verify with the trust
file, or a restore refused (a damaged or newer file, a record that does not verify,
topics that hold other records); 2 a usage error.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, Any, TextIO

from configbus.bus import KafkaBus, KafkaSettings, TopicNames
from configbus.crypto import TrustStore
from configbus.errors import SettingsError
from configbus.options import pick

if TYPE_CHECKING:  # imported where used: the command line loads the publisher only then
    from configbus.ops.backup import Verification

__all__ = ["register"]

_TOPIC_VARIABLES = ("CONFIGBUS_TOPIC_PREFIX", "CONFIGBUS_AUDIT_TOPIC", "CONFIGBUS_STATE_TOPIC")


def register(commands: Any, kafka: argparse.ArgumentParser) -> None:
    reading = argparse.ArgumentParser(add_help=False)
    reading.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="give up reading a topic after (600)",
    )

    backup = commands.add_parser(
        "backup",
        parents=[kafka, reading],
        help="write the tenant topics' latest records, the stream heads and the whole "
        "audit trail to one file",
    )
    backup.add_argument("--output", "-o", required=True, metavar="FILE", help="the backup")
    backup.add_argument(
        "--trust",
        metavar="FILE",
        help="also verify every record (default $CONFIGBUS_TRUST): those that do not are "
        "kept, named, and make the exit status 1",
    )
    backup.set_defaults(func=_backup)

    restore = commands.add_parser(
        "restore",
        parents=[kafka, reading],
        help="load a backup into a cluster that lost its topics",
    )
    restore.add_argument("file", metavar="FILE", help="a file `configbus backup` wrote")
    restore.add_argument(
        "--trust",
        metavar="FILE",
        help="verify every signed record first, and restore nothing if one does not "
        "(default $CONFIGBUS_TRUST)",
    )
    restore.add_argument(
        "--force",
        action="store_true",
        help="also write into topics that hold other records: the backup's records they "
        "lack are added after them; nothing is deleted",
    )
    restore.add_argument(
        "--dry-run", action="store_true", help="check the file and the cluster; write nothing"
    )
    restore.add_argument(
        "--replication-factor",
        type=int,
        metavar="N",
        help="of the topics created (default $CONFIGBUS_REPLICATION_FACTOR, else 1)",
    )
    restore.add_argument(
        "--min-insync-replicas",
        type=int,
        metavar="N",
        help="of the topics created (default $CONFIGBUS_MIN_INSYNC_REPLICAS, else 1)",
    )
    restore.set_defaults(func=_restore)


def _backup(args: argparse.Namespace, out: TextIO) -> int:
    from configbus.cli_bus import run_async
    from configbus.ops.backup import backup

    kafka = KafkaSettings.build(args.bootstrap_servers, client_id="configbus-backup")
    topics = TopicNames.build(args.topic_prefix, args.audit_topic, args.acks_topic)
    trust, trust_file = _trust(args)
    _positive("--timeout", args.timeout)
    folder = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(folder):
        raise SettingsError(f"--output {args.output}: no such directory {folder}")
    result = run_async(
        backup(
            KafkaBus(kafka),
            topics,
            args.output,
            trust=trust,
            source=kafka.bootstrap_servers,
            max_seconds=args.timeout,
        )
    )
    print(result.summary(), file=out)
    skipped = result.header.skipped
    if skipped:
        left = ", ".join(f"{kind} ({n})" for kind, n in sorted(skipped.items()))
        print(f"left out: {left}", file=out)
    return _verified(result.verification, trust_file, out, "the backup keeps them as they are")


def _restore(args: argparse.Namespace, out: TextIO) -> int:
    from configbus.cli_bus import run_async
    from configbus.ops.backup import check_backup, restore

    trust, trust_file = _trust(args)
    _positive("--timeout", args.timeout)
    replicas = pick(args.replication_factor, "CONFIGBUS_REPLICATION_FACTOR", 1, int)
    in_sync = pick(args.min_insync_replicas, "CONFIGBUS_MIN_INSYNC_REPLICAS", 1, int)
    _positive("--replication-factor", replicas)
    _positive("--min-insync-replicas", in_sync)
    kafka = KafkaSettings.build(
        args.bootstrap_servers,
        client_id="configbus-restore",
        replication_factor=replicas,
        min_insync_replicas=in_sync,
    )
    # Topic names given (as options or variables) must be the backup's: a restore writes
    # the topics it backed up, under their names; none given, the backup's are taken.
    named = any((args.topic_prefix, args.audit_topic)) or any(
        os.environ.get(variable) for variable in _TOPIC_VARIABLES
    )
    topics = TopicNames.build(args.topic_prefix, args.audit_topic, args.acks_topic)
    check = check_backup(args.file, trust)  # refused here, before connecting, if damaged
    print(f"checked {args.file}: {check.summary()}", file=out, flush=True)
    if trust is None:
        print(
            "not verified: no --trust (nor $CONFIGBUS_TRUST); the records are restored as "
            "the file holds them",
            file=out,
        )
    elif check.verification.ok:
        print(f"verified with {trust_file}: {check.verification.summary()}", file=out)
    else:
        _verified(check.verification, trust_file, out, "nothing is restored")
        return 1
    result = run_async(
        restore(
            KafkaBus(kafka),
            args.file,
            trust=trust,
            force=args.force,
            dry_run=args.dry_run,
            topics=topics if named else None,
            max_seconds=args.timeout,
            checked=check,
        )
    )
    if result.created:
        verb = "would create" if args.dry_run else "created"
        print(f"{verb} {len(result.created)} topic(s): {', '.join(result.created)}", file=out)
    if not any(result.written.values()):
        print("nothing to restore: the cluster holds every record of the backup", file=out)
        return 0
    print(result.summary(), file=out)
    if not args.dry_run:
        print(
            "next: start the publishers; they recover the versions from what was restored",
            file=out,
        )
    return 0


def _trust(args: argparse.Namespace) -> tuple[TrustStore | None, str]:
    path = pick(args.trust, "CONFIGBUS_TRUST", "", str)
    return (TrustStore.load(path), path) if path else (None, "")


def _positive(option: str, value: float) -> None:
    if value <= 0:
        raise SettingsError(f"{option} {value:g}: must be positive")


def _verified(verification: Verification, trust_file: str, out: TextIO, then: str) -> int:
    """Say what checking the records with the trust file found; 1 when some failed."""
    if not verification.trusted:
        return 0
    if verification.ok:
        print(f"verified with {trust_file}: {verification.summary()}", file=out)
        return 0
    for line in verification.examples:
        print(f"does not verify: {line}", file=sys.stderr)
    print(f"configbus: {trust_file}: {verification.summary()}; {then}", file=sys.stderr)
    return 1
