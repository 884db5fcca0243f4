"""The `modelpex` command, run as a real subprocess: results, tables, and one-line errors with a non-zero exit."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestrator.store import LocalPexStore, file_sha256

from .conftest import CliResult, Project, copy_example, read_only, store_snapshot, write_model

Cli = Callable[..., CliResult]


def assert_one_line_error(result: CliResult, *fragments: str) -> None:
    """Exit code 1 and stderr exactly one ``error:`` line holding every fragment."""
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def warnings_in(result: CliResult) -> list[str]:
    """The ``warning:`` lines a command printed; each must be one line."""
    return [line for line in result.stderr.splitlines() if line.startswith("warning: ")]


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
            assert "reported by the model: cut_0.5 = " in result.stderr, result.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tiny file system needs root (CI runs as root)")
def test_a_full_disk_leaves_neither_output_nor_state(cli: Cli, project: Project, tmp_path: Path) -> None:
    write_model(project.models, "m")
    full, listing = tmp_path / "full", tmp_path / "listing"
    full.mkdir()
    args = ("--input", f"data={data_file(tmp_path)}", "--output", str(full / "out.parquet"))
    result = cli("run", "m", *args, "--save-state", str(full / "state"), wrap=on_a_full_disk(full, listing))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.splitlines()[-1].startswith(f"error: cannot write {full / 'state'}: No space left")
    assert listing.read_text().split() == ["filler"], "no output, no state, no temporary file"


def on_a_full_disk(folder: Path, listing: Path) -> list[str]:
    """A command prefix: run the rest in a mount namespace of its own where ``folder`` is a 64 KB tmpfs with 60 KB
    taken, then write what ``folder`` holds to ``listing``. The mount is that namespace's alone: nothing is left
    mounted on the machine, however the test ends."""
    script = (
        'folder=$0 listing=$1; shift; mount -t tmpfs -o size=64k tmpfs "$folder" '
        '&& head -c 60000 /dev/zero > "$folder/filler" || exit 99; '
        '"$@"; status=$?; ls -A "$folder" > "$listing"; exit $status'
    )
    return ["unshare", "--mount", "sh", "-c", script, str(folder), str(listing)]


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
    for args, message in run_checks(work, data):
        before = store_snapshot(store)
        result = cli("run", "m", *args, wrap=read_only(work / "ro"))
        assert result.returncode == 1 and result.stderr.count("\n") == 1, (args, result.stderr)
        assert result.stderr.startswith("error: ") and message in result.stderr, (args, result.stderr)
        assert store_snapshot(store) == before, f"{args}: checked before the model is built"
        assert data.read_bytes() == original
        assert sorted(p.name for p in work.iterdir()) == ["data.parquet", "ro"], args


def path_without(folder: Path, *programs: str) -> str:
    """A PATH with what this one finds, but ``programs``: a machine on which they are not installed."""
    folder.mkdir()
    for directory in os.environ["PATH"].split(os.pathsep):
        for program in Path(directory).glob("*") if Path(directory).is_dir() else ():
            if program.name not in programs and not (folder / program.name).exists():
                (folder / program.name).symlink_to(program)
    return str(folder)


@pytest.mark.parametrize(
    "env",
    [
        pytest.param({"MODELPEX_ISOLATION": "none"}, id="as this user"),
        pytest.param({"PATH": "no bubblewrap"}, id="without bubblewrap"),
    ],
)
def test_the_isolation_notice_comes_once_as_the_first_model_process_starts(
    cli: Cli, project: Project, tmp_path: Path, env: dict[str, str]
) -> None:
    """Where an isolation guarantee does not hold (models run as this process's user; no bubblewrap), a command says
    so once, as its first model process starts: never ahead of an error that has nothing to do with it, which stays
    one line."""
    if env.get("PATH") == "no bubblewrap":
        env = {"PATH": path_without(tmp_path / "bin", "bwrap")}
    write_model(project.models, "m")
    args = ("--input", f"data={data_file(tmp_path)}", "--output", str(tmp_path / "out.parquet"))
    (tmp_path / "state.json").write_text('{"mean": 0}')  # N.B. No record of it in the store: refused before any call.
    unknown = cli("run", "m", *args, "--state", str(tmp_path / "state.json"), env=env)
    assert_one_line_error(unknown, "state")
    ran = cli("run", "m", *args, env=env)
    assert ran.returncode == 0, ran.stderr
    notices = [line for line in ran.stderr.splitlines() if "modelpex isolation: " in line]
    assert len(notices) == 1 and "these guarantees do NOT hold" in notices[0], ran.stderr
    assert ran.stderr.index("modelpex isolation: ") < ran.stderr.index("training"), "before the model's first call"
    if "PATH" in env:
        assert "without a namespace sandbox (bubblewrap is not installed" in notices[0], notices


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


def _two_versions(cli: Cli, project: Project, store: LocalPexStore) -> tuple[Path, Path]:
    """m 1.0.0 released as a tag, 1.1.0 in the working tree, both built; the index files of both."""
    folder = write_model(project.models, "m", version="1.0.0")
    project.commit_and_tag("m 1.0.0", "m/v1.0.0")
    pyproject = folder / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('"1.0.0"', '"1.1.0"'))
    assert cli("build", "--all").returncode == 0
    (old,), (new,) = store.find("model", "m", "1.0.0"), store.find("model", "m", "1.1.0")
    return tuple(store.root / "index" / "m" / f"{r.key}.json" for r in (old, new))  # type: ignore[return-value]


def test_a_record_copied_over_another_version_is_refused(
    cli: Cli, project: Project, store: LocalPexStore, tmp_path: Path
) -> None:
    old_index, new_index = _two_versions(cli, project, store)
    new_index.unlink()
    shutil.copyfile(old_index, new_index)
    before = store_snapshot(store)
    output = tmp_path / "out.parquet"
    args = ("--input", f"data={data_file(tmp_path)}", "--output", str(output))
    refused = cli("run", "m@1.1.0", *args)
    assert_one_line_error(refused, str(new_index), "holds model m@1.0.0", "`modelpex build m@1.1.0 --force`")
    assert store_snapshot(store) == before and not output.exists()
    rebuilt = cli("build", "m@1.1.0", "--force")  # N.B. The fix the error names works.
    old_key = json.loads(old_index.read_text())["key"]
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert warnings_in(rebuilt) == [
        f"warning: replacing index record {new_index}, which holds model m@1.0.0 key {old_key}, not m@1.1.0 key "
        f"{new_index.stem}: it was copied or edited by hand"
    ]
    ran = cli("run", "m@1.1.0", *args)
    assert ran.returncode == 0 and ran.stdout.startswith("m@1.1.0: 4 rows in"), ran.stderr


def test_a_record_of_unknown_kind_cannot_run_a_pex_outside_the_store(
    cli: Cli, project: Project, store: LocalPexStore, tmp_path: Path
) -> None:
    write_model(project.models, "m")
    assert cli("build", "m").returncode == 0
    (record,) = store.find("model", "m")
    index = store.root / "index" / "m" / f"{record.key}.json"
    # N.B. models/<name>/<name>-<version>-<key>.pex with this name resolves outside the store, into tmp_path's parent.
    (tmp_path / "outside").mkdir()
    outside = tmp_path.parent / f"outside-{record.version}-{record.key}.pex"
    shutil.copyfile(store.local_path(record), outside)
    try:
        forged = {**json.loads(index.read_text()), "kind": "plugin", "name": "../../outside"}
        forged["sha256"] = file_sha256(outside)
        index.unlink()
        index.write_text(json.dumps(forged))
        before = store_snapshot(store)
        output = tmp_path / "out.parquet"
        refused = cli("run", "m", "--input", f"data={data_file(tmp_path)}", "--output", str(output))
        assert_one_line_error(refused, str(index), "artifact kind 'plugin' is not one of base, model")
        assert store_snapshot(store) == before and not output.exists()
    finally:
        outside.unlink()


def test_a_malformed_record_is_reported_and_worked_around(
    cli: Cli, project: Project, store: LocalPexStore, tmp_path: Path
) -> None:
    write_model(project.models, "m")
    assert cli("build", "m").returncode == 0
    (record,) = store.find("model", "m")
    index = store.root / "index" / "m" / f"{record.key}.json"
    text = index.read_text()
    index.write_text(text[: len(text) // 2])
    listing = cli("list")
    assert listing.returncode == 0 and "base" in listing.stdout
    (warning,) = warnings_in(listing)
    assert warning.startswith(f"warning: index record {index} is not valid JSON"), listing.stderr
    before = store_snapshot(store)
    gc = cli("gc")
    assert gc.returncode == 0 and "0 artifact(s) removed" in gc.stdout, gc.stdout + gc.stderr
    assert len(warnings_in(gc)) == 2 and str(index) in gc.stderr and "its index record is unreadable" in gc.stderr
    assert store_snapshot(store) == before, "gc keeps what it cannot judge"
    args = ("--input", f"data={data_file(tmp_path)}", "--output", str(tmp_path / "out.parquet"))
    assert_one_line_error(cli("run", "m", *args), str(index), "`modelpex build m@1.0.0 --force`")
    rebuilt = cli("build", "m", "--force")
    assert rebuilt.returncode == 0 and len(warnings_in(rebuilt)) == 1, rebuilt.stderr
    assert cli("list").stderr == "" and cli("run", "m", *args).returncode == 0


def test_gc_keeps_what_clients_pin_when_the_tag_is_missing(cli: Cli, project: Project, store: LocalPexStore) -> None:
    _two_versions(cli, project, store)
    (project.root / "deployments.yaml").write_text(
        "clients:\n  acme:\n    models:\n      m: {version: '1.0.0'}\n  globex:\n    models:\n      m: {}\n"
    )
    project.git("tag", "-d", "m/v1.0.0")  # N.B. A clone that did not receive the tags.
    before = store_snapshot(store)
    known = cli("gc")  # N.B. The store's release record of m@1.0.0 still declares it.
    assert known.returncode == 0, known.stderr
    assert store_snapshot(store) == before and warnings_in(known) == [], "kept: the store knows the version"
    (store.root / "releases" / "m" / "1.0.0.json").unlink()  # N.B. Nor does the store know it now.
    before = store_snapshot(store)
    result = cli("gc")
    assert result.returncode == 0, result.stderr
    assert store_snapshot(store) == before, "acme's m@1.0.0 is kept"
    assert warnings_in(result) == [
        "warning: kept m@1.0.0: deployments.yaml pins it but this clone has no tag m/v1.0.0; fetch the tags "
        "(`git fetch --tags`) so it can be built and collected"
    ]


def test_gc_keeps_a_base_whose_record_is_lost(cli: Cli, project: Project, store: LocalPexStore) -> None:
    write_model(project.models, "m")
    assert cli("build", "m").returncode == 0
    (base,) = store.find("base", "base")
    (store.root / "index" / "base" / f"{base.key}.json").unlink()
    result = cli("gc")
    assert result.returncode == 0, result.stderr
    assert store.local_path(base).is_file(), "m runs on it"
    assert warnings_in(result) == [
        f"warning: kept {store.local_path(base)}: it has no index record but kept models run on it "
        "(`modelpex build base` restores the record of the current base)"
    ]


def test_a_bad_model_folder_fails_alone(cli: Cli, project: Project, store: LocalPexStore) -> None:
    write_model(project.models, "m")
    broken = write_model(project.models, "broken")
    assert cli("build", "--all").returncode == 0
    (broken / "pyproject.toml").write_text("[project\n")
    for name in ("my model", "modèle"):
        write_model(project.models, name)
    built = cli("build", "--all")
    assert built.returncode == 0, built.stderr
    assert built.stdout.splitlines()[1].startswith("cached m@1.0.0")
    assert [w.split(":")[1].strip() for w in warnings_in(built)] == [
        f"skipping model folder {project.models / name}" for name in ("broken", "modèle", "my model")
    ], built.stderr
    assert "model name 'my model' is not valid" in built.stderr and "is not valid TOML" in built.stderr
    before = store_snapshot(store)
    gc = cli("gc")
    assert gc.returncode == 0, gc.stderr
    assert "kept every artifact of broken: its folder is not a valid model" in gc.stderr
    assert store_snapshot(store) == before


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="a read-only bind mount needs root")
def test_a_read_only_store_says_so_in_one_line(
    cli: Cli, project: Project, store: LocalPexStore, tmp_path: Path
) -> None:
    write_model(project.models, "m")
    assert cli("build", "m").returncode == 0
    write_model(project.models, "n")
    before = store_snapshot(store)
    output = tmp_path / "out.parquet"
    run = ("run", "m", "--input", f"data={data_file(tmp_path)}", "--output", str(output))
    read_only_store = f"the artifact store {store.root} is not writable (Read-only file system)"
    for args, what in (
        (("build", "n"), "cannot build n@1.0.0"),
        (("build", "m", "--force"), "cannot build m@1.0.0"),
        (("gc",), "cannot remove garbage"),
        ((*run, "--save-state", str(tmp_path / "state")), "cannot keep the fitted state"),
    ):
        assert_one_line_error(cli(*args, wrap=read_only(store.root)), what, read_only_store, "MODELPEX_STORE")
    assert not output.exists()
    for args in (("build", "m"), ("list",), ("gc", "--dry-run"), run):  # N.B. What only reads still works.
        result = cli(*args, wrap=read_only(store.root))
        assert result.returncode == 0, (args, result.stderr)
    assert output.exists() and store_snapshot(store) == before
