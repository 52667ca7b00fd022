"""Prompt files: TXT (one prompt per line) or JSONL (`{"prompt": ..., "group": ..., "attributes": {...}}`).

Blank lines and lines starting with `#` are skipped in both formats. `group` defaults to "all" and
`attributes` to `{}`. A JSONL line may also give `negative` (the prompt's negative prompt: it replaces the empty
unconditional prompt of classifier-free guidance; "" means none) and `control_image` (a ControlNet control image,
a path relative to the prompt file; stored resolved against the file's directory). Any malformed line is an error
that names the file and line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from backend.errors import PromptFileError

DEMO_PROMPTS = Path(__file__).resolve().parents[2] / "data" / "prompts" / "demo.jsonl"


@dataclass(frozen=True)
class PromptRecord:
    prompt: str
    group: str = "all"
    attributes: dict = field(default_factory=dict)
    negative: str | None = None
    """The prompt's own negative prompt (None: the run's, else none)."""
    control_image: str | None = None
    """The prompt's ControlNet control image: a path resolved against the prompt file's directory (None: the run's)."""
    image: str | None = None
    """An image classifier's input image (absolute path; backend/run/images.py): the prompt is then its path relative
    to the dataset and the group its class."""


JSONL_KEYS = ("prompt", "group", "attributes", "negative", "control_image")


def _optional_text(obj: dict, key: str, where: str) -> str | None:
    """obj[key] as a string (None when absent; "" kept), or a one-line error for another type."""
    value = obj.get(key)
    if value is not None and not isinstance(value, str):
        raise PromptFileError(f"{where}: '{key}' must be a string (got {type(value).__name__} {value!r})")
    return value


def _record_from_json(obj, where: str, base_dir: Path | None = None) -> PromptRecord:
    if not isinstance(obj, dict):
        raise PromptFileError(f"{where}: expected a JSON object with a 'prompt' key, got {type(obj).__name__}")
    prompt = obj.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise PromptFileError(f"{where}: 'prompt' must be a non-empty string")
    unknown = set(obj) - set(JSONL_KEYS)
    if unknown:
        keys = ", ".join(sorted(unknown))
        raise PromptFileError(f"{where}: unknown key(s) {keys}; allowed: {', '.join(JSONL_KEYS)}")
    group = obj.get("group", "all")
    attributes = obj.get("attributes", {})
    if not isinstance(group, str) or not group:
        raise PromptFileError(f"{where}: 'group' must be a non-empty string")
    plain = isinstance(attributes, dict) and all(isinstance(v, str | int | float | bool) for v in attributes.values())
    if not plain:
        raise PromptFileError(f"{where}: 'attributes' must be an object of plain values")
    negative = _optional_text(obj, "negative", where)
    control = _optional_text(obj, "control_image", where)
    if control is not None and not control.strip():
        raise PromptFileError(f"{where}: 'control_image' is empty; give an image path relative to the prompt file")
    if control is not None and base_dir is not None:
        control = str(base_dir / control.strip())
    return PromptRecord(prompt.strip(), group, dict(attributes), negative, control)


def load_prompts(path: str | Path) -> list[PromptRecord]:
    """Read a .txt or .jsonl prompt file; raises PromptFileError naming the line of any problem."""
    path = Path(path)
    if not path.is_file():
        raise PromptFileError(f"prompt file {path} not found; give a .txt (one prompt per line) or .jsonl file")
    is_jsonl = path.suffix.lower() in {".jsonl", ".json"}
    records = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise PromptFileError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    for lineno, line in enumerate(lines, start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        where = f"{path}:{lineno}"
        if is_jsonl:
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                msg = f"{where}: not valid JSON ({exc.msg}); each line must be one JSON object"
                raise PromptFileError(msg) from exc
            records.append(_record_from_json(obj, where, path.parent))
        else:
            records.append(PromptRecord(text))
    if not records:
        raise PromptFileError(f"{path} holds no prompts; write one prompt per line")
    return records
