"""The ``castore`` command starts without loading what it does not need."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from castore_di.cli import _COMMANDS, _load_commands, cli


def test_command_map_names_each_commands_module() -> None:
    _load_commands()
    for name, module in _COMMANDS.items():
        command = cli.commands.get(name)
        assert command is not None, f"_COMMANDS lists {name!r}, which no module registers"
        assert command.callback is not None and command.callback.__module__ == f"castore_di.cli.{module}", name


def test_ls_loads_neither_web_frameworks_nor_other_commands(tmp_path: object) -> None:
    """``castore ls`` as the console script runs it: no fastapi/pydantic, no server, no checker."""
    script = (
        "import sys, json\n"
        "sys.argv = ['castore', '--blob-service-addr', 'memory://', '--directory-service-addr', 'memory://',"
        " 'ls', 'b3:' + 'A' * 43 + '=']\n"
        "from castore_di.cli import main\n"
        "try:\n"
        "    main()\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(json.dumps(sorted(m for m in sys.modules)), file=sys.__stderr__)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "CASTORE_CONFIG"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    modules = set(json.loads(proc.stderr.strip().splitlines()[-1]))
    assert "castore_di.cli.inspect" in modules and "dependency_injector.containers" in modules
    for absent in ("fastapi", "pydantic", "pydantic_settings", "werkzeug", "castore_di.cli.serve",
                   "castore_di.cli.check", "castore_di.server", "grpc"):
        assert absent not in modules, absent
