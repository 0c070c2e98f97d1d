"""`queuechat-agent` and `python -m queuechat_agent`."""

import sys

from . import cli


def main(argv: list[str] | None = None) -> int:
    """cli.main; the desktop needs textual, which comes with the agent extra (the scriptable mode does not)."""
    try:
        return cli.main(argv)
    except ModuleNotFoundError as e:
        if (e.name or "").partition(".")[0] != "textual":
            raise
        print("queuechat-agent: the desktop needs the agent extra: pip install 'queuechat[agent]'", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
