"""Run by `nox -s docs`: the API reference documents exactly the public names, and
every argument a docstring documents exists in the signature, and an `Args:`
section names every argument.

Reads the source statically with griffe (no backend needed), as mkdocstrings does.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import griffe

ROOT = Path(__file__).resolve().parents[1]
PUBLIC_MODULES = [
    "two_tower.losses",
    "two_tower.evaluation",
    "two_tower.baselines",
    "two_tower.defaults",
    "two_tower.saving",
    "two_tower.distribution",
    "two_tower.datasets.movielens",
    "two_tower.datasets.synthetic",
]


def main() -> int:
    package = griffe.load("two_tower", search_paths=[str(ROOT / "src")])
    reference = "\n".join(p.read_text() for p in sorted((ROOT / "docs" / "api").glob("*.md")))
    documented = set(re.findall(r"^::: (\S+)", reference, re.M))
    problems = []
    exported = package.members["__all__"].value
    names = [str(name).strip("'\"") for name in exported.elements]
    for name in names:
        if name.startswith("__"):
            continue
        if f"two_tower.{name}" not in documented:
            problems.append(f"two_tower.{name} (in __all__) is missing from docs/api/")
    for module in PUBLIC_MODULES:
        if module not in documented:
            problems.append(f"{module} is missing from docs/api/")
    for path in sorted(documented):
        try:
            obj = package[path.removeprefix("two_tower.")]
        except KeyError:
            problems.append(f"docs/api/ names {path}, which does not exist")
            continue
        problems += check_arguments(obj)
    for problem in problems:
        print(problem)
    print(f"{len(documented)} documented paths, {len(problems)} problem(s)")
    return 1 if problems else 0


def check_arguments(obj: griffe.Object | griffe.Alias) -> list[str]:
    """`Args:` that differ from the signature (extra or missing), for obj and its members."""
    problems = []
    if obj.is_alias:  # e.g. two_tower.BruteForceIndex: its members are the real ones
        obj = obj.final_target
    targets = [obj]
    if obj.is_module or obj.is_class:
        own = [m for n, m in obj.members.items() if not n.startswith("_") and not m.is_alias]
        targets += [m for m in own if m.is_function or (obj.is_module and m.is_class)]
        for cls in [m for m in own if obj.is_module and m.is_class]:  # and their methods
            targets += [
                m
                for n, m in cls.members.items()
                if not n.startswith("_") and not m.is_alias and m.is_function
            ]
    for target in targets:
        if target.is_alias:
            target = target.final_target
        if target.is_module:
            continue
        function = target
        if target.is_class:
            function = target.members.get("__init__")
            if function is None:
                continue
        docstring = target.docstring
        if docstring is None:
            continue
        parameters = {p.name for p in function.parameters}
        variadic = any(p.kind.value.startswith("variadic") for p in function.parameters)
        named = {p.name for p in function.parameters if not p.kind.value.startswith("variadic")}
        named -= {"self", "cls"}
        for section in docstring.parse("google"):
            if section.kind.value != "parameters":
                continue
            listed = set()
            for parameter in section.value:
                name = parameter.name.lstrip("*")
                listed.add(name)
                if name not in parameters and not (variadic and name in ("args", "kwargs")):
                    problems.append(f"{target.path}: documents `{name}`, not in its signature")
            # An `Args:` section names every argument: a dropped line is caught too.
            for name in sorted(named - listed):
                problems.append(f"{target.path}: has `{name}`, missing from its Args section")
    return problems


if __name__ == "__main__":
    sys.exit(main())
