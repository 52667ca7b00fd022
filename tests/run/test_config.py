"""The one config rule: dataclass defaults < the run's saved config < --config FILE < options; unknown keys and
wrong types are one-line errors listing the valid keys; CLI options and their help come from the dataclasses."""

from __future__ import annotations

import dataclasses

import pytest
import typer.main
from typer.testing import CliRunner

from backend.errors import DifflensError
from backend.run.config import SECTIONS, RunConfig, field_docs, parse_set, resolve
from cli import app


def test_precedence_defaults_saved_file_options(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text("[sae]\nk = 8\nexpansion = 4\n[analysis]\npool = \"max\"\n")
    saved = {"sae": {"k": 32, "expansion": 2, "total_tokens": 1000}, "name": "saved"}
    cfg = resolve(saved=saved, file=toml, overrides={"sae.k": 4, "analysis.pool": None})
    assert cfg.sae.k == 4  # option over file over saved
    assert cfg.sae.expansion == 4  # file over saved
    assert cfg.sae.total_tokens == 1000  # saved over default
    assert cfg.analysis.pool == "max"  # an option that was not given (None) does not count
    assert cfg.name == "saved" and cfg.capture.batch_size == RunConfig().capture.batch_size


def test_unknown_keys_list_the_valid_ones(tmp_path):
    with pytest.raises(DifflensError, match=r"unknown key\(s\) kk; valid keys: .*architecture.*total_tokens"):
        resolve(overrides={"sae.kk": 3})
    with pytest.raises(DifflensError, match="unknown config section 'saes'.*capture, sae, analysis, interventions"):
        resolve(overrides={"saes.k": 3})
    toml = tmp_path / "bad.toml"
    toml.write_text("[capture]\nstepz = 3\n")
    with pytest.raises(DifflensError, match=r"bad.toml \[capture\]: unknown key\(s\) stepz; valid keys:"):
        resolve(file=toml)
    with pytest.raises(DifflensError, match="steps must be int"):
        resolve(overrides={"capture.steps": "ten"})


def test_set_values_are_read_as_toml():
    assert parse_set(["sae.k=32", "sae.lr=1e-3", "analysis.pool=max", "capture.layers=[\"a\", \"b\"]",
                      "interventions.enabled=false"]) == {
        "sae.k": 32, "sae.lr": 1e-3, "analysis.pool": "max", "capture.layers": ["a", "b"],
        "interventions.enabled": False}
    with pytest.raises(DifflensError, match="--set takes KEY=VALUE"):
        parse_set(["sae.k"])


def test_every_config_field_is_documented():
    for cls in (RunConfig, *SECTIONS.values()):
        docs = field_docs(cls)
        names = [f.name for f in dataclasses.fields(cls) if f.name not in SECTIONS]
        # SAETrainConfig fields without a docstring are named well enough; the run's own sections must say more
        if cls is not SECTIONS["sae"]:
            assert set(names) <= set(docs), (cls.__name__, sorted(set(names) - set(docs)))


def test_cli_defaults_and_help_come_from_the_dataclasses():
    runner = CliRunner()
    out = runner.invoke(app, ["train-sae", "--help"], env={"COLUMNS": "200"}).output
    default_k = SECTIONS["sae"]().k
    assert f"[default: {default_k}]" in out and "--k " in out
    out = runner.invoke(app, ["run-all", "--help"], env={"COLUMNS": "200"}).output
    assert f"[default: {SECTIONS['sae']().total_tokens}]" in out


def test_help_texts_keep_their_brackets():
    """Rich markup once swallowed `[interventions]` from `intervene --help`."""
    runner = CliRunner()
    out = runner.invoke(app, ["intervene", "--help"], env={"COLUMNS": "200"}).output
    assert "[interventions] section" in out
    for name, command in [(c.name or c.callback.__name__.replace("_", "-"), c) for c in app.registered_commands]:
        doc = " ".join((command.callback.__doc__ or "").split())
        shown = " ".join(runner.invoke(app, [name, "--help"], env={"COLUMNS": "200"}).output.split())
        for word in [w for w in doc.split() if "[" in w]:
            assert word in shown, (name, word)


def test_one_meaning_per_option_name():
    """--steps is the number of denoising steps wherever it appears."""
    runner = CliRunner()
    for name in ("capture", "run-all", "steer", "ablate", "demo-model sample", "demo-model evaluate"):
        out = " ".join(runner.invoke(app, [*name.split(), "--help"], env={"COLUMNS": "200"}).output.split())
        assert "--steps" in out and "enoising steps" in out, name
    for name, other in (("dream", "--iterations"), ("edit", "--window"), ("demo-model train", "--train-steps")):
        out = runner.invoke(app, [*name.split(), "--help"], env={"COLUMNS": "200"}).output
        assert "--steps" not in out and other in out, name


def test_a_format_1_run_config_is_read_with_its_renamed_keys(tmp_path):
    """Runs written before the option names were unified saved interventions.dream_steps."""
    import json

    from backend.run.context import open_run

    old = RunConfig().to_dict()
    old["interventions"]["dream_steps"] = old["interventions"].pop("dream_iterations") + 7
    (tmp_path / "manifest.json").write_text(json.dumps({"config": old, "stages": {}}))  # no format_version: 1
    ctx = open_run(tmp_path)
    assert ctx.config.interventions.dream_iterations == RunConfig().interventions.dream_iterations + 7
    assert resolve(saved=old).interventions.dream_iterations == ctx.config.interventions.dream_iterations


def test_resuming_a_run_keeps_its_saved_settings(tmp_path, monkeypatch):
    """capture / run-all on an existing run start from its saved config: a GPU run resumed without --device stays
    on its device (it used to fall back to the defaults)."""
    import json

    import cli

    saved = RunConfig(name="r", runs_dir=str(tmp_path), device="cuda:3", dtype="bfloat16").to_dict()
    saved["sae"]["k"] = 32
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "manifest.json").write_text(json.dumps({"config": saved, "stages": {}, "format_version": 2}))
    cfg = cli._new_run_config(None, {"name": "r", "runs_dir": str(tmp_path)}, None)
    assert (cfg.device, cfg.dtype, cfg.sae.k) == ("cuda:3", "bfloat16", 32)
    cfg = cli._new_run_config(None, {"name": "r", "runs_dir": str(tmp_path), "device": "cpu"}, ["sae.k=8"])
    assert (cfg.device, cfg.sae.k) == ("cpu", 8)


def test_sae_variants_from_toml_and_set_with_one_line_errors(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text("[sae]\nk = 16\n\n[sae.variants.k8]\nk = 8\nexpansion = 16\n")
    cfg = resolve(file=toml, overrides=parse_set(["sae.variants.k8.total_tokens=1000", "sae.variants.r.lr=0.1"]))
    assert cfg.sae.sae_ids() == ["default", "k8", "r"]
    assert cfg.sae.variants["k8"] == {"k": 8, "expansion": 16, "total_tokens": 1000}  # --set merges into the table
    k8 = cfg.sae.train_config("k8")
    assert (k8.k, k8.expansion, k8.total_tokens) == (8, 16, 1000) and cfg.sae.train_config().k == 16
    assert "variants" not in dataclasses.asdict(cfg.sae.train_config())
    for bad, message in [("sae.variants.K8.k=4", "SAE id 'K8' is not valid"),
                         ("sae.variants.k8.bogus=1", r"\[sae.variants.k8\]: unknown key\(s\) bogus"),
                         ("sae.variants.k8.k=\"x\"", r"\[sae.variants.k8\]: k must be int"),
                         ("sae.variants.default.k=2", "`default` is the \\[sae\\] settings' own SAE")]:
        with pytest.raises(DifflensError, match=message) as err:
            resolve(overrides=parse_set([bad]))
        assert "\n" not in str(err.value)


def test_label_and_range_settings_are_checked():
    from backend.run.config import AnalysisConfig, validate_analysis

    for bad, match in ((dict(label_stat="median"), "analysis.label_stat is 'median'"),
                       (dict(label_top_n=0), "analysis.label_top_n must be at least 1"),
                       (dict(label_method="auroc"), "analysis.label_method is 'auroc'; use one of breakeven"),
                       (dict(range_bins=0), "analysis.range_bins must be at least 1"),
                       (dict(label_pseudo_count=0.0), "analysis.label_pseudo_count must be > 0")):
        with pytest.raises(DifflensError, match=match):
            validate_analysis(AnalysisConfig(**bad))


def test_per_kind_dream_tables_from_toml_and_set_with_one_line_errors(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text("[dream]\nlr = 0.1\n\n[dream.channel]\nlr = 0.5\n\n[dream.feature]\nrobustness = \"strong\"\n")
    cfg = resolve(file=toml, overrides=parse_set(["dream.feature.tv_weight=2.0"]))
    assert cfg.dream.lr == 0.1 and cfg.dream.channel == {"lr": 0.5}
    assert cfg.dream.feature == {"robustness": "strong", "tv_weight": 2.0}  # --set merges into the table
    atlas_options = {o for p in typer.main.get_command(app).commands["atlas"].params for o in p.opts}
    assert "--dream-lr" in atlas_options and "--dream-channel" not in atlas_options  # tables: --set only
    for bad, message in [("dream.feature.bogus=1", r"\[dream.feature\]: unknown key\(s\) bogus; valid keys:"),
                         ("dream.channel.lr=\"x\"", r"\[dream.channel\]: lr must be float \| None"),
                         ("dream.channel.range_weight=nan", "dream.channel.range_weight must be a finite number"),
                         ("dream.channel.channel={}", r"\[dream.channel\]: unknown key\(s\) channel"),
                         ("dream.feature=3", r"\[dream.feature\] must be a table")]:
        with pytest.raises(DifflensError, match=message) as err:
            resolve(overrides=parse_set([bad]))
        assert "\n" not in str(err.value)
    toml.write_text("[dream.feature]\nlr = inf\n")
    with pytest.raises(DifflensError, match="dream.feature.lr must be a finite number"):
        resolve(file=toml)


def test_steer_options_are_the_prior_knobs():
    from backend.run.config import PriorConfig

    params = {p.name: p for p in typer.main.get_command(app).commands["steer"].params}
    assert {"opt__prior__scale", "opt__prior__strength", "opt__prior__steps", "opt__prior__peak_radius",
            "opt__prior__n_steps", "seeds"} <= set(params)
    docs = field_docs(PriorConfig)
    assert params["opt__prior__steps"].opts == ["--window"] and docs["steps"] in params["opt__prior__steps"].help
    assert params["opt__prior__n_steps"].opts == ["--steps"]  # denoising steps, as in every command
    assert set(f.name for f in dataclasses.fields(PriorConfig)) == {"scale", "strength", "steps", "peak_radius",
                                                                     "seeds", "n_steps"}  # a new knob: expose it
