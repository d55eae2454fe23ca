"""An import-linter contract type of our own: no sdepth_ext module imports another one's private names.

``from .convert import _check_drop`` couples two modules through a name that its own module keeps free to
change; the layers contract cannot see it (it sees modules, not names). This contract reads every module's
source (imports inside functions too) and reports each ``from <sdepth_ext module> import _name``: a name with
one leading underscore, imported from another module of the package (``from . import _C``, the compiled
extension, and private *submodules* such as ``families._timm_sd`` are allowed: the module is the unit).
"""

from __future__ import annotations

import ast
import importlib.util

from importlinter import Contract, ContractCheck, fields, output


def _resolve(importer: str, node: ast.ImportFrom, is_package: bool) -> str | None:
    if node.level == 0:
        return node.module
    parts = importer.split(".")
    base = parts if is_package else parts[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


class NoPrivateNamesContract(Contract):
    type_name = "no_private_names"
    allowed = fields.ListField(subfield=fields.StringField(), required=False)  # "module:name" exceptions

    def check(self, graph, verbose: bool) -> ContractCheck:
        root = self.session_options["root_packages"][0] if "root_packages" in self.session_options else \
            self.session_options["root_package"]
        allowed = set(self.allowed or [])
        modules = graph.modules
        violations = []
        for module in sorted(m for m in modules if m == root or m.startswith(root + ".")):
            spec = importlib.util.find_spec(module)
            if spec is None or not spec.origin or not spec.origin.endswith(".py"):
                continue
            with open(spec.origin, encoding="utf-8") as source:
                tree = ast.parse(source.read(), spec.origin)
            is_package = spec.origin.endswith("__init__.py")
            for node in ast.walk(tree):
                if not isinstance(node, ast.ImportFrom):
                    continue
                target = _resolve(module, node, is_package)
                ours = target is not None and (target == root or target.startswith(root + "."))
                if not ours or target == module:
                    continue
                for alias in node.names:
                    name = alias.name
                    if not name.startswith("_") or name.startswith("__") or f"{target}.{name}" in modules:
                        continue
                    if f"{target}:{name}" in allowed:
                        continue
                    violations.append(f"{module}:{node.lineno} imports {name} from {target}")
        if verbose:
            output.verbose_print(verbose, f"{len(violations)} private-name imports found")
        return ContractCheck(kept=not violations, metadata={"violations": violations})

    def render_broken_contract(self, check: ContractCheck) -> None:
        for line in check.metadata["violations"]:
            output.print_error(line)
        output.new_line()
