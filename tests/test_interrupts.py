"""Ctrl-C and SIGTERM (tandem.interrupts): helper processes do not get Ctrl-C, the main thread
unwinds with ``Interrupted``, and the CLI prints one line and exits 130 / 143. Real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

SIGINT_BIT = 1 << (signal.SIGINT - 1)

CHILD = textwrap.dedent("""
    import multiprocessing, sys, time
    from tandem.interrupts import shield_children
    if sys.argv[2] == "shield":
        shield_children()
        shield_children()  # idempotent
    if __name__ == "__main__":
        p = multiprocessing.get_context(sys.argv[1]).Process(target=time.sleep, args=(60,))
        p.start()
        print(p.pid, flush=True)
        sys.stdin.readline()
        p.kill()
""")


def _blocked(pid: int) -> int:
    """The signal mask of ``pid``'s main thread (Linux /proc)."""
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("SigBlk:"):
            return int(line.split()[1], 16)
    raise AssertionError("no SigBlk line")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/PID/status")
@pytest.mark.parametrize("method", ["spawn", "fork"])
@pytest.mark.parametrize("shield", ["shield", "none"])
def test_shielded_children_start_with_sigint_blocked(tmp_path, method, shield):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    p = subprocess.Popen([sys.executable, str(script), method, shield], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    try:
        child = int(p.stdout.readline())
        assert bool(_blocked(child) & SIGINT_BIT) == (shield == "shield")
        assert not _blocked(p.pid) & SIGINT_BIT, "the parent itself still gets Ctrl-C"
    finally:
        p.communicate("\n", timeout=30)


CLI = textwrap.dedent("""
    import sys, time
    from tandem import cli

    def slow(args):
        print("started", flush=True)
        time.sleep(60)
        return 0

    cli.cmd_report = slow  # build_parser binds the command by this name
    sys.exit(cli.main(["report", "x"]))
""")


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_cli_signal_is_one_line_and_its_exit_code(tmp_path, sig, code):
    """A command interrupted in the middle: ``interrupted``, exit code 128 + signal, no traceback."""
    script = tmp_path / "cli.py"
    script.write_text(CLI)
    p = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "started"
    time.sleep(0.2)
    os.kill(p.pid, sig)
    out, err = p.communicate(timeout=30)
    assert p.returncode == code, err
    assert err.strip().splitlines() == ["interrupted"]
    assert out == ""
