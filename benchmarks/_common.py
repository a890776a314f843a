"""What every benchmark script ends with: print its table, write it with provenance, and turn
bad input into one line and exit status 2."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from bench.errors import BenchError


def write_table(args, results: dict, lines: list[str]) -> None:
    from bench.provenance import provenance, write_json_atomic

    print("\n".join(lines))
    write_json_atomic(args.out, {"settings": vars(args), "results": results, "table": lines,
                                 "provenance": provenance(args.device)})
    print(f"-> {args.out}")


def run_script(main: Callable[[], int], script: str) -> None:
    try:
        raise SystemExit(main())
    except (ValueError, BenchError) as exc:  # bad bits / names: one line, not a traceback
        print(f"{Path(script).name}: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
