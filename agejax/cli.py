"""What the agejax command-line tools share: a user error is one `error: ...` line on stderr, not a traceback."""

import sys
from collections.abc import Callable

from agejax.errors import AgejaxError


def run_command(action: Callable[[], str], errors: tuple[type[Exception], ...] = (AgejaxError,),
                status: int = 1) -> int:
  """Runs `action`; prints the line it returns and gives 0, or prints `error: <message>` on stderr and gives
  `status` when it raises one of `errors` (anything else propagates)."""
  try:
    message = action()
  except errors as e:
    print(f"error: {e}", file=sys.stderr)
    return status
  print(message)
  return 0
