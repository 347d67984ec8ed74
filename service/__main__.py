"""`visionchat-server` / `python -m service`: run the VisionChat server.

Flags are parsed and checked before anything heavy is imported, so `--help` and configuration
errors answer at once; torch and transformers load only for a server that will start."""

from __future__ import annotations

import sys

from .config import config_table, parse_config
from .logs import configure_logging


def main() -> int:
    config, args = parse_config()
    if args.print_config_table:
        print(config_table())
        return 0
    if args.hash_token is not None:  # a line of --auth-token-file, less its tenant
        from .security.tokens import hash_token

        print(hash_token(args.hash_token))
        return 0
    configure_logging(config.log_format, config.log_level)
    from .server import main_async

    try:
        return main_async(config)
    except ValueError as exc:  # a bad model folder, device, dtype or address: one line, no traceback
        print(f"visionchat-server: cannot start: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
