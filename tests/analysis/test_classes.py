"""Classes per unit on an image-classifier run: the halves, AUROC per class in and out of sample, the ranked table
and the best unit per class chosen on one half and scored on the other."""

from types import SimpleNamespace

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from backend.analysis.classes import class_best_table, class_labels, class_scores_table, has_classes, unit_aurocs
from backend.analysis.inputs import Partition
from backend.run.config import AnalysisConfig


def gens(labels):
    return pl.DataFrame({"gen_id": np.arange(len(labels), dtype=np.int32), "class_label": labels})


def test_halves_alternate_within_each_class():
    g = gens(["a", "a", "a", "b", "b", "a", "b", "b"])
    classes, positive_NC, select_N = class_labels(g)
    assert classes == ["a", "b"] and positive_NC[:, 0].tolist() == [True, True, True, False, False, True, False,
                                                                    False]
    assert select_N.tolist() == [True, False, True, True, False, False, True, False]
    assert has_classes(g) and not has_classes(gens(["a", "a"]))
    assert not has_classes(pl.DataFrame({"gen_id": [0], "class_label": [None]}, schema={"gen_id": pl.Int32,
                                                                                        "class_label": pl.Utf8}))


def write_activity(path, acts_UN):
    """Feature-style activity (active rows only) of [units, generations] at step 0."""
    u, n = np.nonzero(acts_UN)
    pq.write_table(pa.table({"gen_id": n.astype(np.int32), "step": np.zeros(len(u), np.int16),
                             "unit": u.astype(np.int32), "mean": acts_UN[u, n].astype(np.float32),
                             "max": acts_UN[u, n].astype(np.float32)}), path)
    return str(path)


def test_aurocs_tables_and_the_best_unit_out_of_sample(tmp_path):
    g = gens(["a"] * 4 + ["b"] * 4 + ["c"] * 1)  # class c has one image: its test half is empty
    # unit 0 fires for a (perfect); unit 1 fires for b on the selection half only; unit 2 fires for b everywhere,
    # a little weaker than unit 1 on the selection half
    acts = np.zeros((3, 9))
    acts[0, :4] = 1.0
    acts[1, [4, 6]] = 5.0
    acts[2, 4:8] = [4.0, 3.0, 4.0, 3.0]
    acts[2, 0] = 0.5  # and weakly for one a image
    part = Partition("l", "feature", [write_activity(tmp_path / "a.parquet", acts)], 3)
    classes, positive_NC, select_N = class_labels(g)
    aurocs = unit_aurocs(duckdb.connect(), SimpleNamespace(gens=g), part, positive_NC, select_N,
                         AnalysisConfig(pool="mean"))
    assert aurocs["all"][0, 0] == 1.0 and aurocs["select"][1, 1] == 1.0 and aurocs["test"][1, 1] == 0.5
    assert np.isnan(aurocs["test"][:, 2]).all() and not np.isnan(aurocs["select"][:, 2]).any()
    best = class_best_table(classes, positive_NC, aurocs).to_pandas()
    assert best["class"].tolist() == ["a", "b", "c"] and best["images"].tolist() == [4, 4, 1]
    assert best["unit"].tolist()[:2] == [0, 1]  # b's best on the selection half is unit 1 (a tie broken by index)
    assert best["auroc_test"].tolist()[:2] == [1.0, 0.5]  # ... which the held-out half shows does not generalise
    freqs = pl.DataFrame({"unit": np.repeat(np.arange(3), 3).astype(np.int32), "group": ["a", "b", "c"] * 3,
                          "freq": np.linspace(0, 1, 9).astype(np.float32), "mean": np.zeros(9, np.float32),
                          "generations": [4, 4, 1] * 3})
    scores = pl.from_arrow(class_scores_table(classes, aurocs, freqs))
    unit2 = scores.filter(pl.col("unit") == 2)
    assert unit2["class"].to_list()[0] == "b" and unit2["rank"].to_list() == [1, 2, 3]
    assert unit2["auroc"].to_list() == sorted(unit2["auroc"].to_list(), reverse=True)
    joined = unit2.join(freqs.rename({"group": "class"}), on=["unit", "class"], maintain_order="left")
    assert joined["freq"].to_list() == joined["freq_right"].to_list() and unit2["images"].to_list() == \
        joined["generations"].to_list()
