"""Optional dependencies: the packages only some options use live in named extras of pyproject.toml."""

import importlib


class MissingExtra(ImportError):
    """An option needs a package the base install leaves out; the message says which extra installs it."""


def require(module: str, extra: str, needed_by: str):
    """`importlib.import_module(module)`, or MissingExtra: `<needed_by> needs <package>: pip install 'sealong[extra]'`."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingExtra(f"{needed_by} needs the package {module.split('.')[0]!r}, which is not installed: "
                           f"pip install 'sealong[{extra}]' ({err})") from err
