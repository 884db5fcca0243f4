"""The `modelpex` command, run as a real subprocess: results, tables, and one-line errors with a non-zero exit."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestrator.store import LocalPexStore

from .conftest import CliResult, Project, copy_example, store_snapshot, write_model

Cli = Callable[..., CliResult]


def assert_one_line_error(result: CliResult, *fragments: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def test_build_list_and_cache(cli: Cli, project: Project) -> None:
    write_model(project.models, "m")
    first = cli("build", "m")
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("built  m@1.0.0")
    again = cli("build", "m")
    assert again.stdout.startswith("cached m@1.0.0")
    listing = cli("list")
    assert listing.returncode == 0
    assert "model" in listing.stdout and "m " in listing.stdout and "1.0.0" in listing.stdout
    assert "base" in listing.stdout and "MB" in listing.stdout


def test_build_all_builds_every_tagged_version(cli: Cli, project: Project, store: LocalPexStore) -> None:
    folder = write_model(project.models, "m", version="1.0.0")
    project.commit_and_tag("m 1.0.0", "m/v1.0.0")
    pyproject = folder / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('"1.0.0"', '"1.1.0"'))
    result = cli("build", "--all")
    assert result.returncode == 0, result.stderr
    assert {r.version for r in store.find("model", "m")} == {"1.0.0", "1.1.0"}


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (("build", "../etc"), ["model name '../etc' is not valid"]),
        (("build", "m@1.0/../../x"), ["is not a normalised PEP 440 version"]),
        (("build", "nope"), ["unknown model 'nope'", "known models: m"]),
        (("build", "m@7.7.7"), ["has no version 7.7.7: known versions are 1.0.0"]),
        (("run", "m", "--input", "data", "--output", "x.parquet"), ["must look like NAME=PATH"]),
        (("run", "m", "--input", "data=missing.parquet", "--output", "x.parquet"), ["cannot read missing.parquet"]),
        (("--store", "gs://bucket", "list"), ["no artifact store backend for 'gs://bucket'"]),
    ],
)
def test_bad_input_is_one_clear_line(
    cli: Cli, project: Project, store: LocalPexStore, args: tuple[str, ...], fragments: list[str]
) -> None:
    write_model(project.models, "m")
    before = store_snapshot(store)
    assert_one_line_error(cli(*args), *fragments)
    assert store_snapshot(store) == before


def test_folder_without_modelpex_table_fails_cleanly(cli: Cli, project: Project, store: LocalPexStore) -> None:
    write_model(project.models, "m", tool="")
    before = store_snapshot(store)
    assert_one_line_error(cli("build", "m"), "has no [tool.modelpex] table")
    assert store_snapshot(store) == before


def test_conflict_and_syntax_error_fail_cleanly(cli: Cli, project: Project, store: LocalPexStore) -> None:
    write_model(project.models, "a", dependencies=("modelpex-base", "pandas<2"))
    write_model(project.models, "b", code="def train(:\n")
    before = store_snapshot(store)
    assert_one_line_error(cli("build", "a"), "requires 'pandas<2' but the base ships pandas")
    assert_one_line_error(cli("build", "b"), "syntax error in", "line 1")
    assert store_snapshot(store) == before


def test_gc_removes_only_what_nothing_references(cli: Cli, project: Project, store: LocalPexStore) -> None:
    folder = write_model(project.models, "m")
    assert cli("build", "m").returncode == 0
    (old,) = store.find("model", "m")
    (folder / "src" / "m" / "model.py").write_text((folder / "src" / "m" / "model.py").read_text() + "# v2\n")
    assert cli("build", "m").returncode == 0
    stray = store.root / "models" / "m" / "m-1.0.0-crash-leftover.pex"
    stray.write_bytes(b"half written")
    dry = cli("gc", "--dry-run")
    assert "would remove m@1.0.0" in dry.stdout and stray.exists()
    result = cli("gc")
    assert result.returncode == 0, result.stderr
    assert [r.key for r in store.find("model", "m")] != [old.key]
    assert len(store.find("model", "m")) == 1 and store.find("base", "base")
    assert not stray.exists()


def data_file(tmp_path: Path) -> Path:
    path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"x": [1.0, 2.0, 3.0, 6.0]}), path)
    return path


def test_run_trains_then_predicts(cli: Cli, project: Project, tmp_path: Path) -> None:
    write_model(project.models, "m")
    output, state = tmp_path / "out.parquet", tmp_path / "state"
    result = cli(
        "run",
        "m",
        "--input",
        f"data={data_file(tmp_path)}",
        "--output",
        str(output),
        "--params",
        '{"offset": 1}',
        "--save-state",
        str(state),
    )
    assert result.returncode == 0, result.stderr
    assert pq.read_table(output)["y"].to_pylist() == [5.0, 6.0, 7.0, 10.0]  # x + mean(x) + offset
    assert "4 rows in, 4 rows out" in result.stdout
    again = cli("run", "m", "--input", f"data={data_file(tmp_path)}", "--output", str(output), "--state", str(state))
    assert again.returncode == 0, again.stderr
    assert pq.read_table(output)["y"].to_pylist() == [4.0, 5.0, 6.0, 9.0]  # the stored mean, no offset


def test_run_refuses_a_tampered_state(cli: Cli, project: Project, tmp_path: Path) -> None:
    write_model(project.models, "m")
    state = tmp_path / "state"
    args = ("--input", f"data={data_file(tmp_path)}", "--output", str(tmp_path / "out.parquet"))
    assert cli("run", "m", *args, "--save-state", str(state)).returncode == 0
    state.write_text('{"mean": 1000}')
    result = cli("run", "m", *args, "--state", str(state))
    assert result.returncode != 0
    assert "has no record in" in result.stderr and "train m@1.0.0 again" in result.stderr


def test_run_refuses_a_corrupt_artifact(
    cli: Cli, project: Project, store: LocalPexStore, tmp_path: Path, fresh_cache: dict[str, str]
) -> None:
    write_model(project.models, "m")
    assert cli("build", "m").returncode == 0
    (record,) = store.find("model", "m")
    path = store.local_path(record)
    path.chmod(0o644)
    path.write_bytes(path.read_bytes()[:-100])
    before = store_snapshot(store)
    result = cli(
        "run", "m", "--input", f"data={data_file(tmp_path)}", "--output", str(tmp_path / "out.parquet"), env=fresh_cache
    )
    assert_one_line_error(result, "refusing to run m@1.0.0", "truncated or tampered with")
    assert store_snapshot(store) == before
    assert not (tmp_path / "out.parquet").exists()


def test_model_that_raises_fails_with_its_traceback(
    cli: Cli, project: Project, store: LocalPexStore, tmp_path: Path
) -> None:
    write_model(
        project.models,
        "m",
        code="def train(inputs, params):\n    raise KeyError('no column z')\n\ndef predict(i, s, p):\n    pass\n",
    )
    output = tmp_path / "out.parquet"
    assert cli("build", "m").returncode == 0
    before = store_snapshot(store)
    result = cli("run", "m", "--input", f"data={data_file(tmp_path)}", "--output", str(output))
    assert result.returncode == 1
    assert store_snapshot(store) == before
    assert "\nerror: model m@1.0.0 raised KeyError: 'no column z'\n" in result.stderr, result.stderr
    assert result.stderr.count("error:") == 1, result.stderr
    assert result.stderr.count("Traceback") == 1 and result.stderr.count("KeyError: 'no column z'") == 2, result.stderr
    assert 'm/model.py", line 2, in train' in result.stderr
    assert "modelpex_runtime" not in result.stderr, "the model's own frames, not the runtime's"
    assert len(result.stderr.splitlines()) < 12, result.stderr
    assert not output.exists()


def test_example_models_run_from_the_cli(cli: Cli, project: Project, tmp_path: Path) -> None:
    from orchestrator.datasets import applicants, customers, sales

    for name, frame, data in (
        ("churn", "customers", customers(300)),
        ("demand", "sales", sales(2, 60)),
        ("credit_risk", "applicants", applicants(300)),
    ):
        copy_example(project, name)
        path = tmp_path / f"{frame}.parquet"
        pq.write_table(data, path)
        output = tmp_path / f"{name}.parquet"
        result = cli("run", name, "--input", f"{frame}={path}", "--output", str(output))
        assert result.returncode == 0, result.stderr
        assert pq.read_table(output).num_rows > 0
        if name == "churn":  # N.B. Its metrics, returned with the state (Trained).
            assert "metrics: holdout_accuracy = " in result.stdout, result.stdout
        if name == "credit_risk":  # N.B. Its cut points, reported through Pipes.
            assert "reported: cut_0.5 = " in result.stderr, result.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tiny file system needs root (CI runs as root)")
def test_a_full_disk_leaves_neither_output_nor_state(cli: Cli, project: Project, tmp_path: Path) -> None:
    write_model(project.models, "m")
    full = tmp_path / "full"
    full.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(full)], check=True)
    try:
        (full / "filler").write_bytes(b"\0" * 60_000)
        args = ("--input", f"data={data_file(tmp_path)}", "--output", str(full / "out.parquet"))
        result = cli("run", "m", *args, "--save-state", str(full / "state"))
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert result.stderr.splitlines()[-1].startswith(f"error: cannot write {full / 'state'}: No space left")
        assert sorted(p.name for p in full.iterdir()) == ["filler"], "no output, no state, no temporary file"
    finally:
        subprocess.run(["umount", str(full)], check=True)


INPUTS_DATA = (
    '[tool.modelpex]\ntrain = "m.model:train"\npredict = "m.model:predict"\nframes = "pyarrow"\ninputs = ["data"]\n'
)


def run_checks(tmp_path: Path, data: Path) -> list[tuple[tuple[str, ...], str]]:
    """Command lines whose outputs are wrong, each with the line it must fail with (before anything runs)."""
    out, ro = tmp_path / "out.parquet", tmp_path / "ro"
    given = ("--input", f"data={data}")
    return [
        ((*given, "--output", str(data)), f"--output {data} is also --input data: write to another file"),
        ((*given, "--output", str(tmp_path / "." / data.name)), "is also --input data"),
        ((*given, "--output", str(tmp_path / "no" / "out.parquet")), f"the folder {tmp_path / 'no'} does not exist"),
        ((*given, "--output", str(tmp_path)), f"--output {tmp_path} is a folder: name a file in it"),
        ((*given, "--output", str(out), "--save-state", str(out)), f"--save-state {out} is also --output"),
        ((*given, "--output", str(out), "--save-state", str(data)), f"--save-state {data} is also --input data"),
        ((*given, "--output", str(ro / "out.parquet")), f"cannot write in {ro} (Read-only file system)"),
        ((*given, *given, "--output", str(out)), f"--input data is given twice ({data} and {data})"),
        (("--output", str(out)), "m@1.0.0 reads input 'data', which was not given: add --input data=PATH"),
        (("--input", f"dta={data}", "--output", str(out)), "--input dta: m@1.0.0 reads only data"),
    ]


@pytest.mark.skipif(os.geteuid() != 0, reason="a read-only bind mount needs root (CI runs as root)")
def test_run_checks_inputs_and_outputs_before_anything_runs(
    cli: Cli, project: Project, store: LocalPexStore, tmp_path: Path
) -> None:
    """Nothing is built, nothing written, the input untouched: each mistake is one line before any work."""
    write_model(project.models, "m", tool=INPUTS_DATA)
    work = tmp_path / "work"
    (work / "ro").mkdir(parents=True)
    data = data_file(work)
    original = data.read_bytes()
    subprocess.run(["mount", "--bind", "-o", "ro", str(work / "ro"), str(work / "ro")], check=True)
    try:
        for args, message in run_checks(work, data):
            before = store_snapshot(store)
            result = cli("run", "m", *args)
            assert result.returncode == 1 and result.stderr.count("\n") == 1, (args, result.stderr)
            assert result.stderr.startswith("error: ") and message in result.stderr, (args, result.stderr)
            assert store_snapshot(store) == before, f"{args}: checked before the model is built"
            assert data.read_bytes() == original
            assert sorted(p.name for p in work.iterdir()) == ["data.parquet", "ro"], args
    finally:
        subprocess.run(["umount", str(work / "ro")], check=True)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("MODELPEX_TIMEOUT", "abc"),
        ("MODELPEX_TIMEOUT", "nan"),
        ("MODELPEX_TIMEOUT", "0"),
        ("MODELPEX_TIMEOUT", "-5"),
        ("MODELPEX_SHM_POOL_BYTES", "lots"),
        ("MODELPEX_SENSOR_INTERVAL", "inf"),
        ("MODELPEX_ISOLATION", "maybe"),
    ],
)
def test_a_bad_setting_is_one_line(cli: Cli, project: Project, tmp_path: Path, variable: str, value: str) -> None:
    write_model(project.models, "m")
    args = ("--input", f"data={data_file(tmp_path)}", "--output", str(tmp_path / "out.parquet"))
    result = cli("run", "m", *args, env={variable: value})
    assert_one_line_error(result, f"{variable}={value!r} is not")
    assert "training" not in result.stderr, "refused before the model runs"


def test_usage_errors(cli: Cli, project: Project, tmp_path: Path) -> None:
    """A command with nothing to do is a usage error (exit 2); a project that is not one is an error, not a table."""
    for command, message in (("build", "nothing to build"), ("lock", "nothing to lock")):
        result = cli(command)
        assert result.returncode == 2 and result.stderr.startswith("usage: modelpex"), result.stderr
        assert f"error: modelpex {command}: {message}" in result.stderr
    result = cli("run", "m", "--output", "x.parquet", "--timeout", "nan")
    assert result.returncode == 2 and "argument --timeout: 'nan' is not a positive number" in result.stderr
    for folder in (tmp_path / "missing", tmp_path):
        assert_one_line_error(cli("--project", str(folder), "list"), f"project {folder} is not a modelpex project")
