"""Collect English text from the running Python's standard library: docstrings and pydoc topics.

Run as a script in a fresh interpreter (`python -I -S stdlib_text.py OUT.json`) so that importing
hundreds of modules neither pollutes nor slows the caller, and so that nothing from site-packages
(setuptools' distutils shim, for one) leaks in: the text then depends only on the Python build.
Deliberately free of project imports.
"""

import contextlib
import inspect
import io
import json
import os
import pkgutil
import sys
import sysconfig
import warnings

# Modules whose import opens windows or browsers, prints, writes caches, or runs code.
SKIP_TOP_LEVEL = frozenset({
    "antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test", "lib2to3",
    "distutils", "readline", "ensurepip", "venv", "pydoc_data", "__main__", "__phello__",
    "_tkinter", "curses", "_curses", "_curses_panel", "msilib", "winreg", "winsound", "_winapi",
    "msvcrt", "nt", "_msi", "_overlapped", "_wmi", "xxsubtype", "xxlimited", "xxlimited_35",
    "_xxsubinterpreters", "_xxtestfuzz", "_testcapi", "_testinternalcapi", "_testbuffer",
    "_testimportmultiple", "_testmultiphase", "_testclinic", "_ctypes_test", "_testsinglephase",
})
SKIP_PARTS = frozenset({"test", "tests", "idle_test", "__main__", "_test"})


def _stdlib_dirs():
    paths = sysconfig.get_paths()
    return tuple(os.path.realpath(paths[k]) for k in ("stdlib", "platstdlib"))


def _is_stdlib(module, dirs) -> bool:
    path = getattr(module, "__file__", None)
    return path is None or os.path.realpath(path).startswith(dirs)


def _quiet_import(name):
    sink = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        warnings.simplefilter("ignore")
        try:
            __import__(name)
            return sys.modules[name]
        except BaseException:  # noqa: BLE001 (SystemExit, ImportError, OSError, ... all mean skip)
            return None


def _module_names():
    """Sorted public stdlib module names, packages expanded to their submodules."""
    out = []
    dirs = _stdlib_dirs()
    for top in sorted(sys.stdlib_module_names):
        if top in SKIP_TOP_LEVEL:
            continue
        module = _quiet_import(top)
        if module is None or not _is_stdlib(module, dirs):
            continue
        out.append(top)
        if hasattr(module, "__path__"):
            for info in pkgutil.walk_packages(module.__path__, top + ".", onerror=lambda _: None):
                if not SKIP_PARTS.intersection(info.name.split(".")):
                    out.append(info.name)
    return sorted(set(out))


def _doc(obj):
    doc = obj.__doc__ if isinstance(getattr(obj, "__doc__", None), str) else None
    return inspect.cleandoc(doc) if doc else None


def _module_docs(name, dirs):
    """[group, qualified name, docstring] for a module and the classes, functions, methods it defines.

    The group is the module for its own and its functions' docstrings, the class for a class and its
    methods: the builder makes one document per group.
    """
    module = _quiet_import(name)
    if module is None or not _is_stdlib(module, dirs):
        return []
    found = [(name, name, _doc(module))]
    for attr in sorted(vars(module)):
        if attr.startswith("__"):
            continue
        obj = vars(module)[attr]
        if getattr(obj, "__module__", None) != name or not (inspect.isclass(obj) or callable(obj)):
            continue
        qual = f"{name}.{attr}"
        found.append((qual if inspect.isclass(obj) else name, qual, _doc(obj)))
        if inspect.isclass(obj):
            for meth in sorted(vars(obj)):
                if meth.startswith("__") and meth != "__init__":
                    continue
                member = vars(obj)[meth]
                if isinstance(member, (staticmethod, classmethod)):
                    member = member.__func__
                if inspect.isroutine(member) or isinstance(member, property):
                    found.append((qual, f"{qual}.{meth}", _doc(member)))
    return [list(entry) for entry in found if entry[2]]


def collect():
    """{"modules": [[module, [[group, qualname, doc], ...]], ...], "topics": [[topic, text], ...]}."""
    warnings.simplefilter("ignore")
    dirs = _stdlib_dirs()
    modules = []
    for name in _module_names():
        docs = _module_docs(name, dirs)
        if docs:
            modules.append([name, docs])
    topics_module = _quiet_import("pydoc_data.topics")
    topics = sorted(topics_module.topics.items()) if topics_module is not None else []
    return {"python": sys.version, "modules": modules, "topics": [list(t) for t in topics]}


if __name__ == "__main__":
    result = collect()
    with open(sys.argv[1], "w", encoding="utf-8", errors="surrogatepass") as f:
        json.dump(result, f, ensure_ascii=True)
    os._exit(0)  # skip interpreter teardown: imported modules may hang in atexit hooks
