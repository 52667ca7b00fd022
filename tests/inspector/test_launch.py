"""inspector/launch.py: the command `python cli.py inspect` runs and the SSH tunnel it prints."""

from __future__ import annotations


def test_launch_command_and_tunnel_hint(tmp_path):
    from inspector import launch

    cmd = launch.streamlit_command(tmp_path, 8600)
    assert cmd[1:4] == ["-m", "streamlit", "run"] and cmd[4].endswith("inspector/app.py")
    assert cmd[cmd.index("--server.address") + 1] == "127.0.0.1"
    assert cmd[-3:] == ["--", "--runs", str(tmp_path.resolve())]
    assert launch.tunnel_command(8600, host="gpu1.example.org", user="ann", env={}) == \
        "ssh -N -L 8600:127.0.0.1:8600 ann@gpu1.example.org"
    slurm = {"SLURMD_NODENAME": "node17", "DIFFLENS_LOGIN_HOST": "login.example.org", "USER": "ann"}
    assert launch.tunnel_command(8600, env=slurm) == "ssh -N -L 8600:127.0.0.1:8600 -J ann@login.example.org ann@node17"
    assert "ssh -N -L 8600" in launch.banner(tmp_path, 8600, "127.0.0.1", env={"USER": "ann"})
    assert "warning" in launch.banner(tmp_path, 8600, "0.0.0.0")
    assert launch.serve(tmp_path / "missing") == 2
