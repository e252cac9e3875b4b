"""
The command line and config files of every script, nanoGPT's way: a script's settings are its lowercase module
constants, and `--name=value` flags and config files of `name = value` lines rewrite them.

    settings, sources = parse_command_line(sys.argv[1:], settings_of(globals()), __doc__, __file__)

Every script reads its command line alike: --name=value or --name value, typed like the default; a bare --name
sets a boolean; --help prints each setting with the comment beside it in the script; anything bad is one UserError.
"""

import ast
import difflib
import math
import os
import re
import sys

from common import UserError


def settings_of(namespace):
    """A script's settings: its lowercase module constants of a plain type, in the order they are written."""
    return {name: value for name, value in namespace.items() if name.islower() and not name.startswith("_")
            and isinstance(value, (bool, int, float, str, list, type(None)))}


def parse_command_line(argv, defaults, doc, source, positional=None, aliases=None, auto=(), config_files=False):
    """(settings, sources): the defaults updated from argv, and where each setting that argv changed came
    from: the config file that set it ('config/shakespeare.py'), or its flag ('--max_steps').

    A list setting takes the values up to the next --name. positional, if given, names the list setting that
    words without a -- go to; aliases maps short flags to settings ({"-o": "output"}). With config_files, a word
    without a -- is a config file (read_config_file), applied in order before every flag, wherever it stands.
    The settings named in auto also take the word auto (--batch_size=auto), for the script to resolve."""
    given, from_files, args = {}, {}, list(argv)
    while args:
        arg = args.pop(0)
        arg = "--" + aliases[arg] if arg in (aliases or {}) else arg
        if arg in ("-h", "--help"):
            print(help_text(defaults, doc, source), flush=True)
            sys.exit(0)
        if not arg.startswith("--"):
            if config_files and (arg.endswith(".py") or os.path.isfile(arg)):
                from_files.update({name: (value, arg) for name, value in read_config_file(arg, defaults, auto).items()})
                continue
            if positional is None:
                config = ", or name a config file (config/NAME.py)" if config_files else ""
                raise UserError(f"cannot read '{arg}': write settings as --name=value or --name value{config} "
                                f"(see --help)")
            given.setdefault(positional, []).append(arg)
            continue
        name, eq, text = arg[2:].partition("=")
        if name not in defaults:
            close = difflib.get_close_matches(name, defaults, n=1)
            hint = f"; did you mean --{close[0]}?" if close else "; see --help"
            raise UserError(f"unknown setting --{name}{hint}")
        default = defaults[name]
        if isinstance(default, list) and not eq:
            values = []
            while args and not args[0].startswith("--"):
                values.append(args.pop(0))
            if not values:
                raise UserError(f"--{name} takes one or more values")
            given[name] = given.get(name, []) + values
            continue
        if not eq:
            if isinstance(default, bool) or default is None:
                text = args.pop(0) if args and args[0] in ("True", "False", "None") else "True"  # a bare --flag
            elif not args or args[0].startswith("--"):
                raise UserError(f"--{name} has no value: write --{name}=VALUE or --{name} VALUE")
            else:
                text = args.pop(0)
        given[name] = "auto" if name in auto and text == "auto" else parse_value(name, text, default)
    settings = {**defaults, **{name: value for name, (value, _) in from_files.items()}, **given}
    sources = {**{name: path for name, (_, path) in from_files.items()}, **{name: f"--{name}" for name in given}}
    return settings, sources


def read_config_file(path, defaults, auto=()):
    """{name: value} of a config file: plain Python of `name = value` lines (as nanoGPT's config/*.py), each
    value a literal (a number, a string, True, False, None, a list). It is read, never run: anything else in
    it (an import, a call, arithmetic) is refused with one line naming the file and line."""
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), filename=path)
    except FileNotFoundError:
        raise UserError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"config file {path} cannot be read ({getattr(e, 'strerror', None) or e})") from None
    except SyntaxError as e:
        raise UserError(f"{path}:{e.lineno}: not valid Python ({e.msg})") from None
    settings = {}
    for statement in tree.body:
        where = f"{path}:{statement.lineno}"
        if isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant):
            continue  # a docstring
        if not (isinstance(statement, ast.Assign) and len(statement.targets) == 1
                and isinstance(statement.targets[0], ast.Name)):
            raise UserError(f"{where}: a config file holds only `name = value` lines, each value a literal")
        name = statement.targets[0].id
        if name not in defaults:
            close = difflib.get_close_matches(name, defaults, n=1)
            raise UserError(f"{where}: unknown setting '{name}'" + (f"; did you mean '{close[0]}'?" if close else ""))
        try:
            value = ast.literal_eval(statement.value)
        except ValueError:
            raise UserError(f"{where}: {name} = {ast.unparse(statement.value)}: the value must be a literal "
                            f"(a number, a string, True, False, None or a list), not an expression") from None
        settings[name] = check_type(name, value, defaults[name], where, auto)
    return settings


def check_type(name, value, default, where, auto=()):
    """value, if it has the type of the setting's default (an int is a float too); else one error line."""
    if name in auto and value == "auto":
        return value
    if isinstance(default, bool) or default is None:
        ok = isinstance(value, bool) or (default is None and value is None)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, type(default)) and not (isinstance(value, bool) and not isinstance(default, bool))
    if not ok:
        raise UserError(f"{where}: {name} = {value!r}: it takes {type_name(default)}, like its default {default!r}")
    return value


def type_name(default):
    if isinstance(default, bool) or default is None:
        return "True or False" + (" or None" if default is None else "")
    return {int: "a whole number", float: "a number", str: "a string", list: "a list"}[type(default)]


def parse_value(name, text, default):
    """Convert text to the type of the setting's default. A whole number may be written 1e3 or 10_000."""
    if isinstance(default, bool) or default is None:
        choices = {"True": True, "False": False} | ({"None": None} if default is None else {})
        if text not in choices:
            raise UserError(f"--{name} takes {' or '.join(choices)}, not '{text}'")
        return choices[text]
    if isinstance(default, list):
        return [text]
    try:
        if isinstance(default, int) and re.fullmatch(r"[+-]?\d+(\.\d*)?[eE][+-]?\d+", text):
            number = float(text)
            if number.is_integer():
                return int(number)
        return type(default)(text)
    except ValueError:
        raise UserError(f"--{name} takes {type_name(default)}, not '{text}'") from None


def help_text(defaults, doc, source):
    """The script's docstring, then every setting with its default and the comment beside it in the script.
    A default that holds a space or a comma is quoted, so that it reads as one value."""
    with open(source, encoding="utf-8") as f:
        comments = dict(re.findall(r"^(\w+) = .*?#\s*(.*)$", f.read(), flags=re.M))
    lines = [doc.strip(), "", "settings: --name=value or --name value (a bare --name for a boolean is True)"]
    for name, default in defaults.items():
        shown = " ".join(default) if isinstance(default, list) else default
        shown = repr(shown) if isinstance(shown, str) and (" " in shown or "," in shown) else shown
        lines.append(f"  {'--' + name + '=' + str(shown):<34} {comments.get(name, '')}")
    return "\n".join(lines)


# Ranges a number setting can take: the words of the message, and the test.
RANGES = {">= 1": ("1 or more", lambda v: v >= 1), ">= 0": ("0 or more", lambda v: v >= 0),
          "> 0": ("a number above 0", lambda v: v > 0),
          "[0, 1)": ("a number at least 0 and below 1", lambda v: 0 <= v < 1),
          "(0, 1]": ("a number above 0 and at most 1", lambda v: 0 < v <= 1)}


def check_ranges(settings, ranges):
    """Refuse a setting outside its range ({name: '>= 1', '>= 0', '> 0', '[0, 1)' or '(0, 1]'}) with one line
    that says the range; a number must be finite. The word auto passes: the script resolves it."""
    for name, kind in ranges.items():
        value, (words, test) = settings[name], RANGES[kind]
        if value == "auto":
            continue
        if not math.isfinite(value):
            raise UserError(f"--{name}={value}: it takes a finite number ({words})")
        if not test(value):
            raise UserError(f"--{name}={value}: it takes {words}")
