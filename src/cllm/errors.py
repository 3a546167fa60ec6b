"""The one exception type that means "the user asked for something we cannot do"."""

import importlib.util


class CllmError(Exception):
    """A problem with the user's input or environment; the CLI prints it as one line, exit 2."""


def require_extra(extra: str, *modules: str) -> None:
    """Raise a CllmError naming the pip extra to install when one of `modules` is missing."""
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        raise CllmError(f"this needs {', '.join(missing)}, in cllm's '{extra}' extra: pip install 'cllm[{extra}]'")
