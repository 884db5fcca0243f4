"""Model folders, names and versions: every bad input is a `SpecError` that names the file and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.errors import SpecError
from orchestrator.specs import ModelRef, check_sources, discover_models, load_model_spec, tree_digest
from orchestrator.versions import resolve_source

from .conftest import REPO, Project, write_model


def test_examples_load() -> None:
    specs = {s.name: s for s in discover_models(REPO / "model_packages")}
    assert {"churn", "demand", "credit_risk"} <= set(specs)
    assert specs["demand"].frames == "polars"
    assert "pydantic>=2" in specs["credit_risk"].requirements


def test_folder_without_pyproject(tmp_path: Path) -> None:
    (tmp_path / "churn").mkdir()
    with pytest.raises(SpecError, match=r"no pyproject.toml at .*churn/pyproject.toml: add one"):
        load_model_spec(tmp_path / "churn")


def test_pyproject_without_modelpex_table(tmp_path: Path) -> None:
    folder = write_model(tmp_path, "churn", tool="")
    with pytest.raises(SpecError, match=r"has no \[tool.modelpex\] table: add one with train ="):
        load_model_spec(folder)


@pytest.mark.parametrize(
    ("tool", "message"),
    [
        ('[tool.modelpex]\ntrain = "m.model:train"\npredict = "os.system(1)"\n', "predict = 'os.system\\(1\\)'"),
        ('[tool.modelpex]\ntrain = "m.model:train"\npredict = "m.model:predict"\nframes = "spark"\n', "spark"),
    ],
)
def test_bad_tool_table(tmp_path: Path, tool: str, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        load_model_spec(write_model(tmp_path, "m", tool=tool))


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    folder = write_model(tmp_path, "m")
    (folder / "pyproject.toml").write_text("[project\nname=")
    with pytest.raises(SpecError, match=r"pyproject.toml is not valid TOML"):
        load_model_spec(folder)


@pytest.mark.parametrize(
    "text", ["../x", "x/../../etc", "churn@../../1", "churn@1.0/../x", "Churn", "", "churn@", "a b"]
)
def test_path_tricks_are_refused(text: str) -> None:
    with pytest.raises(SpecError, match="not valid|not a normalised"):
        ModelRef.parse(text)


def test_version_must_be_normalised() -> None:
    with pytest.raises(SpecError, match="did you mean '1.2'"):
        ModelRef.parse("churn@1.02")
    assert ModelRef.parse("churn@1.2.0") == ModelRef("churn", "1.2.0")


def test_folder_name_must_match_project_name(tmp_path: Path) -> None:
    folder = write_model(tmp_path, "m")
    (folder / "pyproject.toml").write_text((folder / "pyproject.toml").read_text().replace('name = "m"', 'name = "x"'))
    with pytest.raises(SpecError, match="name is 'x' but the folder is 'm'"):
        load_model_spec(folder)


def test_syntax_error_is_found_before_the_build(tmp_path: Path) -> None:
    spec = load_model_spec(write_model(tmp_path, "m", code="def train(:\n    pass\n"))
    with pytest.raises(SpecError, match=r"syntax error in .*model.py line 1"):
        check_sources(spec)


def test_key_ignores_caches_but_not_code(tmp_path: Path) -> None:
    folder = write_model(tmp_path, "m")
    before = tree_digest(folder)
    (folder / "src" / "m" / "__pycache__").mkdir()
    (folder / "src" / "m" / "__pycache__" / "model.cpython-311.pyc").write_bytes(b"junk")
    assert tree_digest(folder) == before
    (folder / "src" / "m" / "model.py").write_text("# changed\n")
    assert tree_digest(folder) != before


def test_unknown_model_and_version(project: Project, tmp_path: Path) -> None:
    write_model(project.models, "m", version="1.1.0")
    project.commit_and_tag("m 1.1.0")
    with pytest.raises(SpecError, match="unknown model 'nope'.*known models: m"):
        resolve_source(project.root, project.models, ModelRef.parse("nope"), tmp_path)
    with pytest.raises(SpecError, match="has no version 9.9.9: known versions are 1.1.0"):
        resolve_source(project.root, project.models, ModelRef.parse("m@9.9.9"), tmp_path)


def test_working_tree_describes_its_own_version_and_tags_the_others(project: Project, tmp_path: Path) -> None:
    folder = write_model(project.models, "m", version="1.0.0")
    released = project.commit_and_tag("m 1.0.0", "m/v1.0.0")
    (folder / "src" / "m" / "model.py").write_text("# edited under the released number\n")
    source = resolve_source(project.root, project.models, ModelRef.parse("m@1.0.0"), tmp_path / "exports")
    assert source.commit == f"{released}+dirty"
    assert "edited" in (source.spec.source_dir / "m" / "model.py").read_text()
    pyproject = folder / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('version = "1.0.0"', 'version = "2.0.0"'))
    old = resolve_source(project.root, project.models, ModelRef.parse("m@1.0.0"), tmp_path / "exports")
    assert old.commit == released and old.spec.version == "1.0.0"
    assert "edited" not in (old.spec.source_dir / "m" / "model.py").read_text()


TOOL = '[tool.modelpex]\ntrain = "m.model:train"\npredict = "m.model:predict"\ninputs = ["data"]\n'


@pytest.mark.parametrize(
    ("typo", "meant"), [('frame = "pyarrow"', "frames"), ("resue = false", "reuse"), ('input = ["data"]', "inputs")]
)
def test_an_unknown_modelpex_key_is_refused_naming_the_nearest(tmp_path: Path, typo: str, meant: str) -> None:
    """A misspelt optional key would otherwise be read as absent and silently change nothing (issue 20)."""
    key = typo.split()[0]
    with pytest.raises(SpecError, match=rf"\[tool.modelpex\] has an unknown key '{key}': did you mean '{meant}'\?"):
        load_model_spec(write_model(tmp_path, "m", tool=TOOL + typo + "\n"))


def test_an_unknown_key_with_no_near_one_lists_the_keys(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"unknown key 'colour': the keys are train, predict, frames, inputs"):
        load_model_spec(write_model(tmp_path, "m", tool=TOOL + 'colour = "red"\n'))


def test_a_prediction_contract_is_read() -> None:
    spec = load_model_spec(REPO / "model_packages" / "churn")
    assert spec.predictions.columns == ("customer_id", "churn_probability", "will_churn", "risk_band")
    range_, values = spec.predictions.checks
    assert (range_.name, range_.min, range_.max, range_.severity) == ("churn_probability_range", 0.0, 1.0, "error")
    assert (values.name, values.values, values.severity) == ("risk_band_values", ("low", "medium", "high"), "warn")
    assert load_model_spec(REPO / "model_packages" / "demand").predictions.rows == "any"


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (
            '[tool.modelpex.predictions]\ncolour = "red"\n',
            r"predictions\] has an unknown key 'colour': did you mean 'columns'\?",
        ),
        ("[tool.modelpex.predictions]\ncolumns = [1]\n", "must be a list of column names"),
        (
            '[tool.modelpex.predictions]\nrows = "other"\n',
            r'rows = .other. must be "input", "any" or one of its inputs',
        ),
        ("[tool.modelpex.predictions.checks]\np = {}\n", "declares nothing to check"),
        ("[tool.modelpex.predictions.checks]\np = {min = 1, max = 0}\n", "min = 1 is above max = 0"),
        ('[tool.modelpex.predictions.checks]\np = {min = "a"}\n', "min and max must be numbers"),
        ("[tool.modelpex.predictions.checks]\np = {min = 0, values = [1]}\n", "either a range .* or values, not both"),
        ("[tool.modelpex.predictions.checks]\np = {values = []}\n", "must be a non-empty list"),
        (
            "[tool.modelpex.predictions.checks]\np = {mni = 0}\n",
            r"checks.p has an unknown key 'mni': did you mean 'min'\?",
        ),
        ('[tool.modelpex.predictions]\ncolums = ["a"]\n', "unknown key 'colums': did you mean 'columns'\\?"),
        ('[tool.modelpex.predictions.checks]\np = {min = 0, severity = "fatal"}\n', "not one of error, warn"),
        ('[tool.modelpex.predictions.checks]\n"a b" = {min = 0}\n', "only columns named with letters"),
    ],
)
def test_a_bad_prediction_contract_names_the_fix(tmp_path: Path, table: str, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        load_model_spec(write_model(tmp_path, "m", tool=TOOL + table))
