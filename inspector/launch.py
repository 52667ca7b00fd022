"""Start the inspector: `python cli.py inspect` calls `serve`, which runs `streamlit run inspector/app.py` on
127.0.0.1 and prints how to reach it, including the SSH tunnel command for a remote machine or a cluster node."""

from __future__ import annotations

import getpass
import ipaddress
import os
import socket
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "inspector" / "app.py"
DEFAULT_PORT = 8501


def streamlit_command(runs: str | os.PathLike, port: int = DEFAULT_PORT, address: str = "127.0.0.1") -> list[str]:
    """The command that serves the inspector (run it from the repository, so .streamlit/config.toml applies)."""
    return [sys.executable, "-m", "streamlit", "run", str(APP), "--server.port", str(int(port)),
            "--server.address", address, "--server.headless", "true", "--", "--runs", str(Path(runs).resolve())]


def is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return address == "localhost"


def tunnel_command(port: int = DEFAULT_PORT, host: str | None = None, user: str | None = None,
                   env: dict | None = None) -> str:
    """The ssh command to run on a laptop to browse the inspector served on 127.0.0.1:port of this machine. On a
    Slurm compute node the tunnel jumps through the login host (set DIFFLENS_LOGIN_HOST, else `LOGIN_HOST`)."""
    env = os.environ if env is None else env
    user = user or env.get("USER") or getpass.getuser()
    host = host or socket.getfqdn()
    forward = f"-L {port}:127.0.0.1:{port}"
    node = env.get("SLURMD_NODENAME")
    if node:
        login = env.get("DIFFLENS_LOGIN_HOST") or env.get("SLURM_SUBMIT_HOST") or "LOGIN_HOST"
        return f"ssh -N {forward} -J {user}@{login} {user}@{node}"
    return f"ssh -N {forward} {user}@{host}"


def banner(runs: str | os.PathLike, port: int, address: str, env: dict | None = None) -> str:
    lines = [f"difflens inspector on http://{address}:{port}  (runs: {Path(runs).resolve()})"]
    if is_loopback(address):
        lines += ["from another machine (a laptop), open a tunnel there:",
                  f"    {tunnel_command(port, env=env)}",
                  f"then browse http://localhost:{port}"]
    else:
        lines.append(f"warning: listening on {address}, reachable by anyone who can reach this host (no login); "
                     "prefer the default 127.0.0.1 and an SSH tunnel")
    lines.append("stop with Ctrl-C")
    return "\n".join(lines)


def serve(runs: str | os.PathLike = "runs", port: int = DEFAULT_PORT, address: str = "127.0.0.1") -> int:
    """Print how to reach the inspector, then become the Streamlit server (exec: Ctrl-C and kill reach it
    directly, and no child process is left behind). Returns only on error (2: no runs directory)."""
    if not Path(runs).is_dir():
        print(f"no runs directory {runs}: make a run with `python cli.py run-all`, or pass --runs DIR", file=sys.stderr)
        return 2
    cmd = streamlit_command(runs, port, address)
    print(banner(runs, port, address), flush=True)
    os.chdir(REPO)  # .streamlit/config.toml: headless, file watcher off, usage stats off
    os.execv(cmd[0], cmd)
    return 1  # not reached
