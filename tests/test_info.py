"""``python -m kda_compile info``: which backends can run a standard call here, and why the others cannot."""
import subprocess
import sys

from kda_compile import dispatch
from kda_compile.__main__ import backend_status, main
from kda_compile.reference_backend import run_reference


def _fake(name, supports, supports_forced=None):
    return dispatch.Backend(name=name, supports=supports, supports_forced=supports_forced, run=run_reference)


def test_info_says_per_backend_and_op_whether_it_runs_and_why_not(capsys, monkeypatch):
    dispatch.register_backend(_fake("fake_gpu", lambda call: "needs a fake accelerator"))
    dispatch.register_backend(_fake("fake_decode", lambda call: None if call.op == "recurrent" else "decode only"))
    dispatch.register_backend(_fake("fake_forced", lambda call: "CPU tensors: ask for it",
                                    supports_forced=lambda call: None))
    monkeypatch.setitem(dispatch._UNAVAILABLE, "fake_missing", "kda_compile.fake failed to import: ImportError: x")
    try:
        status = backend_status("cpu")
        assert main(["info", "--device", "cpu"]) == 0
    finally:
        for name in ("fake_gpu", "fake_decode", "fake_forced"):
            dispatch.unregister_backend(name)
    assert status["reference"] == {"chunk": None, "recurrent": None}
    assert status["fake_gpu"] == {"chunk": "needs a fake accelerator", "recurrent": "needs a fake accelerator"}
    assert status["fake_decode"] == {"chunk": "decode only", "recurrent": None}
    assert "runs when asked for with backend='fake_forced'" in status["fake_forced"]["chunk"]
    assert "failed to import: ImportError" in status["fake_missing"]["chunk"]
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert any(line.split() == ["reference", "chunk", "yes"] for line in lines)
    assert any(line.split()[:3] == ["fake_gpu", "chunk", "no:"] and "needs a fake accelerator" in line
               for line in lines)
    assert any(line.split() == ["fake_decode", "recurrent", "yes"] for line in lines)
    assert "(cpu, bfloat16, K = V = 128" in out


def test_info_command_line_on_this_machine():
    """The real backends: each line says yes, or no with a reason."""
    out = subprocess.run([sys.executable, "-m", "kda_compile", "info"], capture_output=True, text=True,
                         check=True).stdout
    rows = [line.split(maxsplit=2) for line in out.splitlines() if line.startswith("  ")]
    assert {row[0] for row in rows} >= set(dispatch.backends())
    for name, op, answer in rows:
        assert op in dispatch.OPS
        assert answer == "yes" or (answer.startswith("no: ") and len(answer) > 6), (name, op, answer)
