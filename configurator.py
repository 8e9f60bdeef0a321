"""
The one configurator every script shares (nanoGPT's, hardened).

    python X.py [config/file.py ...] [--key=value ...]

A script's defaults are its module-level globals. Config files are plain Python
assignments; `--key=value` overrides come after them. Unlike nanoGPT, an unknown key
(in a file or on the command line) is an error that names the closest known key,
values keep the type of their default (an int may fill a float), and `=` splits once.
"""
import ast
import difflib
import os
import sys
from types import SimpleNamespace

CONFIG_TYPES = (bool, int, float, str, list, tuple, dict, type(None))


class UserError(Exception):
    """Bad input from the user: printed as one line, exit status 1, no traceback."""


def defaults_from(module_globals):
    """The config defaults of a script: its public module-level values of plain types."""
    return {k: v for k, v in module_globals.items()
            if not k.startswith("_") and isinstance(v, CONFIG_TYPES) and k.islower()}


def _closest(key, known):
    hit = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    return f" (did you mean '{hit[0]}'?)" if hit else ""


def _coerce(key, value, default, where):
    """Give `value` the type of `default`; raise UserError when it cannot have it."""
    if default is None or isinstance(default, dict):
        return value
    want = type(default)
    if want is bool:
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if isinstance(value, bool):
            return value
    elif want is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif want is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif want is str:
        return value if isinstance(value, str) else str(value)
    elif want in (list, tuple) and isinstance(value, (list, tuple)):
        return want(value)
    elif isinstance(value, want):
        return value
    raise UserError(f"{where}: {key}={value!r} should be {want.__name__} (default {default!r})")


def _parse_value(text):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare string such as --init_from=out/run1


def configure(defaults, argv=None):
    """Apply config files then --key=value overrides to `defaults`; returns a namespace."""
    cfg = dict(defaults)
    argv = sys.argv[1:] if argv is None else list(argv)
    for arg in argv:
        if not arg.startswith("--"):
            if not os.path.isfile(arg):
                raise UserError(f"config file {arg} not found (arguments are config files or --key=value)")
            scope = {}
            with open(arg) as f:
                exec(compile(f.read(), arg, "exec"), scope)
            for key, value in scope.items():
                if key.startswith("_") or not isinstance(value, CONFIG_TYPES):
                    continue  # imports, helpers and dunders are not settings
                if key not in cfg:
                    raise UserError(f"{arg}: unknown config key '{key}'{_closest(key, cfg)}")
                cfg[key] = _coerce(key, value, defaults[key], arg)
        else:
            if "=" not in arg:
                raise UserError(f"argument {arg} should be --key=value")
            key, text = arg[2:].split("=", 1)
            if key not in cfg:
                raise UserError(f"unknown config key '{key}'{_closest(key, cfg)}")
            # a string setting keeps its text as typed (--prompt=1,2 is "1,2", not a tuple)
            value = text if isinstance(defaults[key], str) else _parse_value(text)
            cfg[key] = _coerce(key, value, defaults[key], "command line")
    return SimpleNamespace(**cfg)


def print_config(cfg, file=None):
    file = file or sys.stdout   # looked up per call: a caller may have redirected it
    for k, v in sorted(vars(cfg).items()):
        print(f"  {k} = {v!r}", file=file)


def print_help(path, defaults, file=None):
    """--help: every key with its default and its comment, grouped as the script's source groups
    them (its block of defaults, up to the first function or class)."""
    file = file or sys.stdout
    print(f"usage: python {os.path.basename(path)} [config/file.py ...] [--key=value ...]", file=file)
    with open(path) as f:
        lines = f.read().split("\n")
    titles, after_key = [], False
    for line in lines:
        if line.startswith(("def ", "class ", "@")):
            break
        key = line.split("=", 1)[0].strip()
        if "=" in line and not line[:1].isspace() and key in defaults:
            print("".join(t + "\n" for t in titles) + "  --" + line.replace(" = ", "=", 1), file=file)
            titles, after_key = [], True
        elif line.startswith("#"):   # a group's title: printed with the key it heads
            titles, after_key = titles + [line], False
        elif after_key and line.strip().startswith("#"):   # a comment's next line
            print("    " + line, file=file)
        else:
            titles, after_key = [], False


def cli(main):
    """Run `main()`; a UserError becomes one line on stderr and exit status 1; -h / --help prints
    the script's keys."""
    if any(a in ("-h", "--help") for a in sys.argv[1:]):
        return print_help(main.__globals__["__file__"], defaults_from(main.__globals__))
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
