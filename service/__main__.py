"""`python -m service`: run the VisionChat server."""

from __future__ import annotations

import sys

from .config import config_table, parse_config
from .logs import configure_logging
from .model import CheckpointError, ModelConfigError


def main() -> int:
    config, args = parse_config()
    if args.print_config_table:
        print(config_table())
        return 0
    configure_logging(config.log_format, config.log_level)
    from .server import main_async

    try:
        return main_async(config)
    except (CheckpointError, ModelConfigError, ValueError) as exc:
        print(f"visionchat: cannot start: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
