"""`dmm evaluate`: the spec, the DAG's stages and caching, the report, and the invariants of the populations."""
from __future__ import annotations

import csv
import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
import yaml
from fixtures_store import MODEL, copy_store, digits_store

from attribution.engine import train_batched
from attribution.evaluation import margins
from attribution.store import AttributionStore
from cluster import eval_stages
from cluster.code_version import code_fingerprint
from cluster.eval_methods import MethodConfigError
from cluster.eval_spec import SpecError, spec_from_dict
from cluster.dag import DONE, stage_keys, stage_paths
from cluster.eval_report import GROUPS, result_row
from cluster.evaluate import experiment_stages, run_evaluation
from matching.klom import klom

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SETS = ["random:10:0", "class:3:10", "pc:1:10:top"]


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    """A private copy of the shared digits store: the evaluation's calibration stage writes c into it."""
    shared = digits_store(tmp_path_factory.getbasetemp() / "digits-store")
    return replace(shared, url=copy_store(shared, tmp_path_factory.mktemp("evaluate-store") / "store.zarr"))


def raw_spec(fixture, **changes):
    return {"dataset": fixture.data.name, "models": 4, "attribution": {"store": fixture.url},
            "forget_sets": SETS, "methods": {"nothing": {}, "dm-direct": {}, "dmm": {"min_steps": 10, "max_steps": 30}},
            "metrics": {"relearn_models": 2, "mia_models": 2, "relearn_max_steps": 20}, **changes}


@pytest.fixture(scope="module")
def evaluated(fixture, ray_session, tmp_path_factory):
    out = tmp_path_factory.mktemp("evaluation")
    return out, run_evaluation(spec_from_dict(raw_spec(fixture)), out, progress=False)


def test_the_report_has_every_row_column_and_file(evaluated, fixture):
    out, result = evaluated
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["forget_set"], r["method"]) for r in rows] == [
        (fs, m) for fs in SETS for m in ("nothing", "dm-direct", "dmm", "retrain")]
    for column in ("klom95_forget", "klom95_retain", "klom95_heldout", "acc_forget", "acc_retain", "acc_heldout",
                   "mia_svc", "mia_entropy", "ulira_auc", "relearn_steps", "seconds", "cost_vs_retrain", "match_end"):
        assert column in rows[0]
    for row in rows:  # the matching loss at the end over its start: DMM's only, and it fell
        assert (0 < float(row["match_end"]) < 1) if row["method"] == "dmm" else row["match_end"] == ""
    assert json.loads((out / "results.json").read_text())["klom_direction"] == "oracle||unlearned"
    data = fixture.data
    for fs in ("random_10_0", "class_3_10", "pc_1_10_top"):
        folder = out / "margins" / fs
        for name in ("nothing", "dm-direct", "dmm", "oracle", "floor"):
            assert np.load(folder / f"{name}.npy").shape == (4, data.n_points)
        groups = {k: np.asarray(v) for k, v in json.loads((folder / "groups.json").read_text()).items()}
        assert len(groups["forget"]) == 10 and not set(groups["forget"]) & set(groups["retain"])
        assert np.array_equal(np.sort(np.concatenate([groups["forget"], groups["retain"]])), np.arange(data.n_train))
        assert np.array_equal(groups["heldout"], np.arange(data.n_train, data.n_points))
    class_set = json.loads((out / "margins" / "class_3_10" / "groups.json").read_text())["forget"]
    assert set(data.y_train[class_set].tolist()) == {3}
    for png in ("klom_per_group.png", "klom_vs_cost.png", "margin_histograms.png"):
        assert (out / png).stat().st_size > 10_000
    assert all(f"`{fs}`" in (out / "report.md").read_text() for fs in SETS)


def test_klom_in_the_report_recomputes_from_the_saved_margins(evaluated):
    out, result = evaluated
    folder = out / "margins" / "random_10_0"
    forget = np.asarray(json.loads((folder / "groups.json").read_text())["forget"])
    oracle = np.load(folder / "oracle.npy")
    rows = {r["method"]: r for r in result["rows"] if r["forget_set"] == "random:10:0"}
    for method, file in (("retrain", "floor"), ("dmm", "dmm"), ("nothing", "nothing")):
        population = np.load(folder / f"{file}.npy")
        values = klom(oracle, population)
        assert rows[method]["klom95_forget"] == pytest.approx(np.percentile(values[forget], 95), rel=1e-6)
        other = klom(oracle, population, direction="unlearned||oracle")  # the report's other direction, beside it
        assert rows[method]["klom95_other_forget"] == pytest.approx(np.percentile(other[forget], 95), rel=1e-6)
        sd_ratio = population[:, forget].std(axis=0).mean() / oracle[:, forget].std(axis=0).mean()
        assert rows[method]["spread_forget"] == pytest.approx(sd_ratio, rel=1e-5)


def test_populations_are_the_models_they_claim_to_be(evaluated, fixture):
    """`nothing` = originals with seeds 0..N−1 and the store's recipe; DM-Direct = their logits − c_cross·Σ_{i∈F} β_i
    − (c_self − c_cross)·β_{x,x} on F − |F|·γ'_x, the scales and size effect the calibration stage's (64 models on
    0.95-subsets, 16 on all of S), in the store."""
    out, _ = evaluated
    data = fixture.data
    folder = out / "margins" / "random_10_0"
    forget = np.asarray(json.loads((folder / "groups.json").read_text())["forget"])
    originals = train_batched(MODEL, data, fixture.recipe, [0, 1, 2, 3], np.ones((4, data.n_train), bool)).logits
    labels = data.all_labels()
    np.testing.assert_allclose(np.load(folder / "nothing.npy"), margins(originals, labels).numpy(), atol=1e-4)
    fit = AttributionStore.open(fixture.url).fit_group("datamodels")
    c = fit.attrs["deletion_scale"]
    assert (c["models"], c["alpha"], c["full_models"], c["fitted_on"]) == (64, 0.95, 16, "margins")
    assert c["scale_cross"] != 1
    beta = np.asarray(fit.weight[:], dtype=np.float64)
    effect = c["scale_cross"] * beta[forget].sum(axis=0) + len(forget) / data.n_train * fit.size_effect
    effect[forget] += (c["scale_self"] - c["scale_cross"]) * beta[forget, forget]
    direct = originals.numpy() - effect[None]
    np.testing.assert_allclose(np.load(folder / "dm-direct.npy"), margins(torch.from_numpy(direct), labels).numpy(),
                               atol=1e-3)
    rows = {r["method"]: r for r in evaluated[1]["rows"] if r["forget_set"] == "random:10:0"}
    assert rows["nothing"]["weight_distance"] == 0 and rows["nothing"]["seconds"] == 0
    assert rows["nothing"]["relearn_steps"] == 0 and rows["retrain"]["cost_vs_retrain"] == 1
    assert rows["dm-direct"]["relearn_steps"] is None and rows["dmm"]["weight_distance"] > 0


def test_calibration_settings_key_the_store_methods_and_nothing_else(fixture, tmp_path):
    """M and α' re-key the calibration and what reads the store; c written into the store re-keys nothing, except
    with M = 0, where the stage keeps the store's. A spec without a store method has no calibration stage."""
    url = copy_store(fixture, tmp_path / "s.zarr")

    def keys(**attribution):
        spec = spec_from_dict(raw_spec(fixture, attribution={"store": url, **attribution}))
        return stage_keys(experiment_stages(spec, tmp_path / "out")[0])

    default, other = keys(), keys(calibration_models=8)
    store_readers = {f"{kind}[{fs}][{m}]" for kind in ("method", "metrics") for fs in SETS for m in ("dm-direct", "dmm")}
    assert {n for n in default if default[n] != other[n]} == {"calibration"} | store_readers
    no_size = keys(calibration_full_models=0)
    assert {n for n in default if default[n] != no_size[n]} == {"calibration"} | store_readers
    no_class = keys(calibration_class_models=0)
    assert {n for n in default if default[n] != no_class[n]} == {"calibration"} | store_readers
    assert keys(calibration_class_models=16) == default  # K_c = 16 is the default where K >= 2
    kept = keys(calibration_models=0)
    AttributionStore.open(url, "r+").fit_group("datamodels").write_deletion_scale({"scale_self": 0.5, "scale_cross": 0.5})
    assert keys() == default
    assert {n for n, k in keys(calibration_models=0).items() if kept[n] != k} == {"calibration"} | store_readers
    spec = spec_from_dict(raw_spec(fixture, methods={"nothing": {}, "ga": {}}))
    assert "calibration" not in stage_keys(experiment_stages(spec, tmp_path / "out")[0])


@pytest.mark.parametrize("change, current", [
    ({}, True),
    ({"fitted_on": None}, False),          # fitted on all k logits, before margins: recalibrated
    ({"spread_gamma": None}, False),       # before the forget spread
    ({"models": 32}, False), ({"alpha": 0.9}, False), ({"full_models": 0}, False),
    ({"class_models": None}, False),       # before the whole-class term (or without it)
    ({"class_models": 8}, False),
])
def test_the_calibration_stage_keeps_only_a_store_record_of_what_it_asks_for(change, current):
    config = {"models": 64, "alpha": 0.95, "full_models": 16, "fitted_on": "margins", "class_models": 16}
    have = {**config, "scale_self": 0.8, "scale_cross": 0.7, "spread_gamma": 0.6}
    have = {k: v for k, v in {**have, **change}.items() if v is not None}
    assert eval_stages.calibration_is_current(have, config) is current


def test_a_row_gives_the_matching_loss_at_the_end_over_its_start():
    metrics = {"method": "dmm", "klom": {g: {"p95": 1.0, "median": 0.5} for g in GROUPS},
               "accuracy": dict.fromkeys(GROUPS, 0.9), "accuracy_gap": dict.fromkeys(GROUPS, 0.0),
               **dict.fromkeys(("mia_svc", "mia_entropy", "ulira_auc", "relearn_steps", "weight_distance", "seconds",
                                "cost_vs_retrain", "sample_grads", "grads_vs_retrain"))}
    row = result_row("random:10:0", {**metrics, "matching": {"loss_start": 0.008, "loss_end": 0.002, "steps": 210.0}})
    assert row["match_end"] == 0.25 and row["steps"] == 210.0
    assert result_row("random:10:0", {**metrics, "matching": None})["match_end"] is None


def test_a_rerun_computes_nothing_and_a_new_method_only_its_stages(evaluated, fixture):
    out, first = evaluated
    again = run_evaluation(spec_from_dict(raw_spec(fixture)), out, progress=False)
    assert again["cached"] == again["stages"] == first["stages"]
    methods = {"nothing": {}, "dm-direct": {}, "dmm": {"min_steps": 10, "max_steps": 30}, "om": {}}
    grown = run_evaluation(spec_from_dict(raw_spec(fixture, methods=methods)), out, progress=False)
    assert grown["stages"] - grown["cached"] == 2 * len(SETS)  # om's method and metrics stages per forget set
    assert sum(r["method"] == "om" for r in grown["rows"]) == len(SETS)


def test_the_report_names_the_stages_other_code_computed(evaluated, fixture, tmp_path):
    source, first = evaluated
    current = code_fingerprint()
    assert first["code"]["other"] == {} and json.loads((source / "results.json").read_text())["code"] == current
    assert (source / "report.md").read_text().rstrip().endswith("computed every stage.")
    out = tmp_path / "out"
    shutil.copytree(source / "cache", out / "cache")
    stages, _ = experiment_stages(spec_from_dict(raw_spec(fixture)), out)
    paths = stage_paths(stages, out / "cache")
    for name, code in (("oracles[random:10:0]", "a" * 64), ("originals", None)):  # an upgrade; a pre-fingerprint cache
        marker = json.loads((paths[name] / DONE).read_text())
        marker["code"] = code
        (paths[name] / DONE).write_text(json.dumps({k: v for k, v in marker.items() if v is not None}))
    result = run_evaluation(spec_from_dict(raw_spec(fixture)), out, progress=False)
    assert result["cached"] == result["stages"]
    assert result["code"]["other"] == {"oracles[random:10:0]": "a" * 64, "originals": "unrecorded"}
    assert json.loads((out / "results.json").read_text())["stages_by_other_code"] == result["code"]["other"]
    assert (f"but 2 of {result['stages']} stages were computed by other code (`aaaaaaaaaaaa`: 1, `unrecorded`: 1)"
            in (out / "report.md").read_text())
    assert [r["klom95_forget"] for r in result["rows"]] == [r["klom95_forget"] for r in first["rows"]]


def test_the_cli_says_when_other_code_computed_stages(monkeypatch, capsys, tmp_path):
    from argparse import Namespace
    from cluster import commands_evaluate, evaluate
    note = "Code `cccccccccccc` (sha256 of the pipeline's sources) read this cache, but 1 of 9 stages ..."
    canned = {"rows": [], "stages": 9, "cached": 9, "seconds": 1.0, "peak_rss_bytes": 0}
    monkeypatch.setattr("cluster.eval_spec.load_spec", lambda path: None)
    for other, shown in (({"originals": "unrecorded"}, True), ({}, False)):
        monkeypatch.setattr(evaluate, "run_evaluation",
                            lambda *a, **k: {**canned, "code": {"fingerprint": "c" * 64, "other": other, "note": note}})
        assert commands_evaluate.evaluate_cmd(Namespace(config="x", out=str(tmp_path), address=None,
                                                        trust_code=False)) == 0
        assert (note in capsys.readouterr().out) == shown


def test_a_diverged_model_is_counted_and_left_out_of_every_metric(evaluated, fixture, tmp_path):
    """A population with one model's logits NaN (a method that diverged) is measured on the others; all NaN fails."""
    out, _ = evaluated
    stages, names = experiment_stages(spec_from_dict(raw_spec(fixture)), out)
    keys, by_name = stage_keys(stages), {s.name: s for s in stages}
    stage = by_name[names[("random:10:0", "dmm")]]
    inputs = {role: out / "cache" / by_name[parent].function / keys[parent] for role, parent in stage.parents.items()}
    whole = json.loads((out / "cache" / "metrics" / keys[stage.name] / "metrics.json").read_text())
    assert whole["diverged"] == 0
    population = tmp_path / "population"
    shutil.copytree(inputs["population"], population)
    logits = np.load(population / "logits.npy")
    logits[1, 5, 2] = np.nan
    np.save(population / "logits.npy", logits)
    (tmp_path / "metrics").mkdir()
    eval_stages.metrics_stage(stage.config, tmp_path / "metrics", {**inputs, "population": population})
    got = json.loads((tmp_path / "metrics" / "metrics.json").read_text())
    labels = fixture.data.all_labels()
    kept = margins(torch.from_numpy(logits[[0, 2, 3]]), labels).numpy()
    oracle = margins(torch.from_numpy(np.load(inputs["oracles"] / "logits.npy")), labels).numpy()
    forget = np.load(inputs["forget"] / "ids.npy")
    assert got["diverged"] == 1 and got["ulira_auc"] is None  # 3 models left: too few for U-LiRA's halves
    values = np.load(tmp_path / "metrics" / "klom.npy")
    np.testing.assert_allclose(values, klom(oracle, kept), rtol=1e-6)
    assert not np.allclose(values, np.load(out / "cache" / "metrics" / keys[stage.name] / "klom.npy"))
    assert got["klom"]["forget"]["p95"] == pytest.approx(np.percentile(klom(oracle, kept)[forget], 95), rel=1e-6)
    assert got["accuracy"]["heldout"] == pytest.approx(
        (logits[[0, 2, 3], fixture.data.n_train:].argmax(-1) == fixture.data.y_test.numpy()).mean())
    np.save(population / "logits.npy", np.full_like(logits, np.nan))
    with pytest.raises(Exception, match="dmm: all 4 models diverged .*lower its lr or drop it from the spec"):
        eval_stages.metrics_stage(stage.config, tmp_path / "metrics", {**inputs, "population": population})


def test_oracles_never_see_a_forgotten_id(fixture, tmp_path, monkeypatch):
    seen = []
    real = eval_stages.train_batched

    def spy(model, data, recipe, seeds, masks, *args, **kwargs):
        seen.append(np.asarray(masks).copy())
        return real(model, data, recipe, seeds, masks, *args, **kwargs)

    monkeypatch.setattr(eval_stages, "train_batched", spy)
    monkeypatch.setattr(eval_stages, "train_model", lambda model, data, recipe, seed, mask: seen.append(mask[None]))
    forget = np.array([3, 17, 150])
    (tmp_path / "forget").mkdir()
    np.save(tmp_path / "forget" / "ids.npy", forget)
    data = fixture.data
    config = {"dataset": data.name, "fingerprint": data.fingerprint, "model": MODEL,
              "recipe": fixture.recipe.to_dict(), "seeds": [5, 6], "time_one_retrain": True}
    (tmp_path / "out").mkdir()
    eval_stages.population_stage(config, tmp_path / "out", {"forget": tmp_path / "forget"})
    assert len(seen) == 2  # the batched oracles and the one timed retrain
    for masks in seen:
        assert not masks[:, forget].any() and masks.sum(axis=1).tolist() == [data.n_train - 3] * len(masks)


@pytest.mark.parametrize("change, error, match", [
    ({"colour": 1}, SpecError, "unknown key 'colour'; valid keys: dataset"),
    ({"models": 1}, SpecError, "give N >= 2"),
    ({"forget_sets": ["random:5"]}, Exception, "unknown forget set 'random:5'; use one of random:SIZE:SEED"),
    ({"methods": {"forgetful": {}}}, SpecError, "unknown method 'forgetful'; valid methods: nothing, retrain"),
    ({"methods": {"dmm": {"epoch": 3}}}, MethodConfigError, "no hyperparameter 'epoch'; valid: lr"),
    ({"methods": {"dmm": {"lr": "fast"}}}, MethodConfigError, "lr is 'fast'; give a float"),
    ({"methods": {"nothing": {"lr": 1.0}}}, MethodConfigError, "takes no hyperparameters"),
    ({"metrics": {"klom_direction": "sideways"}}, SpecError, "use one of oracle||unlearned, unlearned||oracle"),
    ({"attribution": {"alpha": 0.5}}, SpecError, "needs `store`"),
    ({"attribution": {"num_models": 4, "block_size": 4}}, SpecError, "is 4 .in blocks of 4.; give m >= 6: the fit"),
    ({"attribution": {"num_models": 64, "block_size": 0}}, SpecError, "block_size` is 0; give a positive int"),
    ({"attribution": {"store": "s.zarr", "calibration_models": 1}}, SpecError, "full_models` 16: give M = 0"),
    ({"attribution": {"store": "s.zarr", "calibration_full_models": -1}}, SpecError, "and K >= 0"),
    ({"attribution": {"store": "s.zarr", "calibration_full_models": 0, "calibration_class_models": 2}}, SpecError,
     "calibration_class_models`: 2 class models with 0 full-data models: the whole-class term needs"),
])
def test_bad_specs_get_one_line_errors_naming_the_valid_values(fixture, change, error, match):
    with pytest.raises(error, match=match.replace("|", r"\|").replace("(", r"\(")):
        spec_from_dict(raw_spec(fixture, **change))


def test_the_cli_refuses_a_bad_spec_in_one_line_and_writes_nothing(run_dmm, fixture, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(raw_spec(fixture, methods={"dmm": {"epoch": 3}})))
    result = run_dmm(["evaluate", "--config", spec, "--out", tmp_path / "out"])
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith("dmm: error: method dmm has no hyperparameter 'epoch'")
    assert not (tmp_path / "out").exists()


def test_a_model_factory_named_by_the_spec_needs_consent(tmp_path):
    import sys

    from attribution.models import ModelError

    spec = spec_from_dict({"dataset": "digits", "model": "evil_factory_module:make", "recipe": "digits-mlp",
                           "attribution": {"store": str(tmp_path / "s.zarr"), "num_models": 64},
                           "forget_sets": ["random:5:0"], "methods": {"nothing": {}}})
    with pytest.raises(ModelError, match="evil_factory_module.*--trust-code"):
        run_evaluation(spec, tmp_path / "out", progress=False)
    assert "evil_factory_module" not in sys.modules and not (tmp_path / "s.zarr").exists()


@pytest.mark.parametrize("n_sets", [1, 2, 3])
def test_klom_per_group_lists_the_methods_top_down_in_their_order_for_any_number_of_sets(tmp_path, monkeypatch, n_sets):
    """The first method is at the top of every panel, whatever the number of panels (which share one y-axis:
    inverting it once per panel left an even number of panels upright)."""
    import cluster.eval_plots as eval_plots

    figures = []
    monkeypatch.setattr(eval_plots, "_save", lambda plt, fig, path, dpi: figures.append(fig))
    rows = [{"forget_set": fs, "method": m, "klom95_forget": 5.0, "klom95_retain": 5.1, "klom95_heldout": 5.2}
            for fs in SETS[:n_sets] for m in ("nothing", "retrain", "dmm")]
    eval_plots.plot_klom_per_group(rows, tmp_path / "k.png", "oracle||unlearned", 20)
    panels = figures[0].axes[:n_sets]
    assert [t.get_text() for t in panels[0].get_yticklabels()] == ["nothing", "retrain", "dmm"]  # at y = 0, 1, 2
    assert all(ax.yaxis_inverted() for ax in panels)  # y = 0 at the top


def test_a_plot_names_an_id_file_by_its_name_and_keeps_a_long_title_inside_the_image(tmp_path):
    """`ids:/…/forget_ids.txt` is drawn as `ids:forget_ids.txt` (other specs as given); the one-set KLoM panel
    is 4.4 + 1.5 in wide (649 px at 110 dpi), narrower than its title: the image widens instead of cutting it."""
    import struct

    from cluster.eval_plots import _set_label, plot_klom_per_group

    assert _set_label("ids:/tmp/run/demo_out/forget_ids.txt") == "ids:forget_ids.txt"
    assert [_set_label(s) for s in SETS] == SETS
    row = {"forget_set": "ids:/tmp/run/demo_out/forget_ids.txt", "klom95_forget": 5.0, "klom95_retain": 5.1,
           "klom95_heldout": 5.2}
    rows = [dict(row, method=m) for m in ("nothing", "dmm", "retrain")]
    plot_klom_per_group(rows, tmp_path / "k.png", "oracle||unlearned", 20)
    width = struct.unpack(">I", (tmp_path / "k.png").read_bytes()[16:20])[0]  # the PNG header's IHDR width
    assert width > 649


def test_a_margin_histogram_spans_the_oracles_and_the_bulk_of_a_population_not_its_runaways():
    """Oracle margins 0..9 and 38 models at 20..57: the panel spans 0 to 57 (every margin lies within the far
    fences). With 12 more models at 1e17 the quartiles stay in the bulk, and the far fence q3 + 3·IQR (≈ 128)
    bounds the panel, so the 12 runaways are clipped to its edge rather than squashing 50 models into one bin."""
    from cluster.eval_plots import histogram_range

    oracle = np.arange(10.0)
    bulk = np.linspace(20.0, 57.0, 38)
    assert histogram_range(oracle, bulk) == (0.0, 57.0)
    lo, hi = histogram_range(oracle, np.concatenate([bulk, np.full(12, 1e17)]))
    assert lo == 0.0 and hi < 1e3
