"""Interrupted quantization resumes (qexport.checkpoint): a run killed during PTQ1.61 learning,
then run again, writes the same model.onnx bytes as an uninterrupted run; Ctrl-C leaves no
output folder and says how to continue.

Kill points (docs/reliability.md): SIGKILL in the middle of a block's optimization, SIGKILL
in the middle of writing a checkpoint (the block's weights written, the resume state not yet
renamed into place), SIGINT (Ctrl-C) and SIGTERM in the middle of a block. The learning itself
is also interrupted in-process (an exception after a block) and resumed, and a work folder of
other inputs is discarded.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from qexport import checkpoint, cli, pipeline
from qexport.config import LearnConfig
from qexport.ptq161 import learn_mixed_weights

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# A subprocess running the CLI with a fault injected at a kill point (argv: point, signal,
# then the CLI's arguments). Steps are counted by wrapping ptq161.block_loss; the first
# checkpoint write of a block is wrapped to die between the block's file and the state.
_DRIVER = r"""
import os, signal, sys
import torch
from qexport import checkpoint, cli, ptq161

point, sig = sys.argv[1], getattr(signal, sys.argv[2])
# Ctrl-C as at a terminal: a job started in the background (CI) inherits SIGINT ignored
signal.signal(signal.SIGINT, signal.default_int_handler)
saved, steps = [], []

def die():
    os.kill(os.getpid(), sig)

if point == "mid-e2e":  # the second end-to-end step after its first checkpoint
    from qexport import e2e
    save, kl = checkpoint.E2ECheckpoint.save, e2e.kl_to_teacher
    def saving(self, state):
        save(self, state)
        saved.append(1)
    def counting_kl(*a, **k):
        if saved:
            steps.append(1)
            if len(steps) == 2:
                die()
        return kl(*a, **k)
    checkpoint.E2ECheckpoint.save, e2e.kl_to_teacher = saving, counting_kl

loss = ptq161.block_loss
def counting_loss(*a, **k):
    if point == "mid-block" and saved:
        steps.append(1)
        if len(steps) == 2:  # the second step of the block after the first checkpoint
            die()
    return loss(*a, **k)
ptq161.block_loss = counting_loss

def write(obj, path):
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    if path.name == checkpoint.STATE and point != "mid-e2e":
        saved.append(1)
        if point == "mid-save" and len(saved) == 2:  # block 1's weights written, not its state
            die()
    os.replace(tmp, path)
checkpoint.BlockCheckpoint._write = staticmethod(write)
sys.exit(cli.main(sys.argv[3:]))
"""


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from tiny_models import tiny_llama

    d = tmp_path_factory.mktemp("tiny") / "llama"
    tiny_llama().save_pretrained(d)
    return d


def _args(model, out, *extra):
    # one thread: the bytes of a run must not depend on how many cores were idle
    return [str(model), "-o", str(out), "--calib-samples", "4", "--calib-seqlen", "32",
            "--preset", "fast", *extra, "--no-perplexity", "--no-kv-cache", "--threads", "1",
            "--quiet"]


@pytest.fixture(scope="module")
def reference(tiny_dir, tmp_path_factory):
    """model.onnx of an uninterrupted run."""
    out = tmp_path_factory.mktemp("ref") / "out"
    assert cli.main(_args(tiny_dir, out)) == 0
    assert not pipeline.work_folder(out).exists()  # removed once the output is written
    return (out / "model.onnx").read_bytes()


def _interrupted(tiny_dir, out, point, sig, *extra):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-c", _DRIVER, point, sig] +
                          _args(tiny_dir, out, *extra),
                          capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.parametrize("point,sig", [("mid-block", "SIGKILL"), ("mid-save", "SIGKILL"),
                                       ("mid-block", "SIGINT"), ("mid-block", "SIGTERM")])
def test_killed_run_resumes_to_the_same_bytes(tiny_dir, reference, tmp_path, capsys, point,
                                              sig):
    out = tmp_path / "out"
    work = pipeline.work_folder(out)
    proc = _interrupted(tiny_dir, out, point, sig)
    if sig == "SIGKILL":
        assert proc.returncode == -9, proc.stderr
    else:  # Ctrl-C and SIGTERM: a clean exit that says what was kept and how to go on
        assert proc.returncode == 130, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert lines[0].startswith("qexport: interrupted; nothing was written to ")
        assert "1 of 2 blocks is kept in" in lines[0] and "rerun the same command" in lines[0]
        # no output folder, nothing half-written beside it but the work folder
        assert [p.name for p in tmp_path.iterdir()] == [work.name]
    assert not out.exists()
    assert checkpoint.describe(work) == "1 of 2 blocks"

    argv = [a for a in _args(tiny_dir, out) if a != "--quiet"]
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert "PTQ1.61: resuming after block 1/2" in err, err
    assert "PTQ1.61: block 1/2" not in err  # not learned again
    assert (out / "model.onnx").read_bytes() == reference
    assert not work.exists()
    # a killed run's temp folder (SIGKILL: no cleanup ran) is removed by the next run
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_killed_end_to_end_tuning_resumes_to_the_same_bytes(tiny_dir, tmp_path, capsys):
    """Killed in the middle of end-to-end tuning (after the blocks, after its first
    checkpoint): the rerun learns no block again, resumes the tuning at its saved step and
    writes the bytes of an uninterrupted run."""
    extra = ("--e2e-epochs", "3")  # 3 x 4 steps, a checkpoint after step 8 (every 8)
    ref = tmp_path / "ref"
    assert cli.main(_args(tiny_dir, ref, *extra)) == 0
    out = tmp_path / "out"
    work = pipeline.work_folder(out)
    proc = _interrupted(tiny_dir, out, "mid-e2e", "SIGKILL", *extra)
    assert proc.returncode == -9, proc.stderr
    assert checkpoint.describe(work) == "2 of 2 blocks and 8 of 12 end-to-end tuning steps"
    capsys.readouterr()
    assert cli.main([a for a in _args(tiny_dir, out, *extra) if a != "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "PTQ1.61: resuming after block 2/2" in err, err
    assert "end-to-end tuning: resuming at step 8/12" in err, err
    assert "end-to-end tuning: step 8/12" not in err  # not tuned again
    assert (out / "model.onnx").read_bytes() == (ref / "model.onnx").read_bytes()
    assert not work.exists()


def test_no_resume_starts_over(tiny_dir, reference, tmp_path, capsys):
    out = tmp_path / "out"
    assert _interrupted(tiny_dir, out, "mid-block", "SIGKILL").returncode == -9
    assert checkpoint.describe(pipeline.work_folder(out)) == "1 of 2 blocks"
    assert cli.main(_args(tiny_dir, out)[:-1] + ["--no-resume"]) == 0
    err = capsys.readouterr().err
    assert "resuming" not in err and "PTQ1.61: block 1/2" in err
    assert (out / "model.onnx").read_bytes() == reference


# ------------------------------------------------------------------------ the learning alone
class _Stop(Exception):
    pass


def _learn(model, ids, ckpt=None, stop_after=None):
    from qexport.families import find_blocks

    def progress(msg):
        if stop_after is not None and msg.startswith(f"PTQ1.61: block {stop_after}/"):
            raise _Stop
    path, blocks = find_blocks(model)
    names = [f"{path}.{bi}.{sub}" for bi, b in enumerate(blocks)
             for sub, m in b.named_modules() if isinstance(m, torch.nn.Linear)]
    salient = {n: torch.tensor([1, 5, 9]) for n in names}
    return learn_mixed_weights(model, ids, salient, 0, LearnConfig(epochs=1), progress=progress,
                               checkpoint_dir=ckpt)


def test_learning_resumes_bit_exactly(tmp_path):
    from tiny_models import tiny_llama

    model = tiny_llama()
    ids = torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(0))
    ref = _learn(model, ids)
    ckpt = tmp_path / "work"
    with pytest.raises(_Stop):
        _learn(model, ids, ckpt, stop_after=1)
    assert checkpoint.describe(ckpt) == "1 of 2 blocks"
    got = _learn(model, ids, ckpt)
    assert got.keys() == ref.keys()
    for name, w in ref.items():
        for a, b in zip(w.tensors(), got[name].tensors()):
            assert (a is None and b is None) or torch.equal(a, b), name


def test_checkpoint_of_other_inputs_is_discarded(tmp_path):
    from tiny_models import tiny_llama

    model = tiny_llama()
    ids = torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(0))
    ckpt = tmp_path / "work"
    with pytest.raises(_Stop):
        _learn(model, ids, ckpt, stop_after=1)
    other = ids.clone()
    other[0, 0] += 1  # one calibration token differs: another fingerprint
    with pytest.raises(_Stop):  # learns block 1 again (a resumed run would not print it)
        _learn(model, other, ckpt, stop_after=1)
    assert checkpoint.describe(ckpt) == "1 of 2 blocks"  # now the other run's block
    with pytest.raises(_Stop):  # so the first inputs do not resume from it either
        _learn(model, ids, ckpt, stop_after=1)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_leftovers_of_a_killed_commit(tmp_path):
    """SIGKILL between the commit's two renames: the previous output, set aside, is put back
    by the next run; a dead run's temp folder is removed; a live run's is left alone."""
    tag = f"{pipeline._owner_tag().rsplit('-', 1)[0]}-{_dead_pid()}"
    old = tmp_path / f".out.old-{tag}"
    old.mkdir()
    (old / "report.json").write_text("{}")
    dead_tmp = tmp_path / f".out.tmp-{tag}-abc"
    live_tmp = tmp_path / f".out.tmp-{pipeline._owner_tag()}-def"
    dead_tmp.mkdir()
    live_tmp.mkdir()
    pipeline._remove_stale_temps(tmp_path, "out")
    assert (tmp_path / "out" / "report.json").is_file()
    assert not old.exists() and not dead_tmp.exists() and live_tmp.exists()


def test_checkpoint_removal_keeps_foreign_files(tmp_path):
    """A work folder given by mistake (an existing folder) loses only checkpoint files."""
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "block-0000.pt").write_bytes(b"x")
    (tmp_path / checkpoint.STATE).write_bytes(b"x")
    checkpoint.remove(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
