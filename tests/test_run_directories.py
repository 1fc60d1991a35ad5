"""Run directories never lose a user's file, and one process at a time runs one: the run.json mark is the only
thing that makes a folder a run, replacing a run removes only what vlprompt wrote, a second process on a run is
refused naming the first, a killed run's lock is taken over, an unwritable --output is one line."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import color_folder
from vlprompt.cli import main
from vlprompt.runs import directory, resolve, run
from vlprompt.runs.lock import LOCK_NAME, BusyError, DirLock
from vlprompt.testing import make_tiny_checkpoint


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("dir_models"), "tiny-vit", seed=3)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return color_folder(tmp_path_factory.mktemp("dir_data") / "shapes")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("dir_cache"))


def _request(model_files, folder, cache_dir, method="zeroshot", **data):
    cfg, weights = model_files
    return {"method": method, "backbone": str(cfg), "pretrained": str(weights), "cache_dir": cache_dir,
            "data": {"dataset": "folder", "root": str(folder), **data}}


def _main(argv, capsys):
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# -- A1: only vlprompt's mark makes a run directory ----------------------------------------------------------------
@pytest.mark.parametrize("force", [False, True])
def test_a_project_folder_with_a_config_yaml_survives_train_into_it(force, model_files, folder, cache_dir, tmp_path,
                                                                     capsys):
    """The user writes exp/config.yaml by hand (top-level method: and data:, as a run's) and trains with it
    into that very folder: nothing there is touched, --force or not; one line, exit 2."""
    project = tmp_path / "exp"
    (project / "src").mkdir(parents=True)
    (project / "config.yaml").write_text(yaml.safe_dump(_request(model_files, folder, cache_dir)))
    (project / "NOTES.md").write_text("what I tried")
    (project / "src" / "train.py").write_text("print('mine')")
    before = _snapshot(project)
    rc, out, err = _main(["train", "--config", str(project / "config.yaml"), "--output", str(project), "--quiet",
                          *(["--force"] if force else [])], capsys)
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "not a vlprompt run directory" in err and "move it away or choose another --output" in err
    assert _snapshot(project) == before
    assert sorted(p.name for p in project.iterdir()) == ["NOTES.md", "config.yaml", "src"]  # not even a lock file


def test_an_earlier_versions_files_without_a_mark_are_refused_not_replaced(model_files, folder, cache_dir, tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.yaml").write_text(yaml.safe_dump(_request(model_files, folder, cache_dir)))
    (old / "results.json").write_text(json.dumps({"metrics": {"accuracy": 50.0}}))
    before = _snapshot(old)
    for force in (False, True):
        with pytest.raises(Exception, match="config.yaml, results.json but no run.json.*move it away"):
            run(resolve(_request(model_files, folder, cache_dir)), old, force=force, progress=False)
    assert _snapshot(old) == before
    assert not directory.is_run_dir(old)


def test_replacing_a_run_removes_only_what_vlprompt_wrote(model_files, folder, cache_dir, tmp_path, caplog):
    out = tmp_path / "run"
    req = _request(model_files, folder, cache_dir)
    run(resolve(req), out, progress=False)
    (out / "my_notes.md").write_text("the user's own file, inside a run directory")
    (out / "plots").mkdir()
    (out / "plots" / "fig.pdf").write_bytes(b"%PDF")
    other = {**req, "method_options": {"templates": ["itap of a {}."]}}
    res = run(resolve(other), out, force=True, progress=False)
    assert res["config"]["method_options"]["templates"] == ["itap of a {}."]
    assert (out / "my_notes.md").read_text().startswith("the user's own file")
    assert (out / "plots" / "fig.pdf").read_bytes() == b"%PDF"
    assert any("kept 2 file(s) vlprompt did not write: my_notes.md, plots" in r.getMessage() for r in caplog.records)
    # clear() itself: vlprompt's names (and their temporary files) only
    (out / ".results.json.ab12cd.tmp").write_text("torn")
    (out / ".training_curve.tmp.png").write_text("torn")
    (out / ".results.json.notes").write_text("not a temporary file of ours")
    directory.clear(out)
    assert sorted(p.name for p in out.iterdir()) == sorted([".results.json.notes", "my_notes.md", "plots",
                                                            LOCK_NAME])


def test_a_restarted_run_drops_only_its_own_records(model_files, folder, cache_dir, tmp_path):
    """A run killed before its first checkpoint restarts; what it removes is its own files."""
    out = tmp_path / "run"
    req = {**_request(model_files, folder, cache_dir, method="coop", shots=2), "train": {"epochs": 1, "views": 1}}
    run(resolve(req), out, progress=False)
    import shutil

    shutil.rmtree(out / "checkpoints")
    marker = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({**marker, "status": "running"}))
    (out / "results.json").unlink()
    (out / "mine.txt").write_text("keep")
    run(resolve(req), out, progress=False)
    assert (out / "mine.txt").read_text() == "keep"
    assert json.loads((out / "run.json").read_text())["status"] == "done"
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1


# -- A2: one process per run directory -------------------------------------------------------------------------
# the CLI in a process of its own whose epoch `hold` waits (after its record is written) until a file appears
_HOLDING_CLI = r"""
import sys, time
from pathlib import Path
from vlprompt.engine.callbacks import MetricsJsonl
gate, hold = Path(sys.argv[1]), int(sys.argv[2])
write_record = MetricsJsonl.on_epoch_end
def on_epoch_end(self, trainer, record):
    write_record(self, trainer, record)
    if record["epoch"] == hold:
        (gate.parent / "holding").write_text("1")
        while not gate.exists():
            time.sleep(0.05)
MetricsJsonl.on_epoch_end = on_epoch_end
from vlprompt.cli import main
sys.exit(main(sys.argv[3:]))
"""


def _train_argv(model_files, folder, cache_dir, out, epochs=3):
    cfg, weights = model_files
    return ["train", "--method", "coop", "--backbone", str(cfg), "--pretrained", str(weights), "--dataset", "folder",
            "--root", str(folder), "--shots", "2", "--epochs", str(epochs), "--batch-size", "2", "--views", "1",
            "--n-ctx", "2", "--output", str(out), "--cache-dir", cache_dir, "--quiet"]


def _holding_process(tmp_path, argv, hold: int):
    gate = tmp_path / "gate"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", _HOLDING_CLI, str(gate), str(hold), *argv], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (tmp_path / "holding").exists():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise AssertionError(f"the first process did not reach epoch {hold}: {proc.communicate()[1]}")
        time.sleep(0.05)
    return proc, gate


def test_a_second_process_on_a_running_run_is_refused_naming_the_first(model_files, folder, cache_dir, tmp_path,
                                                                       capsys):
    out = tmp_path / "run"
    argv = _train_argv(model_files, folder, cache_dir, out)
    first, gate = _holding_process(tmp_path, argv, hold=1)
    try:
        # the advice a refusal gives for an unfinished run (--resume), while the first process still trains it
        rc, _, err = _main([*argv, "--resume"], capsys)
        assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, err
        assert f"pid {first.pid}" in err and "in use" in err and "since" in err and "train" in err, err
        rc, _, err = _main([*argv, "--force"], capsys)  # --force does not take a running run either
        assert rc == 2 and f"pid {first.pid}" in err, err
        with pytest.raises(BusyError, match=f"pid {first.pid}"):  # nor does the Python API, nor eval
            run(resolve({**_request(model_files, folder, cache_dir, method="coop", shots=2),
                         "train": {"epochs": 3}}), out, progress=False)
        rc, _, err = _main(["eval", str(out), "--dataset", "folder", "--root", str(folder), "--quiet"], capsys)
        assert rc == 2 and f"pid {first.pid}" in err, err
    finally:
        gate.write_text("go")
        _, first_err = first.communicate(timeout=300)
    assert first.returncode == 0, first_err
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]  # one record per epoch
    marker = json.loads((out / "run.json").read_text())
    assert marker["status"] == "done" and "error" not in marker
    assert directory.lock_holder(out) is None and (out / LOCK_NAME).read_text() == ""  # released, record emptied


def test_the_lock_of_a_killed_run_is_taken_over_by_resume(model_files, folder, cache_dir, tmp_path, capsys):
    out = tmp_path / "run"
    argv = _train_argv(model_files, folder, cache_dir, out)
    victim, _ = _holding_process(tmp_path, argv, hold=2)  # epoch 1's checkpoint is written
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    left = json.loads((out / LOCK_NAME).read_text())
    assert left["pid"] == victim.pid  # the killed process's record is still there
    rc, _, err = _main([*argv, "--resume"], capsys)
    assert rc == 0, err
    log = (out / "log.txt").read_text()
    assert f"took over the lock of pid {victim.pid}" in log and "no longer running" in log
    assert "resumed from" in log
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert json.loads((out / "run.json").read_text())["status"] == "done"


def test_the_lock_without_flock_falls_back_to_the_pid_record(tmp_path, monkeypatch, caplog):
    """On a filesystem without flock the record is the lock: a live holder on this host refuses, a dead one is
    taken over."""
    import errno
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    path = tmp_path / "d" / LOCK_NAME
    path.parent.mkdir()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        import socket

        record = {"pid": live.pid, "host": socket.gethostname(), "since": "2026-01-01 00:00:00", "command": "x"}
        path.write_text(json.dumps(record))
        with pytest.raises(BusyError, match=f"pid {live.pid}"):
            DirLock(path).acquire()
        path.write_text(json.dumps({**record, "pid": dead.pid}))
        lock = DirLock(path).acquire()
        assert lock.taken_over["pid"] == dead.pid
        assert json.loads(path.read_text())["pid"] == os.getpid()
        lock.release()
        assert path.read_text() == ""
    finally:
        live.kill()
        live.wait()


def test_the_lock_is_reentrant_in_a_process_and_exclusive_between_processes(tmp_path):
    path = tmp_path / LOCK_NAME
    with DirLock(path) as outer:
        with DirLock(path):
            pass
        assert json.loads(path.read_text())["pid"] == os.getpid()  # still held after the inner release
        probe = subprocess.run([sys.executable, "-c", "import sys; from vlprompt.runs.lock import DirLock, BusyError\n"
                                "try:\n DirLock(sys.argv[1]).acquire()\nexcept BusyError as e:\n print(e)\n"
                                " sys.exit(3)", str(path)], capture_output=True, text=True, timeout=120)
        assert probe.returncode == 3 and f"pid {os.getpid()}" in probe.stdout, probe.stderr
        assert outer.taken_over is None
    assert path.read_text() == ""


# -- A4: an --output that cannot be written ---------------------------------------------------------------------
def test_an_output_under_a_file_is_one_line(model_files, folder, cache_dir, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("a file")
    out = tmp_path / "notes.txt" / "run"
    argv = ["zeroshot", "--backbone", str(model_files[0]), "--pretrained", str(model_files[1]), "--dataset",
            "folder", "--root", str(folder), "--cache-dir", cache_dir, "--quiet", "--output", str(out)]
    rc, _, err = _main(argv, capsys)
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "--output" in err and "notes.txt is a file" in err


def test_an_output_under_a_read_only_folder_is_one_line(model_files, folder, cache_dir, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    argv = ["zeroshot", "--backbone", str(model_files[0]), "--pretrained", str(model_files[1]), "--dataset",
            "folder", "--root", str(folder), "--cache-dir", cache_dir, "--quiet"]
    os.chmod(ro, 0o555)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as root: chmod does not make a folder read-only")
        rc, _, err = _main([*argv, "--output", str(ro / "run")], capsys)
        assert rc == 2 and err.count("\n") == 1 and "not writable" in err and "--output" in err, err
        assert not (ro / "run").exists()
    finally:
        os.chmod(ro, 0o755)
    # an existing run directory that cannot be written (a colleague's run, a read-only mount)
    done = tmp_path / "done"
    run(resolve(_request(model_files, folder, cache_dir)), done, progress=False)
    os.chmod(done, 0o555)
    try:
        rc, _, err = _main([*argv, "--templates", "itap of a {}.", "--force", "--output", str(done)], capsys)
        assert rc == 2 and err.count("\n") == 1 and "not writable" in err, err
    finally:
        os.chmod(done, 0o755)


def test_a_permission_error_while_creating_the_run_directory_is_one_line(model_files, folder, cache_dir, tmp_path,
                                                                         capsys, monkeypatch):
    """Where permissions cannot be read up front (root on a read-only mount, ACLs), the error met when the run
    directory is created is one line too."""
    target = tmp_path / "mount" / "run"
    real_mkdir = Path.mkdir

    def mkdir(self, *a, **k):
        if str(self).startswith(str(tmp_path / "mount")):
            raise PermissionError(13, "Permission denied", str(self))
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    argv = ["zeroshot", "--backbone", str(model_files[0]), "--pretrained", str(model_files[1]), "--dataset",
            "folder", "--root", str(folder), "--cache-dir", cache_dir, "--quiet", "--output", str(target)]
    rc, _, err = _main(argv, capsys)
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert f"--output {target}: cannot write there" in err and "Permission denied" in err


# -- A5: a class name too long for the text context -------------------------------------------------------------
@pytest.mark.parametrize("method", ["zeroshot", "text-bias", "rank-zeroshot"])
def test_a_class_name_too_long_for_the_context_writes_nothing(method, model_files, cache_dir, tmp_path, capsys):
    from conftest import jpeg, write_csv

    long_name = " ".join(["enormous"] * 80)
    rows = [[str(jpeg(tmp_path / "img" / f"{c}{i}.jpg", value=i * 20)), c, name]
            for c, name in enumerate(["a cat", long_name]) for i in range(10)]
    labels = write_csv(tmp_path / "labels.csv", ["path", "label", "classname"], rows)
    out = tmp_path / "run"
    argv = [method, "--backbone", str(model_files[0]), "--pretrained", str(model_files[1]), "--dataset", "csv",
            "--root", str(labels), "--cache-dir", cache_dir, "--quiet", "--output", str(out)]
    if method == "rank-zeroshot":
        argv = ["train", "--method", *argv, "--shots", "0"]
    if method == "text-bias":
        argv = ["train", "--method", *argv, "--shots", "2", "--epochs", "1"]
    rc, _, err = _main(argv, capsys)
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "class name" in err and "enormous enormous" in err and "77" in err, err
    assert not out.exists()  # nothing written


def test_a_grid_cell_whose_directory_another_process_runs_is_busy_not_failed(model_files, folder, cache_dir,
                                                                             tmp_path):
    """The grid's cells lock with the same lock as runs: a cell whose run directory a `vlprompt train` outside the
    grid holds is reported busy (running in --status), and nothing is written into that directory."""
    from vlprompt.grid.executors import run_cell
    from vlprompt.grid.status import CellLock, cell_state, lock_path

    cfg = resolve(_request(model_files, folder, cache_dir))
    run_dir = tmp_path / "grid" / "cell"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from vlprompt.runs import directory\n"
                               "with directory.lock(sys.argv[1]):\n print('held', flush=True); time.sleep(120)",
                               str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        result = run_cell({"name": "cell", "output": str(tmp_path / "grid"), "config": cfg.to_dict(),
                           "evaluations": []})
        assert result["status"] == "busy"
        assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_NAME]  # no failure recorded in it

        class Cell:
            name, config, evaluations = "cell", cfg, []

        assert cell_state(Cell, tmp_path / "grid")["state"] == "running"
        with CellLock(lock_path(tmp_path / "grid", "cell")) as lock:  # the grid's own lock is the same DirLock
            assert lock.acquired
            probe = subprocess.run([sys.executable, "-c", "import sys; from vlprompt.grid.status import is_locked\n"
                                    "print(is_locked(sys.argv[1], 'cell'))", str(tmp_path / "grid")],
                                   capture_output=True, text=True, timeout=120)
            assert probe.stdout.strip() == "True", probe.stderr
    finally:
        holder.kill()
        holder.wait()


def test_a_grid_output_under_a_file_is_one_line(model_files, folder, cache_dir, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("a file")
    spec = {**_request(model_files, folder, cache_dir), "axes": {"method": ["zeroshot"]}}
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(spec))
    rc, _, err = _main(["grid", str(tmp_path / "grid.yaml"), "--output", str(tmp_path / "notes.txt" / "out"),
                        "--quiet"], capsys)
    assert rc == 2 and err.count("\n") == 1 and "notes.txt is a file" in err, err


def test_unwritable_folders_are_one_line_where_chmod_cannot_show_it(model_files, folder, cache_dir, tmp_path, capsys,
                                                                    monkeypatch):
    """As above without chmod (CI may run as root): the permission check and the lock's own OSError."""
    done = tmp_path / "done"
    run(resolve(_request(model_files, folder, cache_dir)), done, progress=False)
    argv = ["zeroshot", "--backbone", str(model_files[0]), "--pretrained", str(model_files[1]), "--dataset",
            "folder", "--root", str(folder), "--cache-dir", cache_dir, "--quiet", "--templates", "itap of a {}.",
            "--force"]
    real_access = os.access
    read_only = {str(tmp_path / "ro"), str(done)}
    monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: False if str(p) in read_only and mode & os.W_OK
                        else real_access(p, mode, *a, **k))
    (tmp_path / "ro").mkdir()
    for out, what in ((tmp_path / "ro" / "run", "its folder"), (done, "the run directory")):
        rc, _, err = _main([*argv, "--output", str(out)], capsys)
        assert rc == 2 and err.count("\n") == 1 and f"{what} " in err and "not writable" in err, err
    assert not (tmp_path / "ro" / "run").exists()
    monkeypatch.setattr(os, "access", real_access)

    def refuse(self):
        raise PermissionError(13, "Permission denied", str(self.path))

    monkeypatch.setattr(DirLock, "acquire", refuse)
    rc, _, err = _main([*argv, "--output", str(done)], capsys)
    assert rc == 2 and err.count("\n") == 1 and "cannot write there (Permission denied)" in err, err
    assert json.loads((done / "run.json").read_text())["status"] == "done"  # untouched
