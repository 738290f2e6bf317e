"""Reading the small JSON files of checkpoints, adapters and prepared data (lit_config.json,
tokenizer_config.json, generation_config.json, special_tokens.json, adapter_config.json, ...).

`read_json` turns every way such a file can be broken (not UTF-8, not JSON, a list where an object
belongs) into one ValueError that names the file and says what to do, so a script prints one
`error:` line instead of a decoder's message without a file name, or an AttributeError later on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

_NAMES = {dict: "an object ({...})", list: "a list ([...])", str: "a string", int: "a number", float: "a number",
          bool: "a boolean", type(None): "null"}


def read_json(path: Path | str, expect: type | None = dict, remedy: str = "fix or replace it") -> Any:
    """The document in `path`, which must be of type `expect` (None: any JSON value)."""
    path = Path(path)
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{str(path)!r} is not UTF-8 text (byte {e.start}); {remedy}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{str(path)!r} is not valid JSON ({e}); {remedy}") from None
    if expect is not None and not isinstance(data, expect):
        raise ValueError(f"{str(path)!r} holds {_NAMES.get(type(data), 'a value')}, not {_NAMES.get(expect, expect.__name__)}; {remedy}")
    return data
