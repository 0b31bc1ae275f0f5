"""How ``anycnn predict`` writes its predictions: text (the default), CSV or JSON, to standard
output or to ``--output FILE``.

One *row* per image given (or per folder that held none), in the order given:

* ``{"path", "class", "index", "probability", "top_k": [{"index", "name", "probability"},
  ...]}`` for an image: ``class`` is the most likely class's name (the checkpoint's class
  names, else its index as text), ``index`` its index, ``probability`` its softmax
  probability, ``top_k`` the ``--top-k`` most likely classes, most likely first;
* ``{"path", "error"}`` for an image that could not be read (``error`` says why).

A multi-label model's rows add ``"labels"``: the names of the labels whose sigmoid probability
is at or above the threshold, most likely first (``[]`` for none); ``class``/``index``/
``probability`` are then its most likely label and that label's own sigmoid probability.

Formats:

* **text**: per image its path, then one line per top-k class (``  0.9731  cat  (class 0)``);
  bad images only on standard error.
* **csv**: a header, then one line per row: ``path,class,index,probability``, then
  ``class_2,index_2,probability_2`` ... up to ``k``, and ``error`` (empty for a prediction;
  the class and probability columns are empty for an error); a multi-label model's file has a
  ``labels`` column after ``path`` (the labels, separated by ``;``: a labels file's syntax).
  Probabilities are written in full (Python's ``repr`` of the float); an image's last digits
  can differ with the other images of its ``--batch-size`` batch (float rounding of the
  batched kernels; ``--batch-size 1`` makes them independent of the batch).
* **json**: one object ``{"checkpoint", "preprocess", "predictions": [row, ...]}``, plus
  ``"threshold"`` for a multi-label model.

The format is ``--format``'s, else ``json`` for ``--json``, else the ``--output`` file's
extension (``.csv``, ``.json``), else text.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from ..errors import ConfigError

FORMATS = ("text", "csv", "json")


def output_format(fmt: str | None, json_flag: bool, output: str | None) -> str:
    """The format of ``--format fmt``, ``--json`` and ``--output`` (module docstring).

    Raises:
        ConfigError: ``--json`` with another ``--format``, or an ``--output`` file whose
            extension names no format while ``--format`` is not given.
    """
    if json_flag:
        if fmt not in (None, "json"):
            raise ConfigError(f"--json is --format json; it cannot go with --format {fmt}")
        return "json"
    if fmt is not None:
        return fmt
    if output is None:
        return "text"
    suffix = Path(output).suffix.lower()
    if suffix in (".csv", ".json"):
        return suffix[1:]
    raise ConfigError(f"--output {output}: name a .csv or .json file, or give --format "
                      f"{'|'.join(FORMATS)}")


def prediction_row(path: str, indices, probs, names, k: int | None = None,
                   threshold: float | None = None) -> dict[str, Any]:
    """The row of an image: its path and ranked ``indices``/``probs`` (most likely first),
    the first ``k`` kept (all by default). With ``threshold`` (a multi-label model; ``indices``
    then ranks every label) the row's ``labels`` are those with a probability ``>=
    threshold``."""
    top = [{"index": int(i), "name": str(names[int(i)]), "probability": float(p)}
           for i, p in zip(indices, probs)]
    row: dict[str, Any] = {"path": path, "class": top[0]["name"], "index": top[0]["index"],
                           "probability": top[0]["probability"]}
    if threshold is not None:
        row["labels"] = [e["name"] for e in top if e["probability"] >= threshold]
    row["top_k"] = top[:k]
    return row


def error_row(path: str, error: str) -> dict[str, Any]:
    """The row of an image (or folder) that gave no prediction."""
    return {"path": path, "error": error}


def text_lines(row: dict[str, Any], width: int) -> list[str]:
    """The text format's lines of a prediction row (class names padded to ``width``): the
    path, for a multi-label row a line ``  labels: a, b`` (``(none)``), then the top-k."""
    what = "label" if "labels" in row else "class"
    labels = ([f"  labels: {', '.join(row['labels']) or '(none)'}"] if "labels" in row
              else [])
    return [row["path"], *labels, *(f"  {e['probability']:.4f}  {e['name']:<{width}}  "
                                    f"({what} {e['index']})" for e in row["top_k"])]


def csv_text(rows: list[dict[str, Any]], k: int, multi_label: bool = False) -> str:
    """The CSV file of ``rows`` for top-``k`` predictions (module docstring; ``multi_label``:
    with the ``labels`` column)."""
    header = ["path", *(["labels"] if multi_label else []), "class", "index", "probability"]
    for rank in range(2, k + 1):
        header += [f"class_{rank}", f"index_{rank}", f"probability_{rank}"]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*header, "error"])
    for row in rows:
        if "error" in row:
            writer.writerow([row["path"], *[""] * (len(header) - 1), row["error"]])
            continue
        cells = [row["path"], *([";".join(row["labels"])] if multi_label else [])]
        for entry in row["top_k"]:
            cells += [entry["name"], entry["index"], repr(entry["probability"])]
        writer.writerow([*cells, ""])
    return out.getvalue()


def json_text(rows: list[dict[str, Any]], checkpoint: str, record: dict[str, Any],
              threshold: float | None = None) -> str:
    """The JSON object of ``rows`` (module docstring), one line; ``threshold`` for a
    multi-label model."""
    extra = {"threshold": threshold} if threshold is not None else {}
    return json.dumps({"checkpoint": checkpoint, "preprocess": record, **extra,
                       "predictions": rows})
